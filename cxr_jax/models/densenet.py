"""DenseNet-121/161/169/201 (Huang et al. 2017) in torchvision's layout (paper 004, CheXNet).

Stem (7x7/2 conv `conv0`, `norm0`, ReLU, 3x3/2 max-pool), four dense blocks of BN-ReLU-1x1
(bn_size * growth) - BN-ReLU-3x3 (growth) layers whose outputs are concatenated, transitions
(BN-ReLU-1x1 halving the channels, 2x2 average pool) between them, a final BatchNorm `norm5`
and ReLU, global average pooling and the dense head `classifier`. Module names are
torchvision's (`dense_block1/denselayer1/norm1`, `transition1/conv`, ...; the blocks are
`dense_block<i>` here since `denseblock<i>` names the sown maps, and torchvision keeps all but
the classifier under `features.`), so parameter counts equal torchvision's (densenet121:
7,978,856 with 1000 classes) and `from_torchvision` is a renaming plus transposes.

Intermediate maps sown into 'intermediates': `stem` (after the stem's ReLU, before pooling),
`denseblock1` ... `denseblock4` (outputs of the dense blocks, before the transitions), `features`
(after `norm5` and ReLU, the last map before pooling, as torchvision's `forward` computes it)
and `pooled` ([B, C]).

Paper 004 (Fang et al.) switches, off by default (parameters and outputs are then torchvision's):
- `input_attention='multiscale'`: the multi-scale spatial attention on the input image
  (cxr_jax/attention/multiscale.py, parameters under `msa`; its map is sown as 'msa_map');
- `feature_weighting=True`: the model takes the lung/heart masks of its input
  (`masks=` [B, H, W, S], config.data.inputs=('masks',)) and multiplies the pooled global mask
  M_g into the last feature map, F_l = F_g (x) M_g (cxr_jax/attention/feature_weighting.py);
  with `fw_sigmoid` (the released code) F_g is sigmoid(norm5 output) instead of its ReLU.
  `features` is then F_l (what CAM and the head see) and `global_features` F_g.
"""

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cxr_jax.attention.feature_weighting import weigh_features
from cxr_jax.attention.multiscale import MultiScaleAttention
from cxr_jax.models import MODELS, pooling
from cxr_jax.models.batch_norm import batch_norm
from cxr_jax.models.conv import Conv
from cxr_jax.models.heads import gap_dense_head_fn, gap_dense_score_map_fn
from cxr_jax.models.resnet import convert_torchvision

# (growth rate, block config, stem channels) of torchvision's DenseNets.
DENSENET_CONFIGS: dict[str, tuple[int, tuple[int, ...], int]] = {
    'densenet121': (32, (6, 12, 24, 16), 64),
    'densenet161': (48, (6, 12, 36, 24), 96),
    'densenet169': (32, (6, 12, 32, 32), 64),
    'densenet201': (32, (6, 12, 48, 32), 64),
}

# torchvision: nn.init.kaiming_normal_ (fan_in, gain sqrt(2)) for every convolution.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')


def _conv(features: int, k: int, stride: int, dtype: Any, name: str, impl: str = 'xla') -> Conv:
  # Symmetric k // 2 padding as torch's, not 'SAME' (which pads (2, 3) for the 7x7/2 stem).
  return Conv(features, (k, k), strides=stride, padding=((k // 2, k // 2),) * 2,
              use_bias=False, kernel_init=conv_init, dtype=dtype, impl=impl, name=name)


def _bn_relu(module: nn.Module, train: bool) -> Callable[[str], nn.Module]:
  """name -> BatchNorm fused with the ReLU after it (cxr_jax/models/batch_norm.py)."""
  return functools.partial(batch_norm, module.bn_axis_name, module.dtype, train=train,
                           activation='relu', impl=module.bn_impl)


class DenseLayer(nn.Module):
  """BN-ReLU-1x1 conv (bn_size * k) - BN-ReLU-3x3 conv (k = growth): [B,H,W,C] -> [B,H,W,k]."""

  growth_rate: int = 32
  bn_size: int = 4
  drop_rate: float = 0.0
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32
  conv_impl: str = 'xla'  # see cxr_jax/models/conv.py
  bn_impl: str = 'auto'  # see cxr_jax/models/batch_norm.py

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    bn_relu = _bn_relu(self, train)
    y = bn_relu('norm1')(x)
    y = _conv(self.bn_size * self.growth_rate, 1, 1, self.dtype, 'conv1', self.conv_impl)(y)
    y = bn_relu('norm2')(y)
    y = _conv(self.growth_rate, 3, 1, self.dtype, 'conv2', self.conv_impl)(y)
    return nn.Dropout(self.drop_rate, deterministic=not train)(y)


class DenseBlock(nn.Module):
  """`num_layers` dense layers, each fed the concatenation of the input and all earlier outputs."""

  num_layers: int
  growth_rate: int = 32
  bn_size: int = 4
  drop_rate: float = 0.0
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32
  conv_impl: str = 'xla'  # see cxr_jax/models/conv.py
  bn_impl: str = 'auto'  # see cxr_jax/models/batch_norm.py

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    for i in range(1, self.num_layers + 1):
      y = DenseLayer(self.growth_rate, self.bn_size, self.drop_rate, self.bn_axis_name,
                     self.dtype, conv_impl=self.conv_impl, bn_impl=self.bn_impl,
                     name=f'denselayer{i}')(x, train=train)
      x = jnp.concatenate([x, y], axis=-1)
    return x


class Transition(nn.Module):
  """BN-ReLU-1x1 conv to `features` channels, then 2x2/2 average pooling."""

  features: int
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32
  conv_impl: str = 'xla'
  bn_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = _bn_relu(self, train)('norm')(x)
    x = _conv(self.features, 1, 1, self.dtype, 'conv', self.conv_impl)(x)
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class DenseNet(nn.Module):
  """DenseNet classifier (torchvision layout) with a GAP + dense head `classifier`.

  Attributes:
    num_classes: outputs of the dense head (14 for CheXNet).
    growth_rate: channels each dense layer adds (k = 32; 48 for DenseNet-161).
    block_config: dense layers per block.
    num_init_features: channels of the stem convolution.
    bn_size: bottleneck width of a dense layer's 1x1 convolution, in multiples of growth_rate.
    drop_rate: dropout after every dense layer (torchvision's default 0).
    dtype: compute dtype; parameters stay float32, logits are float32.
    bn_axis_name: mesh axis over which BatchNorm averages batch statistics while training.
    input_attention: '' or 'multiscale' (paper 004's MSA on the input image).
    msa_stride: the MSA convolutions' stride: 1 (released code) or 2 (the paper's text).
    feature_weighting: paper 004's F_l = F_g (x) M_g; needs `masks`.
    fw_sigmoid: F_g = sigmoid(norm5 output) as the released code (else the ReLU features).
    fw_binarize: binarise the pooled global mask at 0.5 (released code's `ge(0.5)`).
    mask_channels: S, the structures of `masks` (left lung, right lung, heart).
    conv_impl: how convolutions are computed ('auto': 1x1 convolutions as matmuls on the CPU,
      where XLA's convolution gradients are slow; see cxr_jax/models/conv.py); same parameters.
    bn_impl: BatchNorm (+ the ReLU after it)'s training gradient: 'fused' (hand-written, two
      passes over the map), 'autodiff' (flax's) or 'auto' ('fused' on the CPU, 'autodiff'
      elsewhere); same parameters and values (cxr_jax/models/batch_norm.py).
  """

  num_classes: int
  growth_rate: int = 32
  block_config: Sequence[int] = (6, 12, 24, 16)
  num_init_features: int = 64
  bn_size: int = 4
  drop_rate: float = 0.0
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  input_attention: str = ''
  msa_stride: int = 1
  feature_weighting: bool = False
  fw_sigmoid: bool = True
  fw_binarize: bool = True
  mask_channels: int = 3
  conv_impl: str = 'auto'
  bn_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False,
               masks: jax.Array | None = None) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Maps images [B, H, W, C] (any C) to logits [B, num_classes] (float32).

    With `return_features`, returns (logits, features [B, H/32, W/32, C']), `features` being
    the map after `norm5` and ReLU (1024 channels for DenseNet-121), or F_l with feature
    weighting. `masks` [B, H, W, mask_channels]: the input's lung/heart masks (feature
    weighting only).
    """
    if self.input_attention not in ('', 'multiscale'):
      raise ValueError(f"input_attention={self.input_attention!r}: expected '' or 'multiscale'.")
    if self.feature_weighting:
      want = (*x.shape[:3], self.mask_channels)
      if masks is None or tuple(masks.shape) != want:
        got = 'none' if masks is None else tuple(masks.shape)
        raise ValueError(
            f'DenseNet(feature_weighting=True) needs the lung/heart masks of its input, '
            f'masks= of shape {want} (config.data.inputs=(\'masks\',), masks from the segment '
            f'stage), got {got}.')
    elif masks is not None:
      raise ValueError('masks= given to a DenseNet without feature_weighting.')
    if self.input_attention == 'multiscale':
      x = MultiScaleAttention(stride=self.msa_stride, dtype=self.dtype, name='msa')(x)
    x = x.astype(self.dtype)
    x = _conv(self.num_init_features, 7, 2, self.dtype, 'conv0', self.conv_impl)(x)
    x = _bn_relu(self, train)('norm0')(x)
    self.sow('intermediates', 'stem', x)
    # Pads with -inf, as torch's MaxPool2d(3, 2, padding=1) does.
    x = pooling.max_pool(x, 3, 2, ((1, 1), (1, 1)))
    for i, num_layers in enumerate(self.block_config, start=1):
      x = DenseBlock(num_layers, self.growth_rate, self.bn_size, self.drop_rate,
                     self.bn_axis_name, self.dtype, conv_impl=self.conv_impl,
                     bn_impl=self.bn_impl, name=f'dense_block{i}')(x, train=train)
      self.sow('intermediates', f'denseblock{i}', x)
      if i < len(self.block_config):
        x = Transition(x.shape[-1] // 2, self.bn_axis_name, self.dtype,
                       conv_impl=self.conv_impl, bn_impl=self.bn_impl,
                       name=f'transition{i}')(x, train=train)
    x = batch_norm(self.bn_axis_name, self.dtype, 'norm5', train, impl=self.bn_impl)(x)
    if self.feature_weighting:
      x = nn.sigmoid(x) if self.fw_sigmoid else nn.relu(x)
      self.sow('intermediates', 'global_features', x)
      x = weigh_features(x, masks, binarize=self.fw_binarize)
    else:
      x = nn.relu(x)
    self.sow('intermediates', 'features', x)
    features = x
    x = jnp.mean(x, axis=(1, 2))
    self.sow('intermediates', 'pooled', x)
    # torchvision initialises the classifier's bias to 0 (its weight keeps Linear's default).
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='classifier')(x)
    logits = x.astype(jnp.promote_types(self.dtype, jnp.float32))  # bf16 -> f32 logits
    return (logits, features) if return_features else logits


def head_fn(model: DenseNet, variables: dict) -> Callable[[jax.Array], jax.Array]:
  """The classifier head alone: features [N, h, w, C] -> logits [N, K] (GAP + `classifier`), what
  feature-level explanations (PDA, CAM) re-evaluate."""
  return gap_dense_head_fn(model.dtype, variables, 'classifier')


def score_map_fn(model: DenseNet, variables: dict) -> Callable[[jax.Array], jax.Array]:
  """features [N, h, w, C] -> class score maps [N, h, w, K] (CAM + bias; mean = logits)."""
  return gap_dense_score_map_fn(model.dtype, variables, 'classifier')


# One subclass per depth, registered by name (`build_model(name='densenet121')`).
@MODELS.register('densenet121')
class DenseNet121(DenseNet):
  growth_rate: int = 32
  block_config: Sequence[int] = (6, 12, 24, 16)
  num_init_features: int = 64


@MODELS.register('densenet161')
class DenseNet161(DenseNet):
  growth_rate: int = 48
  block_config: Sequence[int] = (6, 12, 36, 24)
  num_init_features: int = 96


@MODELS.register('densenet169')
class DenseNet169(DenseNet):
  growth_rate: int = 32
  block_config: Sequence[int] = (6, 12, 32, 32)
  num_init_features: int = 64


@MODELS.register('densenet201')
class DenseNet201(DenseNet):
  growth_rate: int = 32
  block_config: Sequence[int] = (6, 12, 48, 32)
  num_init_features: int = 64


DENSENETS: dict[str, type[DenseNet]] = {
    'densenet121': DenseNet121, 'densenet161': DenseNet161,
    'densenet169': DenseNet169, 'densenet201': DenseNet201,
}

# Checkpoints saved before PyTorch 0.4 (torchvision's own densenet*-*.pth files) name the
# dense layers' modules 'norm.1', 'conv.2'; torchvision renames them with this pattern on load.
_OLD_KEY = re.compile(
    r'^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$')


def densenet_arch(state_dict: Mapping[str, Any]) -> str:
  """The torchvision DenseNet ('densenet121', ...) whose layout `state_dict` has."""
  counts = tuple(
      len({m.group(1) for k in state_dict
           if (m := re.match(rf'features\.denseblock{i}\.denselayer(\d+)\.', k))})
      for i in range(1, 5))
  for arch, (_, blocks, _) in DENSENET_CONFIGS.items():
    if counts == blocks:
      return arch
  raise ValueError(f'state_dict is no torchvision DenseNet: layers per block {counts}; known: '
                   f'{ {a: b for a, (_, b, _) in DENSENET_CONFIGS.items()} }')


def _densenet_module_key(modules: tuple[str, ...]) -> str:
  name = re.sub(r'^dense_block', 'denseblock', '.'.join(modules))
  return name if name == 'classifier' else f'features.{name}'


@functools.lru_cache(maxsize=8)
def _template(arch: str, num_classes: int, in_channels: int) -> Any:
  # Tracing the deeper models takes seconds; importers call this repeatedly with the same args.
  model = DENSENETS[arch](num_classes=num_classes)
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, in_channels))))


def from_torchvision(state_dict: Mapping[str, Any], *, num_classes: int | None = None,
                     drop_head: bool = False, in_channels: int = 3,
                     arch: str | None = None) -> dict[str, Any]:
  """Flax variables for `DENSENETS[arch](num_classes)` from a torchvision DenseNet state_dict.

  Args:
    state_dict: torchvision `densenetXXX().state_dict()` as {name: array}; pre-0.4 key names
      ('denselayer1.norm.1.weight') are accepted and renamed as torchvision does.
    num_classes: classes of the flax model; None = those of the file's `classifier`. A different
      number needs `drop_head=True`.
    drop_head: leave out `classifier`: the returned variables lack params['classifier'], which
      the caller initialises: `v = model.init(...); v['params'] = {**v['params'],
      **imported['params']}` (`classifier` is a top-level key), `v['batch_stats'] =
      imported['batch_stats']`.
    in_channels: 3, or 1 to sum the first convolution over RGB.
    arch: expected model ('densenet121'); None = found from the file (`densenet_arch`).

  Returns:
    {'params': ..., 'batch_stats': ...} (float32 numpy); `model.apply(v, x_nhwc)` equals
    torchvision's `model(x_nchw)` in eval mode.
  """
  state_dict = {_OLD_KEY.sub(r'\1\2', k): v for k, v in state_dict.items()}
  found = densenet_arch(state_dict)
  if arch is not None and arch != found:
    raise ValueError(f'state_dict holds a {found}, not a {arch}')
  head = ('classifier.weight', 'classifier.bias')
  file_classes = np.shape(state_dict[head[0]])[0] if head[0] in state_dict else None
  if num_classes is None:
    if file_classes is None and not drop_head:
      raise ValueError('state_dict has no classifier.weight: pass num_classes and drop_head=True')
    num_classes = file_classes or 1
  elif file_classes is not None and file_classes != num_classes and not drop_head:
    raise ValueError(f'state_dict has {file_classes} classes, not {num_classes}: pass '
                     'drop_head=True to re-initialise the head')
  template = _template(found, num_classes, in_channels)
  template = {'params': dict(template['params']), 'batch_stats': template['batch_stats']}
  if drop_head:
    del template['params']['classifier']
  return convert_torchvision(state_dict, template, _densenet_module_key,
                             first_conv='features.conv0.weight',
                             ignore=head if drop_head else (), in_channels=in_channels)
