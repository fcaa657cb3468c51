"""Paper 003's customised CNN (Rajaraman et al. 2018, "Visualizing salient network activations"),
and local response normalisation.

As specified in the paper: input 227x227x3; conv1 96@7x7 stride 2 - ReLU - LRN - max-pool 3/2;
conv2 128@3x3 - ReLU - LRN - max-pool 3/2; conv3, conv4, conv5 256@3x3 each + ReLU ("no
intervening normalization and pooling layers" between them); fc6, fc7 4096 + ReLU + dropout 0.5;
fc8 with 2 outputs (the softmax lives in the loss); weights ~ N(0, 0.01).

What the paper leaves open, decided here (each a field, so a config can choose otherwise):
- Convolution padding: none ('VALID'). The paper names none, and it was built in Matlab R2017a,
  whose `convolution2dLayer` pads 0 by default.
- A max-pool 3/2 after conv5 (`pool5=True`): the paper's "max-pooling layers, with a pooling
  window of 3x3 and stride 2" follows AlexNet [19], which pools after conv5; without it fc6
  alone would hold 20*20*256*4096 = 419M weights. At 227 px the maps are
  111 -> 55 -> 53 -> 26 -> 24 -> 22 -> 20 -> 9, so fc6 sees 9*9*256 = 20,736 inputs and the
  model has 103,328,514 parameters (more than AlexNet's 61M, although the paper calls its model
  compact; it gives no count to check against).
- Biases start at 0 (Matlab's default; the paper names only the weights' Gaussian).
- LRN after the ReLU (AlexNet's order) with size 5, alpha 1e-4, beta 0.75, k 2, alpha divided by
  the window size as Matlab's `crossChannelNormalizationLayer` and torch do.

Parameters are named as torchvision would name an `nn.Sequential` `features` / `classifier`
pair (conv1 ... conv5 = `features_0`, `features_4`, `features_8`, `features_10`, `features_12`;
fc6, fc7, fc8 = `classifier_0`, `classifier_3`, `classifier_6`), as in our VGG and AlexNet, so
that paper 003's recipe names the head the same way for all three (`classifier_6`).

Sown into 'intermediates' (after the ReLU): `conv1` ... `conv5`, `lrn1`, `lrn2`, `pool1`,
`pool2`, `pool5`, `features` (= conv5, the last map before pooling, analysed in the paper's
Fig. 3), `pooled`, `fc6`, `fc7`.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxr_jax.models import MODELS
from cxr_jax.models.vgg import flatten_nhwc, max_pool

# Sequential index of conv1 ... conv5 (conv, ReLU, LRN, pool, conv, ReLU, LRN, pool, conv, ...).
_TORCH_INDEX = (0, 4, 8, 10, 12)


def local_response_norm(x: jax.Array, size: int = 5, alpha: float = 1e-4, beta: float = 0.75,
                        k: float = 2.0) -> jax.Array:
  """Cross-channel LRN on x [..., C]: x / (k + alpha / size * sum of x^2 over the window)^beta.

  The window spans channels c - size//2 ... c + (size-1)//2, cut at the edges; exactly
  torch.nn.LocalResponseNorm(size, alpha, beta, k) (channel-last here).
  """
  sq = jnp.square(x.astype(jnp.promote_types(x.dtype, jnp.float32)))
  c = x.shape[-1]
  pad = [(0, 0)] * (x.ndim - 1) + [(size // 2, (size - 1) // 2)]
  sq = jnp.pad(sq, pad)
  # A sum of `size` shifted slices: cheaper on XLA than a windowed reduction along C.
  total = sum(sq[..., i:i + c] for i in range(size))
  return (x / jnp.power(k + (alpha / size) * total, beta)).astype(x.dtype)


@MODELS.register('custom_cnn')
class CustomCNN(nn.Module):
  """Paper 003's five-convolution, three-FC classifier (see the module docstring).

  Attributes:
    num_classes: outputs of fc8 = `classifier_6` (2 in the paper: abnormal / normal).
    widths: conv1 ... conv5 channels.
    conv1_kernel, conv1_stride: the 7x7/2 first convolution.
    padding: 'VALID' (Matlab's default) or 'SAME' for every convolution.
    pool5: max-pool 3/2 after conv5.
    hidden: fc6/fc7 width; dropout_rate after each.
    lrn_size, lrn_alpha, lrn_beta, lrn_k: LRN after conv1 and conv2.
    init_std: std of the zero-mean Gaussian initialising every weight (weight_init 'normal').
    weight_init: 'normal' (the paper's N(0, init_std)) or 'he' (He et al.'s fan-in normal;
      ours: from N(0, 0.01) this 8-layer net did not leave ln 2 in a CPU-sized budget).
    dtype: compute dtype; parameters stay float32.
    bn_axis_name: unused (no BatchNorm); accepted so that `build_model` can pass it.
  """

  num_classes: int = 2
  widths: tuple[int, ...] = (96, 128, 256, 256, 256)
  conv1_kernel: int = 7
  conv1_stride: int = 2
  padding: str = 'VALID'
  pool5: bool = True
  hidden: int = 4096
  dropout_rate: float = 0.5
  lrn_size: int = 5
  lrn_alpha: float = 1e-4
  lrn_beta: float = 0.75
  lrn_k: float = 2.0
  init_std: float = 0.01
  weight_init: str = 'normal'
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False,
               return_features: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Maps images [B, 227, 227, C] to logits [B, num_classes] (float32).

    Other sizes work, but fc6's input width (and so its parameters) follows the input size.
    With `return_features`, returns (logits, features = conv5 [B, 20, 20, 256] at 227 px).
    """
    if self.weight_init not in ('normal', 'he'):
      raise ValueError(f"weight_init must be 'normal' or 'he', got {self.weight_init!r}")
    init = (nn.initializers.normal(self.init_std) if self.weight_init == 'normal'
            else nn.initializers.he_normal())
    x = x.astype(self.dtype)
    for i, (idx, width) in enumerate(zip(_TORCH_INDEX, self.widths, strict=True), start=1):
      k, s = (self.conv1_kernel, self.conv1_stride) if i == 1 else (3, 1)
      x = nn.Conv(width, (k, k), strides=(s, s), padding=self.padding, dtype=self.dtype,
                  kernel_init=init, name=f'features_{idx}')(x)
      x = nn.relu(x)
      self.sow('intermediates', f'conv{i}', x)
      if i <= 2:
        x = local_response_norm(x, self.lrn_size, self.lrn_alpha, self.lrn_beta, self.lrn_k)
        self.sow('intermediates', f'lrn{i}', x)
        x = max_pool(x, 3, 2)
        self.sow('intermediates', f'pool{i}', x)
    features = x
    self.sow('intermediates', 'features', features)
    if self.pool5:
      x = max_pool(x, 3, 2)
      self.sow('intermediates', 'pool5', x)
    x = flatten_nhwc(x)
    self.sow('intermediates', 'pooled', x)
    for name, idx in (('fc6', 0), ('fc7', 3)):
      x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, kernel_init=init,
                           name=f'classifier_{idx}')(x))
      self.sow('intermediates', name, x)
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=init, name='classifier_6')(x)
    logits = x.astype(jnp.promote_types(self.dtype, jnp.float32))
    return (logits, features) if return_features else logits


def _dense(params: dict, name: str, x: jax.Array, dtype: Any) -> jax.Array:
  return x @ params[name]['kernel'].astype(dtype) + params[name]['bias'].astype(dtype)


def fc_head(params: dict, x: jax.Array, dtype: Any) -> jax.Array:
  """The eval-mode classifier fc6 - ReLU - fc7 - ReLU - fc8 (`classifier_0/3/6`, dropout off)
  on flattened features [N, D] -> logits [N, K] (float32); shared by VGG and AlexNet."""
  names = [n for n in params if n.startswith('classifier_')]
  names.sort(key=lambda n: int(n.split('_')[1]))
  for name in names[:-1]:
    x = nn.relu(_dense(params, name, x, dtype))
  return _dense(params, names[-1], x, dtype).astype(jnp.promote_types(dtype, jnp.float32))


def head_fn(model: CustomCNN, variables: dict):
  """features (conv5 after its ReLU) [N, h, w, C] -> logits [N, K]: pool5, fc6, fc7, fc8 (for
  Grad-CAM beside paper 003's activation maps)."""
  params = variables['params']

  def fn(features: jax.Array) -> jax.Array:
    x = features.astype(model.dtype)
    if model.pool5:
      x = max_pool(x, 3, 2)
    return fc_head(params, flatten_nhwc(x), model.dtype)

  return fn
