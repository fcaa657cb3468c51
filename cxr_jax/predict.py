r"""Predict (and explain) on a user's own X-rays with a trained run.

  python -m cxr_jax.predict --workdir=RUN [--output=DIR] IMAGE_OR_FOLDER \
      [--explain=auto|attention|pda|cam|grad_cam|none] [--stage=STAGE] [--boxes=BBOX.csv]

IMAGE_OR_FOLDER is one PNG/JPEG (8/16-bit) or DICOM file, or a folder searched recursively for
.png/.jpg/.jpeg/.dcm/.dicom files. For each image, under DIR (default RUN/predictions/, the
folder's sub-folders mirrored):
- `<name>.json`: the image path and how it was read, the probability of every class, the
  findings (classes whose probability is above the model's threshold from model.json, `>` as
  in cxr_jax.metrics), the stage and the model;
- `<name>.attention.png` (--explain=attention, attention models only): the attention weights
  of every LSTM step over the X-ray, as paper 000's Fig. 3;
- `<name>.pda.png` (--explain=pda): feature-level Prediction Difference Analysis heat maps of
  the detected classes (or the most probable one when none is detected; --classes to choose)
  over the X-ray, as paper 000's Fig. 2. Its sampler is fitted on reference feature maps: the
  images of --pda_reference (a folder) or else the run's training split.
- `<name>.cam.png` / `<name>.grad_cam.png` (--explain=cam|grad_cam): class activation maps of
  the same classes (CAM: linear heads, and paper 001's space attention class score map;
  Grad-CAM: any model) with the boxes they give in black (the run's config.localize.boxes
  settings, cxr_jax/explain/boxes.py); the JSON lists those boxes in image pixels.
--explain=auto (default) is 'attention' for attention models and 'none' otherwise. With
--boxes (NIH BBox_List format: image name, finding label, x, y, w, h in pixels of a
--boxes_size-pixel image), the experts' boxes are drawn in red on the matching panels.

The model is the best checkpoint of --stage (default: the last training stage present in RUN:
train_attention, else train_hard_examples, else train_classifier, else train), rebuilt from
RUN/<stage>/model.json alone.
The image is resized to the model's input size (as the NIH PNGs were squeezed to 1024x1024,
aspect ratio not kept), quantised to 8 bits as the training PNGs are, and run through the
stage's eval preprocessing (model.json's pp_eval).

A file that cannot be read or predicted is reported on stderr by name and skipped. Exit
status: 0 all images done, 1 some failed, 2 usage errors (bad flags, no run, no images).
"""

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath
from PIL import Image

from cxr_jax import imageio
from cxr_jax.explain import overlays
from cxr_jax.io_utils import atomic_write_json
from cxr_jax.metrics import check_thresholds

# Later stages first: the default is the most refined model the run has.
TRAIN_STAGES = ('train_attention', 'train_hard_examples', 'train_classifier', 'train')
EXPLAIN_MODES = ('auto', 'attention', 'pda', 'cam', 'grad_cam', 'none')
NIH_BOX_NAMES = {'Infiltrate': 'Infiltration'}


class UsageError(ValueError):
  """Bad invocation (no run, no stage, no images, unsupported --explain): exit status 2."""


# ------------------------------------------------------------------------------ the model
@dataclasses.dataclass
class Predictor:
  """A trained stage ready for single images. `forward` returns (logits [B, K], intermediates)."""
  workdir: epath.Path
  stage: str
  model: Any
  variables: dict[str, Any]
  info: dict[str, Any]
  forward: Callable[[Any, jax.Array], tuple[jax.Array, dict[str, Any]]]
  _head_fn: Callable[[jax.Array], jax.Array] | None = dataclasses.field(default=None, repr=False)
  _logits_fn: Callable[[jax.Array], jax.Array] | None = dataclasses.field(default=None,
                                                                         repr=False)
  _score_map_fn: Callable[[jax.Array], jax.Array] | None = dataclasses.field(default=None,
                                                                            repr=False)

  @property
  def class_names(self) -> tuple[str, ...]:
    return tuple(self.info['class_names'])

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.info['image_shape'])

  @property
  def thresholds(self) -> np.ndarray:
    return check_thresholds(np.asarray(self.info['threshold'], np.float64),
                            len(self.class_names))

  @property
  def has_attention(self) -> bool:
    return hasattr(self.model, 'attend')

  def preprocess(self, image: np.ndarray) -> np.ndarray:
    """Grey [H, W] in [0, 1] -> the model's input [H', W', C] float32 (see module doc)."""
    import tensorflow as tf

    from cxr_jax.data import ops
    h, w = self.image_shape[:2]
    resized = np.asarray(Image.fromarray(image.astype(np.float32), mode='F').resize(
        (w, h), Image.Resampling.BILINEAR), np.float32)
    uint8 = np.round(np.clip(resized, 0.0, 1.0) * 255.0).astype(np.uint8)[..., None]
    # 'decode' in pp strings passes already decoded uint8 tensors through unchanged.
    out = ops.get_preprocess_fn(self.info['pp_eval'])({'image': tf.constant(uint8)})
    x = np.asarray(out['image'], np.float32)
    if x.shape != self.image_shape:
      raise ValueError(f'preprocessing gave shape {x.shape}, the model expects '
                       f'{self.image_shape} (pp_eval {self.info["pp_eval"]!r})')
    return x

  def run(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """x [H, W, C] -> (probabilities [K], intermediates of the one image)."""
    logits, inter = self.forward(self.variables, x[None])
    probs = np.asarray(jax.nn.sigmoid(logits.astype(np.float32)))[0]
    return probs, inter

  def attention_maps(self, inter: dict[str, Any]) -> np.ndarray:
    """Attention weights [T, h, w] sown by the attention model ('attention' [1, T, h, w])."""
    if not self.has_attention:
      raise UsageError(f'--explain=attention: the model of stage {self.stage!r} '
                       f'({self.info["model"].get("name")}) has no attention; use --explain=pda '
                       'or a stage of an attention model (e.g. --stage=train_attention).')
    found = _find_sown(inter, 'attention', ndim=4)
    if found is None:
      raise ValueError('the attention model did not sow an [B, T, h, w] attention map')
    return np.asarray(found[0], np.float32)

  def features(self, inter: dict[str, Any]) -> np.ndarray:
    """The last feature map before pooling [h, w, C'] of the one image."""
    return self.feature_maps(inter)[0]

  def feature_maps(self, inter: dict[str, Any]) -> np.ndarray:
    """The last feature maps before pooling [B, h, w, C'] of a batch."""
    found = _find_sown(inter, 'features', ndim=4)
    if found is None:
      raise ValueError('the model did not sow its feature map (intermediates "features")')
    return np.asarray(found, np.float32)

  def logits_fn(self) -> Callable[[jax.Array], jax.Array]:
    """images [N, H, W, C] -> logits [N, K], the same object every call (PDA's jit key)."""
    if self._logits_fn is None:
      model, variables = self.model, self.variables
      self._logits_fn = lambda x: model.apply(variables, x, train=False)
    return self._logits_fn

  def head_fn(self) -> Callable[[jax.Array], jax.Array]:
    """features [N, h, w, C'] -> logits [N, K]: what feature-level PDA re-evaluates.

    The same function object every call: PDA's jit is keyed on it, so images after the first
    reuse the compiled program.
    """
    if self._head_fn is None:
      self._head_fn = self._model_function('head_fn')
    return self._head_fn

  def score_map_fn(self) -> Callable[[jax.Array], jax.Array]:
    """features [N, h, w, C'] -> class score maps [N, h, w, K] (CAM; the space attention
    head's own map); UsageError for models without one (use Grad-CAM)."""
    if self._score_map_fn is None:
      self._score_map_fn = self._model_function('score_map_fn')
    return self._score_map_fn

  def _model_function(self, name: str) -> Callable[[jax.Array], jax.Array]:
    from cxr_jax.models import model_function
    make = model_function(self.model, name)
    if make is None:
      raise UsageError(f'the model of stage {self.stage!r} ({self.info["model"].get("name")}) '
                       f'has no {name} (a linear class score map); use Grad-CAM instead.')
    return make(self.model, self.variables)


def _find_sown(tree: Any, name: str, ndim: int) -> np.ndarray | None:
  """The first value sown under `name` with `ndim` dims, searching submodules depth first.

  Top-level entries win: the attention model sows 'attention' itself and also has a submodule
  named 'attention'.
  """
  if not isinstance(tree, Mapping):
    return None
  value = tree.get(name)
  if isinstance(value, tuple) and value and getattr(value[0], 'ndim', None) == ndim:
    return value[0]
  for sub in tree.values():
    if isinstance(sub, Mapping):
      found = _find_sown(sub, name, ndim)
      if found is not None:
        return found
  return None


def _hide_gpus_from_tf() -> None:
  """TensorFlow only preprocesses here; left alone it would reserve the accelerator's memory."""
  import tensorflow as tf
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TF already initialised its devices (e.g. the pipeline did it first).
    pass


def default_stage(workdir: epath.Path) -> str:
  """The last training stage with a model.json in `workdir` (see TRAIN_STAGES)."""
  for stage in TRAIN_STAGES:
    if (workdir / stage / 'model.json').exists():
      return stage
  raise UsageError(f'{workdir}: no trained model found (none of {", ".join(TRAIN_STAGES)} has '
                   'a model.json); train one with `python -m cxr_jax.main` or pass --stage.')


def load_predictor(workdir: str | os.PathLike, stage: str | None = None) -> Predictor:
  """Restores the best checkpoint of `stage` (default: `default_stage`) of the run `workdir`."""
  from cxr_jax import train
  workdir = epath.Path(workdir)
  if not workdir.is_dir():
    raise UsageError(f'--workdir={workdir}: no such folder.')
  stage = stage or default_stage(workdir)
  if not (workdir / stage / 'model.json').exists():
    present = [s for s in TRAIN_STAGES if (workdir / s / 'model.json').exists()]
    raise UsageError(f'{workdir / stage}: no model.json; stages with a trained model here: '
                     f'{present or "none"}.')
  _hide_gpus_from_tf()
  info = train.load_model_info(workdir / stage)
  model, variables = train.restore_best_variables(workdir / stage)
  variables = jax.device_get(variables)  # one image at a time: keep it off the mesh.

  @jax.jit
  def forward(variables, x):
    return model.apply(variables, x, train=False, mutable=['intermediates'])

  def forward_fn(variables, x):
    logits, state = forward(variables, x)
    return logits, state.get('intermediates', {})

  return Predictor(workdir, stage, model, variables, info, forward_fn)


# ------------------------------------------------------------------------------ PDA wiring
@dataclasses.dataclass
class PDASettings:
  """PDA settings; read from the run's config.explain where it has them.

  level 'features' (paper 000: windows over the last feature map, head re-evaluated) or
  'pixels' (windows over the preprocessed input, whole network re-evaluated).
  """
  level: str = 'features'
  sampler: str = 'marginal'
  window: int = 2
  stride: int = 1
  padding: int = 1
  num_samples: int = 10
  chunk_size: int = 256
  num_reference: int = 64
  laplace_n: int = 10_000  # Laplace correction's N; only keeps the odds finite.
  seed: int = 0

  @classmethod
  def from_config(cls, explain_cfg: Mapping[str, Any] | None) -> 'PDASettings':
    fields = {f.name for f in dataclasses.fields(cls)}
    settings = cls(**{k: v for k, v in (explain_cfg or {}).items() if k in fields})
    if settings.level not in ('features', 'pixels'):
      raise UsageError(f"config.explain.level={settings.level!r}; valid: 'features', 'pixels'")
    return settings


def fit_pda_sampler(settings: PDASettings, reference: np.ndarray) -> Any:
  """The PDA sampler fitted on reference maps [M, h, w, C'] (features or images)."""
  from cxr_jax.explain import prediction_difference as pda
  try:
    return pda.make_sampler(settings.sampler, reference, window=settings.window,
                            padding=settings.padding)
  except ValueError as e:
    raise UsageError(f'config.explain: {e}') from e


def pda_heatmaps(predictor: Predictor, x: np.ndarray, sampler: Any, settings: PDASettings,
                 key: jax.Array) -> np.ndarray:
  """PDA relevance [K, h, w] (weight of evidence, log2 odds) of one preprocessed image x
  [H, W, C], over its feature map or its pixels (settings.level)."""
  from cxr_jax.explain import prediction_difference as pda
  padding = settings.padding if settings.sampler == 'conditional' else None
  kwargs = dict(window=settings.window, stride=settings.stride, padding=padding,
                num_samples=settings.num_samples, key=key, chunk_size=settings.chunk_size,
                laplace_n=settings.laplace_n)
  try:
    if settings.level == 'features':
      features = predictor.features(predictor.run(x)[1])
      return np.asarray(pda.pda_features(predictor.head_fn(), features, sampler, **kwargs),
                        np.float32)
    return np.asarray(pda.pda_pixels(predictor.logits_fn(), x, sampler, **kwargs), np.float32)
  except ValueError as e:
    raise UsageError(f'config.explain ({settings.level} level): {e}') from e


def reference_data(predictor: Predictor, settings: PDASettings,
                   reference: str | None) -> np.ndarray:
  """What the PDA sampler draws replacement values from [M, h, w, C']: feature maps (or
  preprocessed images at pixel level) of a folder's images, else of the run's training split
  (its first settings.num_reference images)."""
  def convert(x: np.ndarray) -> np.ndarray:
    return predictor.features(predictor.run(x)[1]) if settings.level == 'features' else x

  out = []
  if reference:
    for path in list_images(reference)[:settings.num_reference]:
      image, _ = imageio.read_image(path)
      out.append(convert(predictor.preprocess(image)))
  else:
    import ml_collections

    from cxr_jax.data import pipeline
    config = ml_collections.ConfigDict(
        json.loads((predictor.workdir / 'config.json').read_text()))
    data_cfg = config.data
    with data_cfg.unlocked():
      data_cfg.pp_eval = predictor.info['pp_eval']
    try:
      batches = pipeline.make_eval_iter(data_cfg, data_cfg.train_split, global_batch_size=8)
    except FileNotFoundError as e:
      raise UsageError(f'--explain=pda needs reference images for its sampler and the run\'s '
                       f'training data is not here ({e}); pass --pda_reference=FOLDER.') from e
    for batch in batches:
      for x, m in zip(batch['image'], batch['mask'], strict=True):
        if m > 0 and len(out) < settings.num_reference:
          out.append(convert(x))
      if len(out) >= settings.num_reference:
        break
  if len(out) < 2:
    raise UsageError(f'PDA needs at least 2 reference images for its sampler, got {len(out)}.')
  return np.stack(out)


# ------------------------------------------------------------------------------ files
def list_images(path: str | os.PathLike) -> list[str]:
  """One image file, or the image files under a folder (recursive, sorted)."""
  path = os.fspath(path)
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise UsageError(f'{path}: no such file or folder.')
  found = []
  for root, dirs, files in os.walk(path):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
    found += [os.path.join(root, f) for f in sorted(files)
              if os.path.splitext(f)[1].lower() in imageio.SUFFIXES and not f.startswith('.')]
  return found


def read_boxes(csv_path: str, boxes_size: float) -> dict[str, list[tuple[str, tuple]]]:
  """NIH BBox_List-style CSV -> {image file name: [(class, (x, y, w, h) / boxes_size)]}."""
  import csv
  out: dict[str, list] = {}
  with open(csv_path, newline='') as f:
    for row in csv.reader(f):
      if not row or not _is_number(row[2] if len(row) > 2 else ''):
        continue  # header or blank line
      name, label = row[0], NIH_BOX_NAMES.get(row[1], row[1])
      x, y, w, h = (float(v) / boxes_size for v in row[2:6])
      out.setdefault(os.path.basename(name), []).append((label, (x, y, w, h)))
  return out


def _is_number(s: str) -> bool:
  try:
    float(s)
  except ValueError:
    return False
  return True


# ------------------------------------------------------------------------------ one image
def predict_image(predictor: Predictor, path: str, out_base: str, *, explain: str,
                  boxes: Sequence[tuple[str, tuple]] = (),
                  pda: tuple[Any, PDASettings] | None = None,
                  classes: Sequence[str] = ()) -> dict[str, Any]:
  """Predicts one file and writes `out_base`.json (+ overlay PNGs); returns the JSON record.

  boxes: (class name, normalised (x, y, w, h)) ground truth; pda: (fitted sampler, settings).
  """
  image, meta = imageio.read_image(path)
  probs, inter = predictor.run(predictor.preprocess(image))
  names, thresholds = predictor.class_names, predictor.thresholds
  findings = [(n, float(p)) for n, p, t in zip(names, probs, thresholds, strict=True) if p > t]
  findings.sort(key=lambda f: -f[1])
  record = {
      'image': os.path.abspath(path), 'image_meta': _jsonable(meta),
      'workdir': os.path.abspath(os.fspath(predictor.workdir)), 'stage': predictor.stage,
      'model': predictor.info['model'].get('name'),
      'probabilities': {n: float(p) for n, p in zip(names, probs, strict=True)},
      'thresholds': {n: float(t) for n, t in zip(names, thresholds, strict=True)},
      'findings': [n for n, _ in findings], 'overlays': []}
  h, w = image.shape
  pixel_boxes = [(c, (x * w, y * h, bw * w, bh * h)) for c, (x, y, bw, bh) in boxes]
  if explain == 'attention':
    maps = predictor.attention_maps(inter)  # [T, h, w]
    panels = [overlays.Panel(m, title=f'attention, step {t + 1}/{len(maps)}', findings=findings,
                             boxes=[b for _, b in pixel_boxes],
                             colorbar_label="contribution to the decision (attention)")
              for t, m in enumerate(maps)]
    out = f'{out_base}.attention.png'
    overlays.overlay_grid(image, panels, ncols=len(panels), out_path=out,
                          suptitle=f'{os.path.basename(path)}: {predictor.stage}')
    record['overlays'].append(os.path.abspath(out))
  elif explain in ('cam', 'grad_cam'):
    chosen = _chosen_classes(classes, findings, names, probs)
    record['boxes'] = {}
    panels = []
    for c, heat, found in class_activation_boxes(predictor, inter, explain, chosen, (h, w)):
      record['boxes'][c] = [list(b) for b in found]
      panels.append(overlays.Panel(
          heat, title=f'{c} (p={probs[names.index(c)]:.2f})', findings=findings,
          boxes=[b for bc, b in pixel_boxes if bc == c], pred_boxes=found,
          value_range=(float(heat.min()), float(heat.max())),
          colorbar_label=f'{explain.replace("_", "-").upper()} (class score)'))
    out = f'{out_base}.{explain}.png'
    overlays.overlay_grid(image, panels, ncols=min(4, len(panels)), out_path=out,
                          suptitle=f'{os.path.basename(path)}: {explain}, {predictor.stage}; '
                          'black = boxes from the heat map')
    record['overlays'].append(os.path.abspath(out))
  elif explain == 'pda':
    sampler, settings = pda
    key = jax.random.fold_in(jax.random.key(settings.seed), 0)
    relevance = pda_heatmaps(predictor, predictor.preprocess(image), sampler, settings, key)
    chosen = _chosen_classes(classes, findings, names, probs)
    panels = [overlays.Panel(relevance[names.index(c)],
                             title=f'{c} (p={probs[names.index(c)]:.2f})', findings=findings,
                             boxes=[b for bc, b in pixel_boxes if bc == c],
                             colorbar_label='contribution to the decision (bits of evidence)')
              for c in chosen]
    out = f'{out_base}.pda.png'
    overlays.overlay_grid(image, panels, ncols=min(4, len(panels)), out_path=out,
                          suptitle=f'{os.path.basename(path)}: PDA, {predictor.stage}')
    record['overlays'].append(os.path.abspath(out))
  atomic_write_json(f'{out_base}.json', record)
  return record


def _chosen_classes(classes: Sequence[str], findings: Sequence[tuple[str, float]],
                    names: Sequence[str], probs: np.ndarray) -> list[str]:
  """--classes, else the findings, else the most probable class."""
  chosen = list(classes) or [n for n, _ in findings] or [names[int(np.argmax(probs))]]
  unknown = [c for c in chosen if c not in names]
  if unknown:
    raise UsageError(f'--classes: {unknown} not among the model\'s classes {list(names)}.')
  return chosen


def class_activation_boxes(predictor: Predictor, inter: dict[str, Any], method: str,
                           chosen: Sequence[str], image_hw: tuple[int, int]
                           ) -> list[tuple[str, np.ndarray, list[tuple[float, ...]]]]:
  """(class, heat map [H', W'] at the model input, boxes in image pixels) per chosen class."""
  from cxr_jax.explain import boxes as boxes_lib
  from cxr_jax.explain import localize
  maps = localize.class_heatmaps(predictor, inter, method)[0]
  settings = boxes_lib.BoxSettings.from_config(
      _run_config(predictor).get('localize', {}).get('boxes'))
  hh, ww = predictor.image_shape[:2]
  ks = [predictor.class_names.index(c) for c in chosen]
  found = localize.heatmap_boxes(maps, ks, (hh, ww), settings)
  return [(c, found[k][0], boxes_lib.scale_boxes(found[k][1], image_hw[1] / ww,
                                                 image_hw[0] / hh))
          for c, k in zip(chosen, ks, strict=True)]


def _jsonable(meta: dict[str, Any]) -> dict[str, Any]:
  return {k: (list(v) if isinstance(v, tuple) else v) for k, v in meta.items()}


def resolve_explain(explain: str, predictor: Predictor) -> str:
  if explain not in EXPLAIN_MODES:
    raise UsageError(f'--explain={explain!r}; valid: {", ".join(EXPLAIN_MODES)}.')
  if explain == 'auto':
    return 'attention' if predictor.has_attention else 'none'
  if explain == 'attention' and not predictor.has_attention:
    predictor.attention_maps({})  # raises the explanatory UsageError
  return explain


def run(workdir: str, inputs: str, *, output: str | None = None, explain: str = 'auto',
        stage: str | None = None, boxes_csv: str | None = None, boxes_size: float = 1024.0,
        pda_reference: str | None = None, classes: Sequence[str] = (),
        progress: bool = True, predictor: Predictor | None = None
        ) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
  """Predicts every image of `inputs`; returns (records, [(path, error message)]).

  `predictor`: an already loaded model of `workdir` (several calls, one restore).
  """
  from tqdm import tqdm
  paths = list_images(inputs)
  if not paths:
    raise UsageError(f'{inputs}: no .png/.jpg/.jpeg/.dcm files found.')
  predictor = predictor or load_predictor(workdir, stage)
  explain = resolve_explain(explain, predictor)
  pda = None
  if explain == 'pda':
    settings = PDASettings.from_config(_run_config(predictor).get('explain'))
    pda = (fit_pda_sampler(settings, reference_data(predictor, settings, pda_reference)),
           settings)
  all_boxes = read_boxes(boxes_csv, boxes_size) if boxes_csv else {}
  output = output or os.fspath(predictor.workdir / 'predictions')
  root = inputs if os.path.isdir(inputs) else os.path.dirname(inputs)
  records, failures = [], []
  for path in tqdm(paths, desc='predict', unit='image', disable=not progress or len(paths) < 2,
                   file=sys.stderr):
    out_base = os.path.join(output, os.path.relpath(path, root))
    try:
      records.append(predict_image(predictor, path, out_base, explain=explain, pda=pda,
                                   boxes=all_boxes.get(os.path.basename(path), ()),
                                   classes=classes))
    except UsageError:
      raise
    except Exception as e:  # a bad file must not stop the rest; it is reported by name.
      message = str(e) if os.path.basename(path) in str(e) else f'{path}: {e}'
      failures.append((path, message))
      tqdm.write(f'FAILED {message}', file=sys.stderr)
  return records, failures


def _run_config(predictor: Predictor) -> dict[str, Any]:
  path = predictor.workdir / 'config.json'
  return json.loads(path.read_text()) if path.exists() else {}


# ------------------------------------------------------------------------------ CLI
def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  """The CLI's arguments (argparse, so that importing this module defines no absl flags)."""
  parser = argparse.ArgumentParser(
      prog='python -m cxr_jax.predict',
      description='Findings and heat maps for your own chest X-rays (PNG/JPEG/DICOM).')
  parser.add_argument('inputs', metavar='IMAGE_OR_FOLDER', help='an image file or a folder')
  parser.add_argument('--workdir', required=True,
                      help='run folder written by `python -m cxr_jax.main`')
  parser.add_argument('--output', default=None, help='output folder (default: WORKDIR/predictions)')
  parser.add_argument('--explain', default='auto', choices=EXPLAIN_MODES,
                      help='heat maps: attention weights, PDA, none; auto = attention if the '
                      'model has it')
  parser.add_argument('--stage', default=None,
                      help='training stage whose best model to use (default: the last)')
  parser.add_argument('--boxes', default=None,
                      help='CSV of ground-truth boxes (NIH BBox_List columns)')
  parser.add_argument('--boxes_size', type=float, default=1024.0,
                      help='image size (px) the --boxes coordinates refer to')
  parser.add_argument('--pda_reference', default=None,
                      help="folder of images to fit the PDA sampler on (default: the run's "
                      'training split)')
  parser.add_argument('--classes', default='',
                      help='comma-separated classes to draw PDA heat maps for (default: the '
                      'detected ones)')
  parser.add_argument('--verbose', action='store_true', help='log library INFO lines too')
  return parser.parse_args(list(argv)[1:])


def main(argv: Sequence[str]) -> int:
  """Runs the CLI on argv (argv[0] is the program); returns the exit status."""
  try:
    args = parse_args(argv)
  except SystemExit as e:  # argparse: usage error (2) or --help (0)
    return int(e.code or 0)
  previous = logging.get_verbosity()
  logging.set_verbosity(logging.INFO if args.verbose else logging.WARNING)
  classes = [c for c in args.classes.split(',') if c]
  try:
    records, failures = run(args.workdir, args.inputs, output=args.output, explain=args.explain,
                            stage=args.stage, boxes_csv=args.boxes,
                            boxes_size=args.boxes_size, pda_reference=args.pda_reference,
                            classes=classes)
  except UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  finally:
    logging.set_verbosity(previous)  # main() also runs in-process (tests, notebooks)
  print(f'{len(records)} image(s) predicted, {len(failures)} failed.', file=sys.stderr)
  return 1 if failures else 0


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  sys.exit(main(sys.argv))
