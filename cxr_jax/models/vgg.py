"""VGG-11/13/16/19 (Simonyan & Zisserman 2015) in torchvision's layout; torch-compatible helpers.

torchvision's `vgg16` etc.: blocks of 3x3 convolutions (padding 1) + ReLU [+ BatchNorm before the
ReLU in the `_bn` variants], each block closed by a 2x2/2 max-pool; `AdaptiveAvgPool2d(7)`;
classifier Linear(512*7*7, 4096) - ReLU - Dropout(0.5) - Linear(4096, 4096) - ReLU - Dropout -
Linear(4096, K). Parameters carry torchvision's module names (`features_0` for
`features.0`, ..., `classifier_0`, `classifier_3`, `classifier_6`), so that a state dict maps
name for name; `classifier_6` is the head that paper 003's fine-tuning recipe replaces
(`optimizer.lr_multipliers={'classifier_6': 10.0}`). Activations are sown under the Caffe/Matlab
layer names paper 003 uses.

Sown into 'intermediates' (after the ReLU): every convolution `convB_L`, every block's last
convolution as `convB` (so `conv5` is the last convolution for VGG and AlexNet alike), `poolB`,
`features` (= conv5_3 / conv5_4, the last map before pooling [B, h, w, 512]), `pooled` (the
flattened 7x7 map [B, 25088]), `fc6` and `fc7`.

The torch helpers (exact `AdaptiveAvgPool2d`, strict state-dict conversion) are shared with
`alexnet.py` and `custom_cnn.py`.
"""

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cxr_jax.models import MODELS, pooling
from cxr_jax.models.conv import Conv, resolve_conv_impl

# Convolutions per block and block widths (torchvision cfgs 'A', 'B', 'D', 'E').
VGG_DEPTHS: dict[str, tuple[int, ...]] = {
    'vgg11': (1, 1, 2, 2, 2), 'vgg13': (2, 2, 2, 2, 2),
    'vgg16': (2, 2, 3, 3, 3), 'vgg19': (2, 2, 4, 4, 4),
}
VGG_WIDTHS = (64, 128, 256, 512, 512)

# torchvision's initialisers: kaiming-normal (fan_out, ReLU gain) convolutions, N(0, 0.01)
# linear layers, zero biases.
TORCH_CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
TORCH_LINEAR_INIT = nn.initializers.normal(0.01)


# ----------------------------------------------------------------------------------------------
# torch-compatible pieces


def _adaptive_pool_matrix(size: int, out: int) -> np.ndarray:
  """[out, size] averaging weights of torch's AdaptiveAvgPool over one axis.

  Output i averages input [floor(i * size / out), ceil((i + 1) * size / out)); windows may
  overlap (size not divisible by out) or repeat inputs (size < out), exactly as torch does.
  """
  m = np.zeros((out, size), np.float32)
  for i in range(out):
    start, end = (i * size) // out, -(-((i + 1) * size) // out)
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool2d(x: jax.Array, output_size: int | tuple[int, int]) -> jax.Array:
  """torch.nn.AdaptiveAvgPool2d for NHWC: x [B, H, W, C] -> [B, oh, ow, C], any H, W."""
  oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
  _, h, w, _ = x.shape
  if (h, w) == (oh, ow):
    return x
  if h % oh == 0 and w % ow == 0:  # equal, disjoint windows: a plain average pool
    return nn.avg_pool(x, (h // oh, w // ow), strides=(h // oh, w // ow))
  ph = jnp.asarray(_adaptive_pool_matrix(h, oh), x.dtype)
  pw = jnp.asarray(_adaptive_pool_matrix(w, ow), x.dtype)
  return jnp.einsum('oh,bhwc,pw->bopc', ph, x, pw)


def max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
  """torch MaxPool2d(window, stride) (no padding, floor mode) on NHWC."""
  return pooling.max_pool(x, window, stride)


def torch_conv(features: int, kernel: int, *, stride: int = 1, padding: int = 0,
               dtype: Any = jnp.float32, name: str,
               kernel_init: Callable = TORCH_CONV_INIT, impl: str = 'xla') -> Conv:
  """nn.Conv (parameters and results) with torch's explicit symmetric padding; `impl` as
  cxr_jax/models/conv.py."""
  return Conv(features, (kernel, kernel), strides=(stride, stride),
              padding=((padding, padding), (padding, padding)), dtype=dtype,
              kernel_init=kernel_init, impl=impl, name=name)


def flatten_nhwc(x: jax.Array) -> jax.Array:
  """[B, h, w, C] -> [B, h*w*C] in NHWC order (first FC weights are permuted on import)."""
  return x.reshape(x.shape[0], -1)


@dataclasses.dataclass(frozen=True)
class TorchTensor:
  """One torchvision state-dict entry and where it goes in the flax variables."""

  key: str  # e.g. 'features.0.weight'
  path: tuple[str, ...]  # e.g. ('params', 'conv1_1', 'kernel')
  shape: tuple[int, ...]  # expected torch shape
  convert: Callable[[np.ndarray], np.ndarray]


def conv_kernel(w: np.ndarray) -> np.ndarray:
  """torch OIHW -> flax HWIO."""
  return np.transpose(w, (2, 3, 1, 0))


def linear_kernel(w: np.ndarray) -> np.ndarray:
  """torch [out, in] -> flax [in, out]."""
  return np.transpose(w)


def first_linear_kernel(c: int, h: int, w: int) -> Callable[[np.ndarray], np.ndarray]:
  """torch [out, C*H*W] (flatten of NCHW) -> flax [H*W*C, out] (flatten of NHWC)."""
  def fn(weight: np.ndarray) -> np.ndarray:
    out = weight.shape[0]
    return weight.reshape(out, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, out)
  return fn


def rgb_to_channels(in_channels: int) -> Callable[[np.ndarray], np.ndarray]:
  """First-conv kernel conversion: keep RGB (3) or sum over it for 1-channel inputs."""
  if in_channels == 3:
    return conv_kernel
  if in_channels == 1:
    return lambda w: conv_kernel(w.sum(axis=1, keepdims=True))
  raise ValueError(f'in_channels={in_channels}: RGB weights convert to 3 or 1 channels only')


def conv_entries(prefix: str, name: str, in_ch: int, out_ch: int, k: int, *,
                 convert: Callable[[np.ndarray], np.ndarray] = conv_kernel) -> list[TorchTensor]:
  return [TorchTensor(f'{prefix}.weight', ('params', name, 'kernel'), (out_ch, in_ch, k, k),
                      convert),
          TorchTensor(f'{prefix}.bias', ('params', name, 'bias'), (out_ch,), np.asarray)]


def bn_entries(prefix: str, name: str, ch: int) -> list[TorchTensor]:
  return [TorchTensor(f'{prefix}.weight', ('params', name, 'scale'), (ch,), np.asarray),
          TorchTensor(f'{prefix}.bias', ('params', name, 'bias'), (ch,), np.asarray),
          TorchTensor(f'{prefix}.running_mean', ('batch_stats', name, 'mean'), (ch,), np.asarray),
          TorchTensor(f'{prefix}.running_var', ('batch_stats', name, 'var'), (ch,), np.asarray)]


def linear_entries(prefix: str, name: str, in_f: int, out_f: int, *,
                   convert: Callable[[np.ndarray], np.ndarray] = linear_kernel
                   ) -> list[TorchTensor]:
  return [TorchTensor(f'{prefix}.weight', ('params', name, 'kernel'), (out_f, in_f), convert),
          TorchTensor(f'{prefix}.bias', ('params', name, 'bias'), (out_f,), np.asarray)]


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, 'detach'):  # a torch tensor, without importing torch
    value = value.detach().cpu().numpy()
  return np.asarray(value, np.float32)


def convert_state_dict(state_dict: Mapping[str, Any], entries: Sequence[TorchTensor], *,
                       optional: Sequence[str] = (), arch: str = '') -> dict:
  """Strictly maps a torch state dict onto flax variables via `entries`.

  Keys in `optional` (e.g. a dropped head) may be present or not and are ignored; BatchNorm
  `num_batches_tracked` counters are ignored. Raises ValueError listing every missing,
  unexpected and wrongly shaped tensor.
  """
  expected = {e.key: e for e in entries}
  ignored = set(optional)
  given = {k for k in state_dict if not k.endswith('num_batches_tracked')}
  missing = sorted(set(expected) - given)
  unexpected = sorted(given - set(expected) - ignored)
  wrong = sorted(f'{k}: {tuple(np.shape(state_dict[k]))} != expected {expected[k].shape}'
                 for k in set(expected) & given
                 if tuple(np.shape(state_dict[k])) != expected[k].shape)
  if missing or unexpected or wrong:
    raise ValueError(f'{arch} state dict does not match: missing={missing}, '
                     f'unexpected={unexpected}, wrong shape={wrong}')
  variables: dict = {}
  for e in entries:
    node = variables
    for p in e.path[:-1]:
      node = node.setdefault(p, {})
    node[e.path[-1]] = jnp.asarray(e.convert(_to_numpy(state_dict[e.key])))
  return variables


def head_classes(state_dict: Mapping[str, Any], key: str, num_classes: int | None,
                 drop_head: bool) -> int:
  """Head width to expect: num_classes if given, else the state dict's."""
  if num_classes is not None:
    return num_classes
  if drop_head:
    return 0
  if key not in state_dict:
    raise ValueError(f'state dict has no {key!r}; pass drop_head=True to import without a head')
  return int(np.shape(state_dict[key])[0])


# ----------------------------------------------------------------------------------------------
# VGG


class VGG(nn.Module):
  """VGG classifier, torchvision layout (optionally with BatchNorm).

  Attributes:
    num_classes: outputs of the head `classifier_6`.
    depths: convolutions per block (see VGG_DEPTHS).
    widths: channels per block.
    batch_norm: the torchvision `vgg16_bn` variants (BatchNorm between conv and ReLU).
    dropout_rate: dropout after fc6 and fc7.
    pool_size: AdaptiveAvgPool2d output (7 x 7) before the classifier.
    hidden: fc6/fc7 width.
    dtype: compute dtype; parameters stay float32.
    bn_axis_name: mesh axis over which BatchNorm averages batch statistics while training.
    conv_impl: how convolutions are computed (cxr_jax/models/conv.py); same parameters.
      'auto' is XLA's convolutions (VGG has no 1x1 convolution for 'matmul' to rewrite): with
      YNNPACK's convolutions off (cxr_jax/xla_options.py) one 224-px 64 -> 64 3x3 layer's
      forward and gradients take 1.35 s vs 2.1 s with 'patches' (2 cores, batch 16).
  """

  num_classes: int = 1000
  depths: Sequence[int] = VGG_DEPTHS['vgg16']
  widths: Sequence[int] = VGG_WIDTHS
  batch_norm: bool = False
  dropout_rate: float = 0.5
  pool_size: int = 7
  hidden: int = 4096
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False,
               return_features: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Maps images [B, H, W, C] (H, W >= 32) to logits [B, num_classes] (float32).

    With `return_features`, returns (logits, features [B, H/16, W/16, 512]): the last
    convolution's map before the last max-pool.
    """
    x = x.astype(self.dtype)
    features = x
    idx = 0  # torchvision's index in `features`
    impl = resolve_conv_impl(self.conv_impl)
    for b, (depth, width) in enumerate(zip(self.depths, self.widths, strict=True), start=1):
      for i in range(1, depth + 1):
        x = torch_conv(width, 3, padding=1, dtype=self.dtype, name=f'features_{idx}',
                       impl=impl)(x)
        if self.batch_norm:
          # torch BatchNorm2d: momentum 0.1 (flax 0.9), eps 1e-5.
          x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                           axis_name=self.bn_axis_name if train else None,
                           use_fast_variance=False, dtype=self.dtype,
                           name=f'features_{idx + 1}')(x)
        idx += 3 if self.batch_norm else 2
        x = nn.relu(x)
        self.sow('intermediates', f'conv{b}_{i}', x)
      self.sow('intermediates', f'conv{b}', x)
      features = x
      x = max_pool(x, 2, 2)
      idx += 1
      self.sow('intermediates', f'pool{b}', x)
    self.sow('intermediates', 'features', features)
    x = flatten_nhwc(adaptive_avg_pool2d(x, self.pool_size))
    self.sow('intermediates', 'pooled', x)
    for name, idx in (('fc6', 0), ('fc7', 3)):
      x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, kernel_init=TORCH_LINEAR_INIT,
                           name=f'classifier_{idx}')(x))
      self.sow('intermediates', name, x)
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=TORCH_LINEAR_INIT,
                 name='classifier_6')(x)
    logits = x.astype(jnp.promote_types(self.dtype, jnp.float32))
    return (logits, features) if return_features else logits


@MODELS.register('vgg11')
class VGG11(VGG):
  """VGG-11 (torchvision cfg 'A'; `batch_norm=True` for vgg11_bn)."""

  depths: Sequence[int] = VGG_DEPTHS['vgg11']


@MODELS.register('vgg13')
class VGG13(VGG):
  """VGG-13 (torchvision cfg 'B')."""

  depths: Sequence[int] = VGG_DEPTHS['vgg13']


@MODELS.register('vgg16')
class VGG16(VGG):
  """VGG-16 (torchvision cfg 'D'), 138,357,544 parameters with 1000 classes."""

  depths: Sequence[int] = VGG_DEPTHS['vgg16']


@MODELS.register('vgg19')
class VGG19(VGG):
  """VGG-19 (torchvision cfg 'E'), 143,667,240 parameters with 1000 classes."""

  depths: Sequence[int] = VGG_DEPTHS['vgg19']


def _infer_arch(state_dict: Mapping[str, Any]) -> tuple[str, bool]:
  convs = [k for k in state_dict
           if k.startswith('features.') and k.endswith('.weight') and np.ndim(state_dict[k]) == 4]
  batch_norm = any(k.startswith('features.') and k.endswith('running_mean') for k in state_dict)
  by_count = {sum(d): a for a, d in VGG_DEPTHS.items()}
  if len(convs) not in by_count:
    raise ValueError(f'cannot tell the VGG depth from {len(convs)} convolutions; pass arch=')
  return by_count[len(convs)], batch_norm


def from_torchvision(state_dict: Mapping[str, Any], *, arch: str | None = None,
                     batch_norm: bool | None = None, num_classes: int | None = None,
                     drop_head: bool = False, in_channels: int = 3) -> dict:
  """torchvision VGG state dict ({name: array}) -> flax variables for `VGG`.

  Args:
    state_dict: e.g. `torchvision.models.vgg16().state_dict()` (tensors or numpy arrays).
    arch: 'vgg11', 'vgg13', 'vgg16' or 'vgg19'; by default inferred from the convolutions.
    batch_norm: the `_bn` variant; by default inferred from the presence of BatchNorm stats.
    num_classes: expected head width (default: the state dict's).
    drop_head: leave the head `classifier_6` out (the caller initialises a new head, e.g. 14
      outputs instead of 1000); the state dict's head, if any, is ignored.
    in_channels: 3, or 1 to sum the first convolution over RGB for grayscale inputs.

  Returns:
    {'params': ...} (+ 'batch_stats' with BatchNorm), for a VGG of the same arch, input
    size free (the classifier sees 7x7 maps whatever the input).
  """
  inferred_arch, inferred_bn = _infer_arch(state_dict) if (arch is None or batch_norm is None) \
      else (arch, batch_norm)
  arch = arch or inferred_arch
  batch_norm = inferred_bn if batch_norm is None else batch_norm
  entries: list[TorchTensor] = []
  idx, ch = 0, 3
  for depth, width in zip(VGG_DEPTHS[arch], VGG_WIDTHS, strict=True):
    for _ in range(depth):
      convert = rgb_to_channels(in_channels) if idx == 0 else conv_kernel
      entries += conv_entries(f'features.{idx}', f'features_{idx}', ch, width, 3,
                              convert=convert)
      idx += 1
      if batch_norm:
        entries += bn_entries(f'features.{idx}', f'features_{idx}', width)
        idx += 1
      idx += 1  # ReLU
      ch = width
    idx += 1  # MaxPool
  entries += linear_entries('classifier.0', 'classifier_0', 512 * 7 * 7, 4096,
                            convert=first_linear_kernel(512, 7, 7))
  entries += linear_entries('classifier.3', 'classifier_3', 4096, 4096)
  head = ['classifier.6.weight', 'classifier.6.bias']
  k = head_classes(state_dict, head[0], num_classes, drop_head)
  if not drop_head:
    entries += linear_entries('classifier.6', 'classifier_6', 4096, k)
  name = f'{arch}_bn' if batch_norm else arch
  return convert_state_dict(state_dict, entries, optional=head if drop_head else (), arch=name)


def head_fn(model: VGG, variables: dict) -> Callable[[jax.Array], jax.Array]:
  """features (the last convolution after its ReLU) [N, h, w, 512] -> logits [N, K]: the last
  max-pool, adaptive average pool, fc6, fc7, fc8 in eval mode (Grad-CAM)."""
  from cxr_jax.models.custom_cnn import fc_head
  params = variables['params']

  def fn(features: jax.Array) -> jax.Array:
    x = adaptive_avg_pool2d(max_pool(features.astype(model.dtype), 2, 2), model.pool_size)
    return fc_head(params, flatten_nhwc(x), model.dtype)

  return fn
