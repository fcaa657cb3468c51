"""Imports ImageNet weights from torchvision `.pth` and Keras `.h5` files into cxr_jax models.

  model, variables = pretrained.load('resnet50-11ad3fa6.pth', source='torchvision',
                                     arch='resnet50')
  logits = model.apply(variables, images_nhwc, train=False)   # torchvision's logits

torchvision state dicts are read without torch: a `.pth` file is a zip of one pickle (the dict
of tensors, whose storages are "persistent ids") and one raw little-endian record per storage;
`read_pth` unpickles it with an allow-list (OrderedDict, torch's `_rebuild_tensor_v2` and the
typed storage classes) and rebuilds every tensor as a numpy array. Anything else in the pickle
(a whole pickled `nn.Module`, arbitrary callables) is refused before it is imported, let alone
called. The legacy (pre-1.6) format that some torchvision files still use is read the same way
(its header and footer records too). A refused, truncated or foreign file raises
`WeightsFileError` naming the file.

A new classifier head (`num_classes` other than the file's, or `drop_head=True`) is initialised
by `model.init` with `key`: every other tensor comes from the file, and `classifier_paths(model)` /
`merge_pretrained(fresh, pretrained, skip=...)` let a training run put its own initialisation of
the head in instead (what `config.init_from` does with an imported checkpoint).
"""

import collections
import dataclasses
import hashlib
import importlib
import json
import pickle
import zipfile
from collections.abc import Callable
from typing import Any, BinaryIO

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from etils import epath

from cxr_jax.models import MODELS
from cxr_jax.models.mobilenet import MOBILENET_V1_BLOCKS

StateDict = dict[str, np.ndarray]
Variables = dict[str, Any]

# ----------------------------------------------------------------------------------------------
# torchvision .pth files, without torch.

_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8,
    'BoolStorage': np.bool_,
}


class WeightsFileError(ValueError, pickle.UnpicklingError):
  """A weights file that is refused (its pickle would build more than tensors) or cannot be read
  (truncated, not a torch file); the message names the file and what was expected."""


class _Refused(pickle.UnpicklingError):
  """The pickle asks for something a state dict never holds; `read_pth` adds the file name."""


@dataclasses.dataclass
class _Storage:
  """A storage named in the pickle; its bytes are attached once read (zip or legacy tail)."""

  dtype: Any
  key: str
  numel: int | None = None
  data: np.ndarray | None = None


@dataclasses.dataclass
class _LazyTensor:
  """What `_rebuild_tensor_v2` returns while the storages may still be unread."""

  storage: _Storage
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]

  def materialise(self) -> np.ndarray:
    flat = self.storage.data
    if flat is None:
      raise ValueError(f'storage {self.storage.key!r} was never read from the file')
    if not self.size:
      return flat[self.offset:self.offset + 1].reshape(()).copy()
    span = self.offset + 1 + sum((n - 1) * s for n, s in zip(self.size, self.stride, strict=True)
                                   if n > 0)
    if min(self.size) > 0 and span > flat.size:
      raise ValueError(f'tensor of size {self.size} stride {self.stride} runs past its storage '
                       f'{self.storage.key!r} ({flat.size} elements)')
    view = np.lib.stride_tricks.as_strided(
        flat[self.offset:], shape=self.size,
        strides=tuple(s * flat.itemsize for s in self.stride), writeable=False)
    return np.array(view)  # contiguous copy, independent of the storage


class _StorageType:
  """Stands in for `torch.FloatStorage` and friends: only its dtype matters."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _STORAGE_DTYPES[name]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata  # irrelevant for weights
  return _LazyTensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles a state dict: tensors become `_LazyTensor`s; nothing else may be built."""

  def __init__(self, file: BinaryIO, storage_for: Callable[[tuple], _Storage]):
    super().__init__(file, encoding='utf-8')
    self._storage_for = storage_for

  def find_class(self, module: str, name: str) -> Any:
    if module == 'collections' and name == 'OrderedDict':
      return collections.OrderedDict
    if module == 'torch._utils' and name == '_rebuild_tensor_v2':
      return _rebuild_tensor_v2
    if module == 'torch._utils' and name == '_rebuild_parameter':
      return _rebuild_parameter
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise _Refused(
        f'refusing to unpickle {module}.{name}: only state dicts of plain tensors can be read '
        'without torch (save `model.state_dict()`, not the model)')

  def persistent_load(self, pid: Any) -> Any:
    if not isinstance(pid, tuple) or not pid or pid[0] != 'storage':
      raise _Refused(f'unsupported persistent id {pid!r}')
    return self._storage_for(pid)


def _no_storage(pid: tuple) -> _Storage:
  raise _Refused(f'unexpected storage {pid!r} outside the state dict')


def _load_plain(f: BinaryIO) -> Any:
  """One pickle record of plain values (the legacy format's magic number, sys info, keys).

  Never `pickle.load`: these records come from the same untrusted file as the state dict.
  """
  return _RestrictedUnpickler(f, _no_storage).load()


def _storage_type(value: Any) -> _StorageType:
  if not isinstance(value, _StorageType):
    raise _Refused(f'unsupported storage type {value!r}')
  return value


def _read_zip(path: epath.Path) -> Any:
  with zipfile.ZipFile(path.open('rb')) as zf:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith('/data.pkl') or n == 'data.pkl']
    if len(pkl) != 1:
      raise WeightsFileError(f'{path}: not a torch zip checkpoint (data.pkl entries: {pkl})')
    prefix = pkl[0][:-len('data.pkl')]
    order = 'little'
    if f'{prefix}byteorder' in names:
      order = zf.read(f'{prefix}byteorder').decode().strip()
    storages: dict[str, _Storage] = {}

    def storage_for(pid: tuple) -> _Storage:
      # ('storage', storage_type, key, location, numel)
      _, stype, key, _, numel = pid[:5]
      if key not in storages:
        storages[key] = _Storage(_storage_type(stype).dtype, str(key), int(numel))
      return storages[key]

    with zf.open(pkl[0]) as f:
      obj = _RestrictedUnpickler(f, storage_for).load()
    for key, storage in storages.items():
      raw = zf.read(f'{prefix}data/{key}')
      dtype = np.dtype(storage.dtype).newbyteorder('<' if order == 'little' else '>')
      storage.data = np.frombuffer(raw, dtype=dtype).astype(np.dtype(storage.dtype), copy=False)
  return obj


_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


def _read_legacy(path: epath.Path) -> Any:
  """torch's pre-1.6 format: magic, protocol, sys info, the object, storage keys, raw data."""
  with path.open('rb') as f:
    if _load_plain(f) != _LEGACY_MAGIC:
      raise WeightsFileError(f'{path}: neither a torch zip checkpoint nor a legacy torch file')
    _load_plain(f)  # protocol version
    sys_info = _load_plain(f)
    if not sys_info.get('little_endian', True):
      raise WeightsFileError(f'{path}: big-endian legacy torch files are not supported')
    storages: dict[str, _Storage] = {}

    def storage_for(pid: tuple) -> _Storage:
      # ('storage', storage_type, root_key, location, numel, view_metadata)
      _, stype, key, _, numel, view = pid[:6]
      if view is not None:
        raise _Refused('storage views are not supported')
      if key not in storages:
        storages[key] = _Storage(_storage_type(stype).dtype, str(key), int(numel))
      return storages[key]

    obj = _RestrictedUnpickler(f, storage_for).load()
    keys = _load_plain(f)
    for key in keys:
      storage = storages[key]
      numel = int(np.frombuffer(f.read(8), '<i8')[0])
      itemsize = np.dtype(storage.dtype).itemsize
      storage.data = np.frombuffer(f.read(numel * itemsize), dtype=storage.dtype)
  return obj


def read_pth(path: str | epath.PathLike) -> StateDict:
  """Reads a torch-saved state dict as {name: np.ndarray}, without importing torch.

  Accepts the zip format (torch >= 1.6) and the legacy format; a dict wrapping the state dict
  under 'state_dict' or 'model' is unwrapped. Raises `WeightsFileError` (a ValueError and a
  pickle.UnpicklingError) naming the file on anything that is not a complete dict of tensors.
  """
  path = epath.Path(path)
  try:
    with path.open('rb') as f:
      is_zip = f.read(4) == b'PK\x03\x04'
    obj = _read_zip(path) if is_zip else _read_legacy(path)
    for wrapper in ('state_dict', 'model'):
      if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
        obj = obj[wrapper]
    if not isinstance(obj, dict):
      raise WeightsFileError(f'{path}: expected a state dict, found {type(obj).__name__}')
    out = {}
    for name, value in obj.items():
      if not isinstance(value, _LazyTensor):
        raise WeightsFileError(f'{path}: entry {name!r} is a {type(value).__name__}, not a tensor')
      out[name] = value.materialise()
  except WeightsFileError:
    raise
  except _Refused as e:
    raise WeightsFileError(f'{path}: {e}') from None
  # What zipfile, pickle and numpy raise on a cut-off or foreign file, without naming it.
  except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, IndexError, KeyError,
          ValueError) as e:
    raise WeightsFileError(
        f'{path}: truncated or not a torch checkpoint ({type(e).__name__}: {e}); expected a '
        'complete file written by torch.save(model.state_dict())') from e
  return out


def read_pth_with_torch(path: str | epath.PathLike) -> StateDict:
  """The same as `read_pth` through `torch.load(weights_only=True)` (needs the torch extra)."""
  try:
    import torch  # noqa: PLC0415  (optional dependency)
  except ImportError:
    raise ImportError('reading with torch needs `pip install cxr-jax[torch]`') from None
  try:
    sd = torch.load(str(path), map_location='cpu', weights_only=True)
  # weights_only refusals are UnpicklingErrors; a cut-off zip is a RuntimeError of its reader.
  except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
    raise WeightsFileError(f'{path}: torch.load(weights_only=True) cannot read it: {e}') from e
  return {k: v.detach().cpu().numpy() for k, v in sd.items()}


# ----------------------------------------------------------------------------------------------
# Keras .h5 / .weights.h5 files.


def read_keras_h5(path: str | epath.PathLike) -> dict[str, list[np.ndarray]]:
  """Reads Keras weights as {layer name: [arrays in the layer's weight order]}.

  Handles Keras 3 `.weights.h5` (layers/<auto name>/vars/<i>, the layer's name in the `vars`
  group's attribute) and the Keras 2 / legacy `.h5` layout (`layer_names` and `weight_names`
  attributes, also inside `model_weights` of a full-model file).
  """
  import h5py  # noqa: PLC0415  (comes with tensorflow; only needed here)

  out: dict[str, list[np.ndarray]] = {}
  with h5py.File(epath.Path(path).open('rb'), 'r') as f:
    root = f['model_weights'] if 'model_weights' in f else f
    if 'layer_names' in root.attrs:
      for layer in root.attrs['layer_names']:
        layer = layer.decode() if isinstance(layer, bytes) else str(layer)
        g = root[layer]
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in g.attrs['weight_names']]
        if names:
          out[layer] = [np.asarray(g[n]) for n in names]
    else:
      def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Group) and name.endswith('vars') and 'name' in obj.attrs:
          arrays = [np.asarray(obj[str(i)]) for i in range(len(obj))]
          if arrays:
            layer = obj.attrs['name']
            out[layer.decode() if isinstance(layer, bytes) else str(layer)] = arrays

      root.visititems(visit)
  if not out:
    raise ValueError(f'{path}: no Keras layer weights found')
  return out


_MOBILENET_ALPHAS = (0.25, 0.5, 0.75, 1.0)


def mobilenet_v1_from_keras(weights: dict[str, list[np.ndarray]], *,
                            drop_head: bool = False) -> tuple[Variables, dict[str, Any]]:
  """keras.applications.MobileNet weights -> (variables of MobileNetV1, model kwargs).

  The model kwargs (width multiplier inferred from conv1's width; relu6, BN epsilon 1e-3 and
  dropout 1e-3 as in Keras) are what `MobileNetV1` needs to reproduce Keras's logits. Keras's
  head is a 1x1 convolution `conv_preds` after global average pooling: a dense layer.
  """
  weights = dict(weights)
  params: dict[str, Any] = {}
  stats: dict[str, Any] = {}
  errors: list[str] = []

  def take(layer: str, count: int) -> list[np.ndarray] | None:
    arrays = weights.pop(layer, None)
    if arrays is None:
      errors.append(f'missing layer {layer!r}')
    elif len(arrays) != count:
      errors.append(f'layer {layer!r} has {len(arrays)} tensors, expected {count}')
      return None
    return arrays

  def bn(layer: str, ours: str) -> None:
    arrays = take(layer, 4)
    if arrays:
      gamma, beta, mean, var = arrays
      params[ours]['bn'] = {'scale': gamma, 'bias': beta}
      stats[ours] = {'bn': {'mean': mean, 'var': var}}

  stem = take('conv1', 1)
  if stem is None:
    raise ValueError(f'Keras MobileNet import: {"; ".join(errors)}')
  width = stem[0].shape[-1]
  alphas = [a for a in _MOBILENET_ALPHAS if int(32 * a) == width]
  if not alphas:
    raise ValueError(f'conv1 has {width} filters; no MobileNet alpha in {_MOBILENET_ALPHAS}')
  alpha = alphas[0]
  params['stem'] = {'conv': {'kernel': stem[0]}}
  bn('conv1_bn', 'stem')
  i = 1
  while f'conv_dw_{i}' in weights:
    dw = take(f'conv_dw_{i}', 1)
    ours = f'block_{i}_depthwise'
    if dw:
      kh, kw, c, m = dw[0].shape
      if m != 1:
        errors.append(f'conv_dw_{i}: depth multiplier {m} != 1 is not supported')
      # Keras [kh, kw, C, 1] -> flax feature_group_count layout [kh, kw, 1, C].
      params[ours] = {'conv': {'kernel': dw[0].reshape(kh, kw, 1, c * m)}}
    else:
      params[ours] = {}
    bn(f'conv_dw_{i}_bn', ours)
    pw = take(f'conv_pw_{i}', 1)
    ours = f'block_{i}_pointwise'
    params[ours] = {'conv': {'kernel': pw[0]}} if pw else {}
    bn(f'conv_pw_{i}_bn', ours)
    i += 1
  if i - 1 != len(MOBILENET_V1_BLOCKS):
    errors.append(f'found {i - 1} depthwise blocks, expected {len(MOBILENET_V1_BLOCKS)}')
  head = weights.pop('conv_preds', None)
  num_classes = None
  if head is not None and not drop_head:
    if len(head) != 2 or head[0].ndim != 4 or head[0].shape[:2] != (1, 1):
      errors.append(f'conv_preds: expected a 1x1 kernel and a bias, got '
                    f'{[a.shape for a in head]}')
    else:
      params['head'] = {'kernel': head[0][0, 0], 'bias': head[1]}
      num_classes = head[1].shape[0]
  if weights:
    errors.append(f'unexpected layers {sorted(weights)}')
  if errors:
    raise ValueError('Keras MobileNet import: ' + '; '.join(errors))
  kwargs = {'width_multiplier': alpha, 'activation': 'relu6', 'bn_epsilon': 1e-3,
            'bn_momentum': 0.99, 'dropout_rate': 1e-3, 'min_channels': 1}
  return {'params': params, 'batch_stats': stats}, {'num_classes': num_classes, **kwargs}


# ----------------------------------------------------------------------------------------------
# Architectures.


@dataclasses.dataclass(frozen=True)
class Arch:
  """How to build and fill one architecture from a torchvision state dict.

  `model` is the name in `cxr_jax.models.MODELS`, `kwargs` its constructor arguments besides
  `num_classes`; `converter` is 'module:function' with the signature
  `from_torchvision(state_dict, *, num_classes=None, drop_head=False, in_channels=3)`;
  `first_conv` / `head` name the first convolution's and the classifier's weights in the
  torchvision state dict.
  """

  model: str
  converter: str
  first_conv: str
  head: str
  kwargs: tuple[tuple[str, Any], ...] = ()


def _resnet(depth: int) -> Arch:
  return Arch(f'resnet{depth}', 'cxr_jax.models.resnet:from_torchvision', 'conv1.weight',
              'fc.weight')


def _densenet(depth: int) -> Arch:
  return Arch(f'densenet{depth}', 'cxr_jax.models.densenet:from_torchvision',
              'features.conv0.weight', 'classifier.weight')


TORCHVISION_ARCHS: dict[str, Arch] = {
    **{f'resnet{d}': _resnet(d) for d in (18, 34, 50, 101, 152)},
    **{f'densenet{d}': _densenet(d) for d in (121, 161, 169, 201)},
    **{f'vgg{d}{bn}': Arch(f'vgg{d}', 'cxr_jax.models.vgg:from_torchvision', 'features.0.weight',
                           'classifier.6.weight', (('batch_norm', bool(bn)),))
       for d in (11, 13, 16, 19) for bn in ('', '_bn')},
    'alexnet': Arch('alexnet', 'cxr_jax.models.alexnet:from_torchvision', 'features.0.weight',
                    'classifier.6.weight'),
}
KERAS_ARCHS = ('mobilenet_v1',)


def _converter(spec: str) -> Callable[..., Variables]:
  module, fn = spec.split(':')
  try:
    return getattr(importlib.import_module(module), fn)
  except (ImportError, AttributeError) as e:
    raise NotImplementedError(f'converter {spec} is not available: {e}') from None


# torchvision's own fix-up for its 2017 DenseNet files ('norm.1' -> 'norm1'), as in
# torchvision.models.densenet._load_state_dict.
_DENSENET_OLD_KEY = __import__('re').compile(
    r'^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$')


def _fix_densenet_keys(sd: StateDict) -> StateDict:
  out = {}
  for k, v in sd.items():
    m = _DENSENET_OLD_KEY.match(k)
    out[m.group(1) + m.group(2) if m else k] = v
  return out


def tree_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'params/layer1_0/conv1/kernel': shape} for every leaf of a variables tree."""
  return {'/'.join(str(getattr(k, 'key', k)) for k in p): tuple(np.shape(x))
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_structure(want: Any, got: Any, *, what: str) -> None:
  """Raises ValueError listing missing, unexpected and wrongly shaped leaves of `got`."""
  w, g = tree_shapes(want), tree_shapes(got)
  if w == g:
    return
  missing = sorted(set(w) - set(g))
  unexpected = sorted(set(g) - set(w))
  shapes = [f'{k}: {g[k]} != expected {w[k]}' for k in sorted(set(w) & set(g)) if w[k] != g[k]]
  raise ValueError(f'{what} does not match the model: missing {missing}; unexpected '
                   f'{unexpected}; wrong shape {shapes}')


def merge_pretrained(fresh: Variables, pretrained: Variables, *, skip: tuple[str, ...] = ()
                     ) -> Variables:
  """`pretrained`'s leaves, except the paths in `skip` ('params/head/kernel'), from `fresh`.

  Strict: both trees must have the same leaves and shapes, apart from `skip` which may be
  absent from `pretrained`. This is how a run with its own head initialisation takes an
  imported backbone: `merge_pretrained(model.init(...), imported, skip=classifier_paths(model))`.
  """
  fresh_flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(fresh), sep='/')
  pre_flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(pretrained), sep='/')
  skipped = {k for k in fresh_flat if k in skip or any(k.startswith(s + '/') for s in skip)}
  check_structure({k: v for k, v in fresh_flat.items() if k not in skipped},
                  {k: v for k, v in pre_flat.items() if k not in skipped}, what='pretrained')
  merged = {k: (fresh_flat[k] if k in skipped else pre_flat[k]) for k in fresh_flat}
  return flax.traverse_util.unflatten_dict(merged, sep='/')


def _init_shapes(model: nn.Module, in_channels: int) -> Variables:
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, in_channels)), train=False))
  return {k: v for k, v in shapes.items() if k in ('params', 'batch_stats')}


def classifier_paths(model: nn.Module, in_channels: int = 3) -> list[str]:
  """'params/...' paths of the leaves whose shape depends on `num_classes` (the head)."""
  a = tree_shapes(_init_shapes(model, in_channels))
  b = tree_shapes(_init_shapes(model.clone(num_classes=model.num_classes + 1), in_channels))
  return sorted(k for k in a if a[k] != b.get(k))


def _finish(model: nn.Module, variables: Variables, *, reinit_head: bool, in_channels: int,
            key: jax.Array | None, what: str) -> tuple[Variables, list[str]]:
  """Checks `variables` against the model and (if `reinit_head`) adds a fresh head.

  Returns the variables and the paths of the new head's leaves ([] without a new head).
  """
  variables = jax.tree.map(np.asarray, {k: v for k, v in variables.items() if v})
  if not reinit_head:
    check_structure(_init_shapes(model, in_channels), variables, what=what)
    return variables, []
  fresh = model.init(key if key is not None else jax.random.key(0),
                     jnp.zeros((1, 64, 64, in_channels)), train=False)
  fresh = {k: v for k, v in fresh.items() if k in ('params', 'batch_stats')}
  # Only the leaves shaped by num_classes may be missing: anything else missing is an error.
  skip = classifier_paths(model, in_channels)
  return jax.tree.map(np.asarray, merge_pretrained(fresh, variables, skip=tuple(skip))), skip


def load_with_info(path: str | epath.PathLike, *, source: str = 'torchvision', arch: str,
         num_classes: int | None = None, drop_head: bool = False, one_channel: bool = False,
         key: jax.Array | None = None, use_torch: bool = False,
         dtype: Any = jnp.float32) -> tuple[nn.Module, Variables, dict[str, Any]]:
  """Builds `arch` and fills it from a torchvision `.pth` or Keras `.h5` file.

  Args:
    path: the weights file.
    source: 'torchvision' (state dict `.pth`) or 'keras' (`.h5` / `.weights.h5`).
    arch: e.g. 'resnet50', 'densenet121', 'vgg16', 'alexnet' (torchvision), 'mobilenet_v1'
      (keras).
    num_classes: outputs of the classifier; None or the file's keeps the reference head, any
      other value gets a new head initialised by `model.init` with `key`.
    drop_head: re-initialise the head even when `num_classes` matches.
    one_channel: sum the first convolution over RGB, for grey images [B, H, W, 1]; equals
      feeding the grey image replicated to three channels.
    key: PRNG key for the new head (default `jax.random.key(0)`).
    use_torch: read `.pth` files with `torch.load` instead of the built-in reader.
    dtype: compute dtype of the returned model (parameters stay float32).

  Returns:
    (model, variables, info): `model.apply(variables, images [B, H, W, C], train=False)` equals
    the reference model's logits (in eval mode) when the head is kept; info holds
    'reference_classes' (the file's head width, None without a head) and 'head_paths' (the
    leaves initialised here, [] when the head was imported).
  """
  in_channels = 1 if one_channel else 3
  if source == 'torchvision':
    if arch not in TORCHVISION_ARCHS:
      raise ValueError(f'unknown torchvision arch {arch!r}; valid: {sorted(TORCHVISION_ARCHS)}')
    spec = TORCHVISION_ARCHS[arch]
    sd = read_pth_with_torch(path) if use_torch else read_pth(path)
    if arch.startswith('densenet'):
      sd = _fix_densenet_keys(sd)
    if spec.head not in sd:
      raise ValueError(f'{path}: no classifier weight {spec.head!r}; expected a torchvision '
                       f'{arch} state dict')
    ref_classes = sd[spec.head].shape[0]
    reinit = drop_head or (num_classes is not None and num_classes != ref_classes)
    # The ResNet / DenseNet converters recognise the file's depth: 'holds a resnet18, not a
    # resnet50' says more than the list of every tensor a wrong --arch misses.
    by_depth = {'arch': spec.model} if arch.startswith(('resnet', 'densenet')) else {}
    try:
      # The converters sum the first convolution over RGB themselves when in_channels=1.
      variables = _converter(spec.converter)(sd, num_classes=None, drop_head=reinit,
                                             in_channels=in_channels, **by_depth)
    except ValueError as e:
      raise ValueError(f'{path} (torchvision {arch}): {e}') from None
    model = MODELS.get(spec.model)(num_classes=num_classes or ref_classes, dtype=dtype,
                                   **dict(spec.kwargs))
  elif source == 'keras':
    if arch not in KERAS_ARCHS:
      raise ValueError(f'unknown keras arch {arch!r}; valid: {list(KERAS_ARCHS)}')
    variables, kwargs = mobilenet_v1_from_keras(read_keras_h5(path), drop_head=drop_head)
    ref_classes = kwargs.pop('num_classes')
    if ref_classes is None and num_classes is None:
      raise ValueError(f'{path} has no classifier (include_top=False?): pass num_classes')
    reinit = ref_classes is None or (num_classes is not None and num_classes != ref_classes)
    if reinit:
      variables['params'].pop('head', None)
    if one_channel:
      k = variables['params']['stem']['conv']['kernel']
      variables['params']['stem']['conv']['kernel'] = k.sum(axis=2, keepdims=True)  # HWIO
    model = MODELS.get(arch)(num_classes=num_classes or ref_classes, dtype=dtype, **kwargs)
  else:
    raise ValueError(f"source={source!r}; valid: 'torchvision', 'keras'")
  variables, new_head = _finish(model, variables, reinit_head=reinit, in_channels=in_channels,
                                key=key, what=f'{path} ({source} {arch})')
  info = {'reference_classes': ref_classes, 'head_paths': new_head}
  return model, variables, info


def load(path: str | epath.PathLike, *, source: str = 'torchvision', arch: str,
         num_classes: int | None = None, drop_head: bool = False, one_channel: bool = False,
         key: jax.Array | None = None, use_torch: bool = False,
         dtype: Any = jnp.float32) -> tuple[nn.Module, Variables]:
  """(model, variables) of `arch` filled from a torchvision `.pth` or Keras `.h5` file.

  `model.apply(variables, images [B, H, W, C], train=False)` gives the reference model's
  logits. Arguments as in `load_with_info`; a new head (`num_classes` other than the file's, or
  `drop_head`) is initialised by `model.init` with `key` and its leaves are
  `classifier_paths(model)`.
  """
  model, variables, _ = load_with_info(
      path, source=source, arch=arch, num_classes=num_classes, drop_head=drop_head,
      one_channel=one_channel, key=key, use_torch=use_torch, dtype=dtype)
  return model, variables


# ----------------------------------------------------------------------------------------------
# Imported checkpoints (written by cxr_jax.tools.import_weights).

def sha256(path: str | epath.PathLike) -> str:
  h = hashlib.sha256()
  with epath.Path(path).open('rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def _model_config(model: nn.Module) -> dict[str, Any]:
  """The constructor fields of `model` that a JSON file can hold (dtype as its name)."""
  cfg = {}
  for f in dataclasses.fields(model):
    if f.name in ('parent', 'name'):
      continue
    v = getattr(model, f.name)
    if f.name == 'dtype':
      v = jnp.dtype(v).name
    elif isinstance(v, tuple):
      v = json.loads(json.dumps(v))
    cfg[f.name] = v
  return cfg


def save_checkpoint(directory: str | epath.PathLike, model: nn.Module, variables: Variables,
                    meta: dict[str, Any], *, overwrite: bool = False) -> epath.Path:
  """Writes imported `variables` and their description (with the model's name and config) to
  `directory`, atomically (`checkpoints.save_imported`)."""
  from cxr_jax import checkpoints

  model_name = next((n for n in MODELS.names() if MODELS.get(n) is type(model)), None)
  meta = {**meta, 'model': model_name, 'model_config': _model_config(model)}
  return checkpoints.save_imported(directory, variables, meta, overwrite=overwrite)


def load_checkpoint(directory: str | epath.PathLike) -> tuple[nn.Module, Variables]:
  """Reads a directory written by `save_checkpoint` / the import CLI: (model, variables).

  The description also lists `head_paths`, the leaves initialised rather than imported, for
  `merge_pretrained(..., skip=meta['head_paths'])`.
  """
  from cxr_jax import checkpoints

  meta, variables = checkpoints.load_imported(directory)
  cfg = dict(meta['model_config'])
  dtype = jnp.dtype(cfg.pop('dtype', 'float32'))
  for k, v in cfg.items():
    if isinstance(v, list):  # JSON turned tuples into lists; linen fields must be hashable
      cfg[k] = _to_tuple(v)
  model = MODELS.get(meta['model'])(dtype=dtype, **cfg)
  return model, variables


def _to_tuple(v: Any) -> Any:
  return tuple(_to_tuple(x) for x in v) if isinstance(v, list) else v


def read_meta(directory: str | epath.PathLike) -> dict[str, Any]:
  """The description of an imported-weights folder (`checkpoints.read_imported_meta`)."""
  from cxr_jax import checkpoints

  return checkpoints.read_imported_meta(directory)
