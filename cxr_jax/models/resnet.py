"""ResNet-18/34/50/101/152 (He et al. 2016) in torchvision's layout, with optional SE blocks.

Module and parameter names follow torchvision's (`layer1_0/conv1`, `layer1_0/downsample_conv`,
`fc`, ...; the stem's `conv1`/`bn1` are `stem_conv`/`stem_bn` here, since `conv1` names the sown
map) so that `from_torchvision` is a renaming plus transposes. Parameter counts equal
torchvision's (resnet50: 25,557,032 with 1000 classes).

Two switches beyond torchvision:
- `stride_in_1x1=True` puts a bottleneck's stride in its first 1x1 convolution (the original
  Caffe / Keras `ResNet50` layout, "v1"); torchvision (and "v1.5") strides in the 3x3.
  Basic blocks (ResNet-18/34) have no 1x1 and are unaffected.
- `se_reduction=r > 0` adds squeeze-and-excitation (Hu et al. 2018) to every residual block:
  global average pool -> FC(C/r) -> ReLU -> FC(C) -> sigmoid -> channel-wise scale of the
  residual branch, before the addition with the shortcut (paper 001's feature attention module,
  r = 16).
- `head='space_attention'` replaces GAP + `fc` by paper 001's space attention head
  (cxr_jax/attention/space_attention.py; `sam_pool` picks Fig. 4's placement of the pooling,
  `sam_normalize` ParseNet's branch normalisation, `sam_init` the classifier's initialisation).
- `head='disease_masks'` is paper 002's DM attention (cxr_jax/attention/disease_masks.py): GAP
  + dense on f'_c = psi_c f + f per class, psi = `disease_masks` [h, w, K] fixed; its
  parameters are `fc`'s, so a gap_dense classifier's checkpoint loads unchanged.
- `replace_stride_with_dilation=(False, False, True)` keeps layer4 at stride 16 with dilated 3x3
  convolutions (torchvision's option of the same name): a finer last feature map for heat maps
  (14 x 14 at 224 px) with the same parameters.

Intermediate maps sown into 'intermediates' (He et al.'s stage names): `conv1` (after the stem's
conv/BN/ReLU, before max-pooling, [B, H/2, W/2, 64]), `conv2_x` ... `conv5_x` (outputs of
torchvision's `layer1` ... `layer4`), `features` (= `conv5_x`, the last map before pooling)
and `pooled` ([B, C]). SE blocks sow their gates [B, C] as `<block>/se/gate`.
"""

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cxr_jax.attention import disease_masks as dm
from cxr_jax.attention import space_attention
from cxr_jax.attention.squeeze_excite import SqueezeExcite
from cxr_jax.models import MODELS, pooling
from cxr_jax.models.batch_norm import batch_norm
from cxr_jax.models.conv import Conv
from cxr_jax.models.heads import gap_dense_head_fn, gap_dense_score_map_fn

# Blocks per stage and block type, Table 1 of He et al.
RESNET_STAGES: dict[str, tuple[tuple[int, ...], bool]] = {
    'resnet18': ((2, 2, 2, 2), False),
    'resnet34': ((3, 4, 6, 3), False),
    'resnet50': ((3, 4, 6, 3), True),
    'resnet101': ((3, 4, 23, 3), True),
    'resnet152': ((3, 8, 36, 3), True),
}

# torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu') for every convolution.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


# torchvision pads symmetrically (dilation * (k // 2)); 'SAME' would pad (2, 3) for a stride-2
# 7x7 on an even input and shift every result by a pixel relative to the reference.
def _conv(features: int, k: int, stride: int, dtype: Any, name: str, dilation: int = 1,
          impl: str = 'xla') -> Conv:
  p = dilation * (k // 2)
  return Conv(features, (k, k), strides=stride, padding=((p, p), (p, p)),
              kernel_dilation=dilation, use_bias=False, kernel_init=conv_init, dtype=dtype,
              impl=impl, name=name)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions (ResNet-18/34); output channels = `features`."""

  features: int
  stride: int = 1
  se_reduction: int = 0
  stride_in_1x1: bool = False  # no 1x1 here; accepted so that both block types share a call
  dilation: int = 1
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32
  conv_impl: str = 'xla'  # see cxr_jax/models/conv.py
  bn_impl: str = 'auto'  # see cxr_jax/models/batch_norm.py

  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    bn = functools.partial(batch_norm, self.bn_axis_name, self.dtype, train=train,
                           impl=self.bn_impl)
    out_ch = self.features * self.expansion
    y = _conv(self.features, 3, self.stride, self.dtype, 'conv1', self.dilation,
              self.conv_impl)(x)
    y = bn('bn1', activation='relu')(y)
    y = _conv(self.features, 3, 1, self.dtype, 'conv2', self.dilation,
              self.conv_impl)(y)
    y = bn('bn2')(y)
    return _finish(self, x, y, out_ch, train)


class Bottleneck(nn.Module):
  """1x1 (reduce) -> 3x3 -> 1x1 (expand x4); stride in the 3x3 unless `stride_in_1x1`."""

  features: int
  stride: int = 1
  se_reduction: int = 0
  stride_in_1x1: bool = False
  dilation: int = 1
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32
  conv_impl: str = 'xla'  # see cxr_jax/models/conv.py
  bn_impl: str = 'auto'  # see cxr_jax/models/batch_norm.py

  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    bn = functools.partial(batch_norm, self.bn_axis_name, self.dtype, train=train,
                           impl=self.bn_impl)
    out_ch = self.features * self.expansion
    s1, s3 = (self.stride, 1) if self.stride_in_1x1 else (1, self.stride)
    y = _conv(self.features, 1, s1, self.dtype, 'conv1', impl=self.conv_impl)(x)
    y = bn('bn1', activation='relu')(y)
    y = _conv(self.features, 3, s3, self.dtype, 'conv2', self.dilation,
              self.conv_impl)(y)
    y = bn('bn2', activation='relu')(y)
    y = _conv(out_ch, 1, 1, self.dtype, 'conv3', impl=self.conv_impl)(y)
    y = bn('bn3')(y)
    return _finish(self, x, y, out_ch, train)


def _finish(block: BasicBlock | Bottleneck, x: jax.Array, y: jax.Array, out_ch: int,
            train: bool) -> jax.Array:
  """SE on the residual branch, projection shortcut where the shape changes, add, ReLU."""
  if block.se_reduction:
    y = SqueezeExcite(block.se_reduction, dtype=block.dtype, name='se')(y)
  if block.stride != 1 or x.shape[-1] != out_ch:
    x = _conv(out_ch, 1, block.stride, block.dtype, 'downsample_conv', impl=block.conv_impl)(x)
    x = batch_norm(block.bn_axis_name, block.dtype, 'downsample_bn', train,
                   impl=block.bn_impl)(x)
  return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet classifier: stem, four stages, global average pooling, dense head `fc`.

  Attributes:
    num_classes: outputs of the dense head.
    stage_sizes: residual blocks per stage.
    bottleneck: Bottleneck blocks (ResNet-50+) instead of basic blocks.
    stride_in_1x1: Caffe/Keras layout (stride in a bottleneck's first 1x1) instead of
      torchvision's (stride in the 3x3).
    se_reduction: 0 = no squeeze-and-excitation; r > 0 = SE with reduction r in every block.
    width: channels of the first stage (64); later stages double it.
    head: 'gap_dense' (GAP + `fc`) or 'space_attention' (paper 001, module `space_attention`).
    sam_pool: the space attention head's pooling placement ('after_classifier' or
      'before_classifier', Fig. 4 of paper 001).
    sam_normalize: the space attention head L2-normalises and scales each branch (ParseNet).
    sam_init: its classifier init: 'tied' (W_l = W_g), 'zeros' or 'lecun' (independent halves).
    sam_norm_scale: initial branch scale when `sam_normalize`.
    disease_masks: psi [h, w, K] of the 'disease_masks' head (paper 002), at the feature map's
      resolution (nested sequences; written into the config by the train_dm stage).
    replace_stride_with_dilation: per stage 2-4, dilate instead of striding (torchvision).
    dtype: compute dtype; parameters stay float32, logits are float32.
    bn_axis_name: mesh axis over which BatchNorm averages batch statistics while training.
    conv_impl: how convolutions are computed ('auto': 1x1 convolutions as matmuls on the CPU,
      where XLA's convolution gradients are slow; see cxr_jax/models/conv.py); same parameters.
    bn_impl: BatchNorm (+ the ReLU after it)'s training gradient: 'fused' (hand-written, two
      passes over the map), 'autodiff' (flax's) or 'auto' ('fused' on the CPU, 'autodiff'
      elsewhere); same parameters and values (cxr_jax/models/batch_norm.py).
  """

  num_classes: int
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  bottleneck: bool = True
  stride_in_1x1: bool = False
  se_reduction: int = 0
  width: int = 64
  head: str = 'gap_dense'
  sam_pool: str = 'after_classifier'
  sam_normalize: bool = False
  sam_init: str = 'tied'
  sam_norm_scale: float = space_attention.NORM_SCALE_INIT
  disease_masks: Any = ()
  replace_stride_with_dilation: Sequence[bool] = (False, False, False)
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  conv_impl: str = 'auto'
  bn_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False,
               return_features: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Maps images [B, H, W, C] (any C) to logits [B, num_classes] (float32).

    With `return_features`, returns (logits, features [B, H/32, W/32, 8 * width * expansion]).
    """
    block_cls = Bottleneck if self.bottleneck else BasicBlock
    if self.head not in HEADS:
      raise ValueError(f'ResNet head={self.head!r}; valid: {HEADS}')
    if len(self.replace_stride_with_dilation) != 3:
      raise ValueError('replace_stride_with_dilation needs 3 booleans (stages 2-4), got '
                       f'{self.replace_stride_with_dilation!r}')
    x = x.astype(self.dtype)
    x = _conv(self.width, 7, 2, self.dtype, 'stem_conv', impl=self.conv_impl)(x)
    x = batch_norm(self.bn_axis_name, self.dtype, 'stem_bn', train, activation='relu',
                   impl=self.bn_impl)(x)
    self.sow('intermediates', 'conv1', x)
    # Pads with -inf, as torch's MaxPool2d(3, 2, padding=1) does.
    x = pooling.max_pool(x, 3, 2, ((1, 1), (1, 1)))
    dilation = 1
    for i, n_blocks in enumerate(self.stage_sizes):
      stride, previous = (2 if i > 0 else 1), dilation
      if i > 0 and self.replace_stride_with_dilation[i - 1]:
        stride, dilation = 1, dilation * 2
      for j in range(n_blocks):
        # As torchvision: a dilated stage's first block keeps the previous dilation.
        x = block_cls(
            self.width * 2**i, stride=stride if j == 0 else 1,
            se_reduction=self.se_reduction, stride_in_1x1=self.stride_in_1x1,
            dilation=previous if j == 0 else dilation,
            bn_axis_name=self.bn_axis_name, dtype=self.dtype, conv_impl=self.conv_impl,
            bn_impl=self.bn_impl, name=f'layer{i + 1}_{j}',
        )(x, train=train)
      self.sow('intermediates', f'conv{i + 2}_x', x)
    self.sow('intermediates', 'features', x)
    features = x
    if self.head == 'space_attention':
      logits = space_attention.SpaceAttentionHead(
          self.num_classes, pool=self.sam_pool, normalize=self.sam_normalize,
          classifier_init=self.sam_init, norm_scale_init=self.sam_norm_scale, dtype=self.dtype,
          name='space_attention')(x)
      return (logits, features) if return_features else logits
    if self.head == 'disease_masks':
      logits = dm.DiseaseMaskHead(self.num_classes, self.disease_masks, dtype=self.dtype,
                                  name='fc')(x)
      logits = logits.astype(jnp.promote_types(self.dtype, jnp.float32))
      return (logits, features) if return_features else logits
    x = jnp.mean(x, axis=(1, 2))
    self.sow('intermediates', 'pooled', x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='fc')(x)
    logits = x.astype(jnp.promote_types(self.dtype, jnp.float32))  # bf16 -> f32 logits
    return (logits, features) if return_features else logits


HEADS = ('gap_dense', 'space_attention', 'disease_masks')


def head_fn(model: ResNet, variables: dict) -> Callable[[jax.Array], jax.Array]:
  """The classifier head alone: features [N, h, w, C] -> logits [N, K] (GAP + `fc`, or the
  space attention head), what feature-level explanations (PDA, Grad-CAM) re-evaluate."""
  if model.head == 'space_attention':
    return _space_attention_fn(model, variables, score_map=False)
  if model.head == 'disease_masks':
    return dm.head_fns(model.dtype, variables, model.disease_masks)[0]
  return gap_dense_head_fn(model.dtype, variables, 'fc')


def score_map_fn(model: ResNet, variables: dict) -> Callable[[jax.Array], jax.Array]:
  """features [N, h, w, C] -> class score maps [N, h, w, K] whose spatial mean is the logits:
  CAM (+ bias) for GAP + `fc`, the space attention head's class score map otherwise."""
  if model.head == 'space_attention':
    return _space_attention_fn(model, variables, score_map=True)
  if model.head == 'disease_masks':
    return dm.head_fns(model.dtype, variables, model.disease_masks)[1]
  return gap_dense_score_map_fn(model.dtype, variables, 'fc')


def _space_attention_fn(model: ResNet, variables: dict, *, score_map: bool
                        ) -> Callable[[jax.Array], jax.Array]:
  kernel, bias = space_attention.head_params(variables, ('space_attention',))
  scales = space_attention.head_scales(variables, ('space_attention',))
  if (scales is not None) != model.sam_normalize:
    # Silently dropping (or lacking) the branch scales would give maps the model never computes.
    raise ValueError(f'sam_normalize={model.sam_normalize} but the space attention parameters '
                     f'{"have" if scales is not None else "lack"} local_scale/global_scale')
  dtype = model.dtype

  def fn(features: jax.Array) -> jax.Array:
    scores = space_attention.class_score_map(features.astype(dtype), kernel.astype(dtype),
                                             bias.astype(dtype), scales)
    out = scores if score_map else jnp.mean(scores, axis=(1, 2))
    return out.astype(jnp.promote_types(dtype, jnp.float32))

  return fn


# One subclass per depth, registered by name, so that `build_model(name='resnet50')` works and
# the weight importer can find the architecture from the class.
@MODELS.register('resnet18')
class ResNet18(ResNet):
  stage_sizes: Sequence[int] = RESNET_STAGES['resnet18'][0]
  bottleneck: bool = False


@MODELS.register('resnet34')
class ResNet34(ResNet):
  stage_sizes: Sequence[int] = RESNET_STAGES['resnet34'][0]
  bottleneck: bool = False


@MODELS.register('resnet50')
class ResNet50(ResNet):
  stage_sizes: Sequence[int] = RESNET_STAGES['resnet50'][0]
  bottleneck: bool = True


@MODELS.register('resnet101')
class ResNet101(ResNet):
  stage_sizes: Sequence[int] = RESNET_STAGES['resnet101'][0]
  bottleneck: bool = True


@MODELS.register('resnet152')
class ResNet152(ResNet):
  stage_sizes: Sequence[int] = RESNET_STAGES['resnet152'][0]
  bottleneck: bool = True


RESNETS: dict[str, type[ResNet]] = {
    'resnet18': ResNet18, 'resnet34': ResNet34, 'resnet50': ResNet50,
    'resnet101': ResNet101, 'resnet152': ResNet152,
}


# --- torchvision weight import ----------------------------------------------------------------

_PARAM_NAMES = {('params', 'kernel'): 'weight', ('params', 'scale'): 'weight',
                ('params', 'bias'): 'bias', ('batch_stats', 'mean'): 'running_mean',
                ('batch_stats', 'var'): 'running_var'}


def convert_torchvision(state_dict: Mapping[str, Any], template: Mapping[str, Any],
                        module_key: Callable[[tuple[str, ...]], str], *, first_conv: str,
                        ignore: Sequence[str] = (), in_channels: int = 3) -> dict[str, Any]:
  """Fills `template` (flax variable shapes) from a torchvision state_dict, strictly.

  Args:
    state_dict: torch name -> array (numpy, or CPU torch tensors).
    template: {'params': ..., 'batch_stats': ...} of ShapeDtypeStructs (`jax.eval_shape(init)`).
    module_key: flax module path -> torch module name ('layer1_0', 'conv1') -> 'layer1.0.conv1'.
    first_conv: torch name of the input convolution's weight, which `in_channels` may adapt.
    ignore: torch names to skip silently (a dropped head).
    in_channels: input channels of the flax model; 1 with 3-channel weights sums the first
      convolution over RGB (a grey image fed as R = G = B gives the same activations).

  Returns:
    {'params': ..., 'batch_stats': ...} of float32 numpy arrays. Conv kernels go OIHW -> HWIO,
    dense kernels [out, in] -> [in, out], BN weight/bias -> scale/bias, running_mean/var ->
    batch_stats mean/var; `num_batches_tracked` is ignored.

  Raises:
    ValueError listing every missing, unexpected and wrongly shaped tensor.
  """
  out: dict[str, Any] = {}
  used, missing, wrong = set(), [], []
  for path, leaf in jax.tree_util.tree_flatten_with_path(dict(template))[0]:
    names = tuple(k.key for k in path)
    collection, modules, leaf_name = names[0], names[1:-1], names[-1]
    key = f'{module_key(modules)}.{_PARAM_NAMES[collection, leaf_name]}'
    if key not in state_dict:
      missing.append(key)
      continue
    used.add(key)
    value = np.asarray(state_dict[key], dtype=np.float32)
    if key == first_conv and value.ndim == 4 and value.shape[1] != in_channels and \
        in_channels == 1:
      value = value.sum(axis=1, keepdims=True)
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    elif value.ndim == 2:
      value = value.T  # Linear [out, in] -> Dense [in, out]
    if value.shape != tuple(leaf.shape):
      wrong.append(f'{key}: {tuple(np.shape(state_dict[key]))} in the file, flax expects '
                   f'{tuple(leaf.shape)} ({"HWIO" if value.ndim == 4 else "[in, out]"})')
      continue
    node = out
    for name in names[:-1]:
      node = node.setdefault(name, {})
    node[names[-1]] = np.ascontiguousarray(value)
  unexpected = sorted(k for k in state_dict
                      if k not in used and k not in ignore and
                      not k.endswith('num_batches_tracked'))
  if missing or unexpected or wrong:
    lines = ([f'missing ({len(missing)}): {", ".join(missing)}'] if missing else []) + \
        ([f'unexpected ({len(unexpected)}): {", ".join(unexpected)}'] if unexpected else []) + \
        ([f'wrong shape ({len(wrong)}): {"; ".join(wrong)}'] if wrong else [])
    raise ValueError('state_dict does not match the model:\n  ' + '\n  '.join(lines))
  return out


def resnet_arch(state_dict: Mapping[str, Any]) -> str:
  """The torchvision ResNet depth ('resnet50', ...) whose layout `state_dict` has."""
  counts = [len({m.group(1) for k in state_dict if (m := re.match(rf'layer{i}\.(\d+)\.', k))})
            for i in range(1, 5)]
  bottleneck = 'layer1.0.conv3.weight' in state_dict
  for arch, (stages, is_bottleneck) in RESNET_STAGES.items():
    if tuple(counts) == stages and bottleneck == is_bottleneck:
      return arch
  raise ValueError(f'state_dict is no torchvision ResNet: blocks per stage {counts}, '
                   f'{"bottleneck" if bottleneck else "basic"} blocks; known: '
                   f'{ {a: s for a, (s, _) in RESNET_STAGES.items()} }')


def _resnet_module_key(modules: tuple[str, ...]) -> str:
  # ('layer1_0', 'downsample_conv') -> 'layer1.0.downsample.0'
  name = {'stem_conv': 'conv1', 'stem_bn': 'bn1'}.get('.'.join(modules), '.'.join(modules))
  name = re.sub(r'layer(\d)_(\d+)', r'layer\1.\2', name)
  return name.replace('downsample_conv', 'downsample.0').replace('downsample_bn', 'downsample.1')


@functools.lru_cache(maxsize=8)
def _template(arch: str, num_classes: int, in_channels: int) -> Any:
  # Tracing the deeper models takes seconds; importers call this repeatedly with the same args.
  model = RESNETS[arch](num_classes=num_classes)
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, in_channels))))


def from_torchvision(state_dict: Mapping[str, Any], *, num_classes: int | None = None,
                     drop_head: bool = False, in_channels: int = 3,
                     arch: str | None = None) -> dict[str, Any]:
  """Flax variables for `RESNETS[arch](num_classes)` from a torchvision ResNet state_dict.

  Args:
    state_dict: torchvision `resnetXX().state_dict()` as {name: array}.
    num_classes: classes of the flax model; None = those of the file's `fc`. A different
      number needs `drop_head=True`.
    drop_head: leave out `fc`: the returned variables lack params['fc'], which the caller
      initialises: `v = model.init(...); v['params'] = {**v['params'], **imported['params']}`
      (`fc` is a top-level key), `v['batch_stats'] = imported['batch_stats']`.
    in_channels: 3, or 1 to sum the first convolution over RGB.
    arch: expected depth ('resnet50'); None = found from the file (`resnet_arch`).

  Returns:
    {'params': ..., 'batch_stats': ...} (float32 numpy) for `ResNet(stride_in_1x1=False,
    se_reduction=0)`; `model.apply(v, x_nhwc)` equals torchvision's `model(x_nchw)` in eval mode.
  """
  found = resnet_arch(state_dict)
  if arch is not None and arch != found:
    raise ValueError(f'state_dict holds a {found}, not a {arch}')
  head = ('fc.weight', 'fc.bias')
  if num_classes is None:
    if 'fc.weight' not in state_dict and not drop_head:
      raise ValueError('state_dict has no fc.weight: pass num_classes and drop_head=True')
    num_classes = np.shape(state_dict['fc.weight'])[0] if 'fc.weight' in state_dict else 1
  elif 'fc.weight' in state_dict and not drop_head and \
      np.shape(state_dict['fc.weight'])[0] != num_classes:
    raise ValueError(f'state_dict has {np.shape(state_dict["fc.weight"])[0]} classes, not '
                     f'{num_classes}: pass drop_head=True to re-initialise the head')
  template = _template(found, num_classes, in_channels)
  template = {'params': dict(template['params']), 'batch_stats': template['batch_stats']}
  if drop_head:
    del template['params']['fc']
  return convert_torchvision(state_dict, template, _resnet_module_key, first_conv='conv1.weight',
                             ignore=head if drop_head else (), in_channels=in_channels)
