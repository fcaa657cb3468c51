"""MobileNet v1 (Howard et al. 2017) as modified by paper 000 (Saednia et al.).

A full 3x3 convolution, then 13 depthwise separable blocks (depthwise 3x3 + pointwise 1x1),
every convolution followed by BatchNorm and ReLU; global average pooling and one dense layer
whose logits go through a sigmoid (multi-label) instead of the original softmax.

Intermediate maps are sown into the 'intermediates' collection under stable names
(`conv_stem`, `block_1` ... `block_13`, `features` = last map before pooling [B, h, w, C],
`pooled` = [B, C]) for attention branches, CAM and PDA.

`output_stride` (input size / last map size, 32 for MobileNet) can be lowered to 16 or 8 as
DeepLab (Chen et al. 2017) and TF-slim's `mobilenet_v1_base` do: the stride-2 blocks that would
take the map past it run at stride 1, and every depthwise convolution after them is dilated by
the stride removed so far, so each keeps its receptive field in input pixels. The parameters are
the same for every output stride (only the maps grow), so checkpoints load into any of them.
"""

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxr_jax.models import MODELS
from cxr_jax.models.batch_norm import BatchNorm
from cxr_jax.models.conv import Conv
from cxr_jax.models.depthwise import DepthwiseConv, same_padding
from cxr_jax.models.heads import gap_dense_head_fn, gap_dense_score_map_fn

# (output channels, stride) of the 13 depthwise separable blocks, Table 1 of Howard et al.
MOBILENET_V1_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)

ACTIVATIONS = ('relu', 'relu6')  # applied by BatchNorm (fused)


class ConvBN(nn.Module):
  """Convolution (optionally depthwise) + BatchNorm + activation."""

  features: int
  kernel_size: int
  strides: int = 1
  dilation: int = 1  # depthwise only (a 1 x 1 convolution has nothing to dilate)
  depthwise: bool = False
  depthwise_impl: str = 'shifts'
  conv_impl: str = 'xla'  # full and pointwise convolutions: see cxr_jax/models/conv.py
  activation: str = 'relu'
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  bn_axis_name: str | None = None
  bn_impl: str = 'auto'  # see cxr_jax/models/batch_norm.py
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if self.depthwise:
      x = DepthwiseConv(self.kernel_size, self.strides, impl=self.depthwise_impl,
                        dilation=self.dilation, dtype=self.dtype, name='conv')(x)
    else:
      k, s = self.kernel_size, self.strides
      pad = tuple(same_padding(n, k, s) for n in x.shape[1:3])  # explicit 'SAME'
      x = Conv(self.features, (k, k), strides=s, padding=pad, use_bias=False,
               kernel_init=nn.initializers.lecun_normal(), dtype=self.dtype,
               impl=self.conv_impl, name='conv')(x)
    # Two-pass variance (as batch_norm.py computes it): E[x^2] - E[x]^2 cancels badly in float32
    # on small late-layer maps, enough to make 8-device and 1-device steps differ by 1e-3.
    return BatchNorm(
        use_running_average=not train, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
        axis_name=self.bn_axis_name if train else None, dtype=self.dtype,
        activation=self.activation, impl=self.bn_impl, name='bn')(x)


@MODELS.register('mobilenet_v1')
class MobileNetV1(nn.Module):
  """MobileNet v1 classifier with a GAP + dense (sigmoid) head.

  Attributes:
    num_classes: outputs of the dense head (13 or 14 for NIH).
    width_multiplier: alpha of Howard et al.; scales every layer's channels.
    min_channels: lower bound on any layer's width after the multiplier.
    activation: 'relu' (paper 000's text) or 'relu6' (Keras/TF-slim weights).
    dropout_rate: dropout before the dense head (Keras default 1e-3; paper 000 names none).
    blocks: (channels, stride) per depthwise separable block.
    depthwise_impl: 'shifts' (sum of shifted slices, much faster on XLA:CPU) or 'xla'
      (grouped convolution); same parameters, same results.
    conv_impl: how the stem and pointwise convolutions are computed ('auto': 1x1 convolutions
      as matmuls on the CPU, see cxr_jax/models/conv.py); same parameters, same results.
    output_stride: the largest ratio of input to feature-map size (a power of 2, >= 2): blocks
      whose stride would exceed it run at stride 1 with dilated depthwise convolutions after
      them (see the module docstring). 32 (or more) changes nothing; 8 gives an 8 x 8 map at 64 px
      for about 4x the FLOPs.
    dtype: compute dtype; parameters stay float32.
    bn_axis_name: mesh axis over which BatchNorm averages batch statistics while training.
    bn_impl: BatchNorm + activation's training gradient: 'fused' (hand-written, two passes over
      the map), 'autodiff' (flax's) or 'auto' ('fused' on the CPU, 'autodiff' elsewhere); same
      parameters and values (cxr_jax/models/batch_norm.py).
  """

  num_classes: int
  width_multiplier: float = 1.0
  min_channels: int = 8
  activation: str = 'relu'
  dropout_rate: float = 0.0
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  blocks: Sequence[tuple[int, int]] = MOBILENET_V1_BLOCKS
  depthwise_impl: str = 'shifts'
  conv_impl: str = 'auto'
  output_stride: int = 32
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  bn_impl: str = 'auto'

  def _width(self, channels: int) -> int:
    return max(self.min_channels, int(channels * self.width_multiplier))

  def block_strides(self) -> list[tuple[int, int]]:
    """(stride, dilation) of each block's depthwise convolution under `output_stride`."""
    os_ = self.output_stride
    if os_ < 2 or os_ & (os_ - 1):
      raise ValueError(f'MobileNetV1.output_stride must be a power of 2 >= 2 (the stem has '
                       f'stride 2); got {os_}')
    current, rate, out = 2, 1, []  # after the stem
    for _, stride in self.blocks:
      if current * stride > os_:
        # TF-slim's rule: the block that loses its stride keeps the current rate; the blocks
        # after it see a map `stride` times denser, hence the larger rate.
        out.append((1, rate))
        rate *= stride
      else:
        out.append((stride, rate))
        current *= stride
    return out

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False,
               return_features: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Maps images [B, H, W, C] to logits [B, num_classes] (float32).

    With `return_features`, returns (logits, features [B, h, w, C']) where `features` is the last
    map before pooling, from which `head_fn` alone recomputes the logits.
    """
    if self.activation not in ACTIVATIONS:
      raise ValueError(f'MobileNetV1.activation={self.activation!r}; valid: {list(ACTIVATIONS)}')
    conv = lambda **kw: ConvBN(
        depthwise_impl=self.depthwise_impl, conv_impl=self.conv_impl, activation=self.activation,
        bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon,
        bn_axis_name=self.bn_axis_name, bn_impl=self.bn_impl, dtype=self.dtype, **kw)
    strides = self.block_strides()
    x = x.astype(self.dtype)
    x = conv(features=self._width(32), kernel_size=3, strides=2, name='stem')(x, train=train)
    self.sow('intermediates', 'conv_stem', x)
    for i, ((channels, _), (stride, dilation)) in enumerate(
        zip(self.blocks, strides, strict=True), start=1):
      x = conv(features=x.shape[-1], kernel_size=3, strides=stride, dilation=dilation,
               depthwise=True, name=f'block_{i}_depthwise')(x, train=train)
      x = conv(features=self._width(channels), kernel_size=1,
               name=f'block_{i}_pointwise')(x, train=train)
      self.sow('intermediates', f'block_{i}', x)
    self.sow('intermediates', 'features', x)
    features = x
    x = jnp.mean(x, axis=(1, 2))
    self.sow('intermediates', 'pooled', x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    logits = x.astype(jnp.promote_types(self.dtype, jnp.float32))  # bf16 -> f32 logits
    return (logits, features) if return_features else logits


def head_fn(model: MobileNetV1, variables: dict) -> Callable[[jax.Array], jax.Array]:
  """The classifier head alone: features [N, h, w, C] -> logits [N, K] (GAP + `head`), what
  feature-level explanations (PDA, CAM) re-evaluate."""
  return gap_dense_head_fn(model.dtype, variables, 'head')


def score_map_fn(model: MobileNetV1, variables: dict) -> Callable[[jax.Array], jax.Array]:
  """features [N, h, w, C] -> class score maps [N, h, w, K] (CAM + bias; mean = logits)."""
  return gap_dense_score_map_fn(model.dtype, variables, 'head')
