"""The on-disk layout of a run: every file a stage leaves in a workdir, and its readers/writers.

This is the only module that spells those names; every other module asks it for a path or calls
its readers and writers. A run of `python -m cxr_jax.main` looks like this:

  WORKDIR/
    config.json                   the config the run was started with (read back validated)
    <training stage>/             train_classifier, train_attention, train_hard_examples, ...
      model.json                  what rebuilds the model without the config or the data
      checkpoints/<step>/         the last N train states (orbax; cxr_jax/checkpoints.py)
      best/<step>/                the best train state by the validation metric
      logs/                       TensorBoard events
    evaluate/<stage>/
      metrics_<split>.json        `evaluate.compute_metrics` of the stage's best model
      predictions_<split>.npz     image ids, labels, probabilities
      thresholds.json             per-class operating points chosen on validation (optional)
    mine_hard_examples/hard_examples.json    paper 001's set B
    localize/<stage>/
      localization.json  records.jsonl  overlays/*.png
    explain/
      index.json  *.pda.png  *.attention.png
    ood/<stage>/
      gate.npz  gate.json         the out-of-distribution gate of the stage's model (fit_ood)
    activations/                  paper 003's figures (stage `activations`)
      activations.json  <image>.<figure>.png
    cv/                           k-fold cross-validation (stage `cross_validate`)
      fold_<i>/                   a whole run per fold: config.json, train_classifier/, ...
        split_ids.json            the fold's train/validation/test image ids
      cv_summary.json             per-fold test metrics, mean +- sd, pooled predictions' metrics
    anchor/anchor.npz, anchor.png     paper 002: the mean 'No Finding' image
    align/                            paper 002: the alignment regressor (a training stage's
      model.json checkpoints/ best/   files) and what it gives: transforms.npz (image id ->
      transforms.npz alignment.json   matrix, every split), alignment.json (anchor-to-image
      alignment.png                   error before/after), alignment.png (Fig. 4)
    disease_masks/, pseudo_disease_masks/
      disease_masks.npz  disease_masks.png  disease_masks.json     paper 002's psi_c (Fig. 3/7)
    report/                       report.md, metrics.json, roc.png, ... (the report stage)
    predictions/                  default output of `python -m cxr_jax.predict`
    error.log                     tracebacks of failed runs (the terminal shows one line)
    segment/                      paper 004: the mask cache of the `segment` stage (masks.json +
                                  TFDS shards; cxr_jax/data/mask_cache.py)
    evaluate/<stage>/segmentation_<split>.json, .csv   Dice/Jaccard of a segmentation stage
    evaluate/<stage>/segmentation_overlays/*.png       contours of prediction and truth
    <stage>/DONE.json             written last, when a stage finished

Imported weights (`python -m cxr_jax.tools.import_weights`) are a folder of their own:
`variables/` (orbax) and `import.json` (`IMPORT_META`).
"""

import json
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from etils import epath

from cxr_jax.io_utils import (
    atomic_write_files,
    atomic_write_json,
    atomic_write_npz,
    atomic_write_text,
    json_text,
    npz_bytes,
)

# Training stages, later ones first: the default model of a run is its most refined one.
TRAIN_STAGES = ('train_attention', 'train_hard_examples', 'train_dm', 'train_classifier',
                'train_loss_network', 'train', 'train_segmenter')

IMPORT_META = 'import.json'
IMPORT_VARIABLES = 'variables'

_CONFIG = 'config.json'
_MODEL_INFO = 'model.json'
_DONE = 'DONE.json'
_CHECKPOINTS = 'checkpoints'
_BEST = 'best'
_LOGS = 'logs'
_EVALUATE = 'evaluate'
_THRESHOLDS = 'thresholds.json'
_HARD_EXAMPLES = ('mine_hard_examples', 'hard_examples.json')
_LOCALIZE = 'localize'
_LOCALIZATION = 'localization.json'
_RECORDS = 'records.jsonl'
_OVERLAYS = 'overlays'
_EXPLAIN = 'explain'
_EXPLAIN_INDEX = 'index.json'
_OOD = 'ood'
_OOD_ARRAYS = 'gate.npz'
_OOD_SUMMARY = 'gate.json'
_REPORT = 'report'
_ACTIVATIONS = 'activations'
_ACTIVATIONS_INDEX = 'activations.json'
_CV = 'cv'
_CV_SUMMARY = 'cv_summary.json'
_SPLIT_IDS = 'split_ids.json'
# Paper 002: anchor image, alignment, disease masks (one folder per masks stage).
_ANCHOR = ('anchor', 'anchor.npz')
_ANCHOR_PNG = ('anchor', 'anchor.png')
_ALIGN_TRANSFORMS = 'transforms.npz'
_ALIGN_SUMMARY = 'alignment.json'
_ALIGN_FIGURE = 'alignment.png'
_DISEASE_MASKS = 'disease_masks.npz'
_DISEASE_MASKS_PNG = 'disease_masks.png'
_DISEASE_MASKS_JSON = 'disease_masks.json'
# What the report stage writes into report/, by kind.
REPORT_FILES = {'markdown': 'report.md', 'metrics': 'metrics.json', 'roc': 'roc.png',
                'confusion': 'confusion.png', 'localization_json': 'localization.json',
                'localization_csv': 'localization.csv', 'heatmaps': 'heatmaps',
                'localization_overlays': 'localization', 'thresholds': 'thresholds.csv',
                'cv_folds': 'folds.csv', 'activations': 'activations',
                'segmentation_overlays': 'segmentation', 'anchor': 'anchor.png',
                'alignment': 'alignment.png', 'disease_masks': 'disease_masks'}
_PREDICTIONS = 'predictions'
_ERROR_LOG = 'error.log'
# Paper 004's segmentation: the `segment` stage's mask cache (cxr_jax/data/mask_cache.py owns
# the format) and the `evaluate_segmentation` stage's results.
_SEGMENT = 'segment'
MASK_CACHE_META = 'masks.json'
MASK_CACHE_PREFIX = 'cxr_jax_masks'
_SEGMENTATION = 'segmentation_{split}.json'
_SEGMENTATION_RECORDS = 'segmentation_{split}.csv'
_SEGMENTATION_OVERLAYS = 'segmentation_overlays'


class LayoutError(FileNotFoundError):
  """A file a stage should have left is missing; the message names it and the stage."""


def read_json(path: epath.Path, what: str) -> Any:
  """Parses a JSON file; a missing file or bad JSON raises LayoutError / ValueError naming it."""
  path = epath.Path(path)
  try:
    text = path.read_text()
  except FileNotFoundError:
    raise LayoutError(f'{path}: not found; expected {what}.') from None
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: malformed JSON ({e}); expected {what}.') from None


class StageDir:
  """The folder of one training stage (`train_and_evaluate` writes it)."""

  def __init__(self, path: str | epath.PathLike):
    self.path = epath.Path(path)

  @property
  def name(self) -> str:
    return self.path.name

  @property
  def model_info_file(self) -> epath.Path:
    return self.path / _MODEL_INFO

  @property
  def checkpoints_dir(self) -> epath.Path:
    return self.path / _CHECKPOINTS

  @property
  def best_dir(self) -> epath.Path:
    return self.path / _BEST

  @property
  def logs_dir(self) -> epath.Path:
    return self.path / _LOGS

  def has_model(self) -> bool:
    return self.model_info_file.exists()

  def write_model_info(self, info: dict[str, Any]) -> None:
    atomic_write_json(self.model_info_file, info)

  def read_model_info(self) -> dict[str, Any]:
    if not self.model_info_file.exists():
      raise LayoutError(f'{self.model_info_file} not found: run the training stage '
                        f'{self.name!r} of {self.path.parent} first.')
    return read_json(self.model_info_file, f'the model description of stage {self.name!r}')


class Run:
  """A workdir of `python -m cxr_jax.main`: paths, readers and writers of what stages leave."""

  def __init__(self, root: str | epath.PathLike):
    self.root = epath.Path(root)

  def __repr__(self) -> str:
    return f'Run({str(self.root)!r})'

  # ---------------------------------------------------------------------------- config
  @property
  def config_file(self) -> epath.Path:
    return self.root / _CONFIG

  def write_config_json(self, config_json: dict[str, Any]) -> None:
    atomic_write_json(self.config_file, config_json)

  def read_config_json(self) -> dict[str, Any]:
    """config.json as a plain dict (what the run was started with)."""
    return read_json(self.config_file, 'the config.json that python -m cxr_jax.main writes')

  def has_config(self) -> bool:
    return self.config_file.exists()

  # ---------------------------------------------------------------------------- stages
  def stage_dir(self, stage: str) -> epath.Path:
    return self.root / stage

  def stage(self, stage: str) -> StageDir:
    return StageDir(self.root / stage)

  def done_file(self, stage: str) -> epath.Path:
    return self.root / stage / _DONE

  def is_done(self, stage: str) -> bool:
    return self.done_file(stage).exists()

  def mark_done(self, stage: str, seconds: float) -> None:
    atomic_write_json(self.done_file(stage), {'seconds': round(seconds, 1),
                                              'finished': time.strftime('%Y-%m-%d %H:%M:%S')})

  def trained_stages(self, candidates: Iterable[str] = TRAIN_STAGES) -> list[str]:
    """The stages among `candidates` that have a trained model (model.json), in that order."""
    return [s for s in candidates if self.stage(s).has_model()]

  # ---------------------------------------------------------------------------- evaluate
  def eval_dir(self, stage: str) -> epath.Path:
    return self.root / _EVALUATE / stage

  def metrics_file(self, stage: str, split: str) -> epath.Path:
    return self.eval_dir(stage) / f'metrics_{split}.json'

  def predictions_file(self, stage: str, split: str) -> epath.Path:
    return self.eval_dir(stage) / f'predictions_{split}.npz'

  def thresholds_file(self, stage: str) -> epath.Path:
    return self.eval_dir(stage) / _THRESHOLDS

  def write_metrics(self, stage: str, split: str, metrics: dict[str, Any]) -> None:
    atomic_write_json(self.metrics_file(stage, split), metrics)

  def read_metrics(self, stage: str, split: str) -> dict[str, Any]:
    path = self.metrics_file(stage, split)
    if not path.exists():
      raise LayoutError(f'{path}: not found; expected the {split!r} metrics of stage {stage!r} '
                        f'(the evaluate stage of {self.root} writes them).')
    return read_json(path, f'the {split!r} metrics of stage {stage!r}')

  def write_predictions(self, stage: str, split: str, image_ids: list[str], labels: np.ndarray,
                        probs: np.ndarray) -> None:
    atomic_write_npz(self.predictions_file(stage, split), image_ids=np.asarray(image_ids),
                     labels=labels, probs=probs)

  def read_predictions(self, stage: str, split: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(image ids, labels [N, K], probabilities [N, K]) the evaluate stage wrote."""
    path = self.predictions_file(stage, split)
    if not path.exists():
      raise LayoutError(f'{path}: not found; expected the {split!r} predictions of stage '
                        f'{stage!r} (the evaluate stage of {self.root} writes them).')
    with np.load(path) as f:
      return [str(s) for s in f['image_ids']], f['labels'], f['probs']

  def write_thresholds(self, stage: str, thresholds: dict[str, Any]) -> None:
    atomic_write_json(self.thresholds_file(stage), thresholds)

  def read_thresholds(self, stage: str) -> dict[str, Any] | None:
    """The per-class operating points of `stage` chosen on validation, or None."""
    path = self.thresholds_file(stage)
    return read_json(path, 'per-class thresholds') if path.exists() else None

  # ---------------------------------------------------------------------------- paper 001
  @property
  def hard_examples_file(self) -> epath.Path:
    return self.root.joinpath(*_HARD_EXAMPLES)

  def write_hard_examples(self, result: dict[str, Any]) -> None:
    atomic_write_json(self.hard_examples_file, result)

  # ---------------------------------------------------------------------------- localize
  def localize_dir(self, stage: str) -> epath.Path:
    return self.root / _LOCALIZE / stage

  def localization_file(self, stage: str) -> epath.Path:
    return self.localize_dir(stage) / _LOCALIZATION

  def records_file(self, stage: str) -> epath.Path:
    return self.localize_dir(stage) / _RECORDS

  def localize_overlays_dir(self, stage: str) -> epath.Path:
    return self.localize_dir(stage) / _OVERLAYS

  def write_localization(self, stage: str, metrics: dict[str, Any],
                         records: list[dict[str, Any]]) -> None:
    atomic_write_text(self.records_file(stage), ''.join(json.dumps(r) + '\n' for r in records))
    atomic_write_json(self.localization_file(stage), metrics)

  def read_localization(self, stage: str) -> dict[str, Any] | None:
    """The localisation metrics of `stage`, or None when the localize stage did not run."""
    path = self.localization_file(stage)
    if not path.exists():
      return None
    result = read_json(path, f'the localisation results of stage {stage!r}')
    if not isinstance(result, dict):
      raise ValueError(f'{path}: expected a JSON object from localization.localization_metrics.')
    return result

  # ---------------------------------------------------------------------------- explain
  @property
  def explain_dir(self) -> epath.Path:
    return self.root / _EXPLAIN

  @property
  def explain_index_file(self) -> epath.Path:
    return self.explain_dir / _EXPLAIN_INDEX

  def write_explain_index(self, index: dict[str, Any]) -> None:
    atomic_write_json(self.explain_index_file, index)

  def read_explain_index(self) -> dict[str, Any] | None:
    path = self.explain_index_file
    return read_json(path, 'the explain stage index') if path.exists() else None

  # ---------------------------------------------------------------------------- OOD gate
  def ood_dir(self, stage: str) -> epath.Path:
    return self.root / _OOD / stage

  def ood_arrays_file(self, stage: str) -> epath.Path:
    return self.ood_dir(stage) / _OOD_ARRAYS

  def ood_summary_file(self, stage: str) -> epath.Path:
    return self.ood_dir(stage) / _OOD_SUMMARY

  def write_ood_gate(self, stage: str, arrays: dict[str, np.ndarray],
                     summary: dict[str, Any]) -> None:
    """The fit_ood stage's gate of `stage` (cxr_jax/ood.py arrays) and its summary."""
    # One call, the summary replaced first: readers look for the arrays, so they never see
    # a gate without its summary.
    atomic_write_files({self.ood_summary_file(stage): lambda: json_text(summary),
                        self.ood_arrays_file(stage): lambda: npz_bytes(**arrays)})

  def read_ood_gate(self, stage: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """(arrays, summary) of the gate of `stage`, or None when fit_ood has not run for it."""
    path = self.ood_arrays_file(stage)
    if not path.exists():
      return None
    with np.load(path) as f:
      arrays = {k: f[k] for k in f.files}
    return arrays, read_json(self.ood_summary_file(stage), f'the OOD gate summary of {stage!r}')

  # ---------------------------------------------------------------------------- paper 003
  @property
  def activations_dir(self) -> epath.Path:
    return self.root / _ACTIVATIONS

  @property
  def activations_index_file(self) -> epath.Path:
    return self.activations_dir / _ACTIVATIONS_INDEX

  def write_activations_index(self, index: dict[str, Any]) -> None:
    atomic_write_json(self.activations_index_file, index)

  def read_activations_index(self) -> dict[str, Any] | None:
    path = self.activations_index_file
    return read_json(path, 'the activations stage index') if path.exists() else None

  @property
  def cv_dir(self) -> epath.Path:
    return self.root / _CV

  def cv_fold(self, fold: int) -> 'Run':
    """The sub-run of cross-validation fold `fold` (a whole workdir of its own)."""
    return Run(self.cv_dir / f'fold_{fold}')

  def split_ids_file(self, fold: int) -> epath.Path:
    return self.cv_fold(fold).root / _SPLIT_IDS

  def write_split_ids(self, fold: int, content: dict[str, Any]) -> None:
    atomic_write_json(self.split_ids_file(fold), content)

  @property
  def cv_summary_file(self) -> epath.Path:
    return self.cv_dir / _CV_SUMMARY

  def write_cv_summary(self, summary: dict[str, Any]) -> None:
    atomic_write_json(self.cv_summary_file, summary)

  def read_cv_summary(self) -> dict[str, Any]:
    if not self.cv_summary_file.exists():
      raise LayoutError(f'{self.cv_summary_file}: not found; the cross_validate stage of '
                        f'{self.root} writes it.')
    return read_json(self.cv_summary_file, 'the cross-validation summary')
  # ---------------------------------------------------------------------------- paper 004
  @property
  def mask_cache_dir(self) -> epath.Path:
    """segment/: the mask cache the `segment` stage writes (cxr_jax/data/mask_cache.py)."""
    return self.root / _SEGMENT

  def segmentation_file(self, stage: str, split: str) -> epath.Path:
    return self.eval_dir(stage) / _SEGMENTATION.format(split=split)

  def segmentation_records_file(self, stage: str, split: str) -> epath.Path:
    return self.eval_dir(stage) / _SEGMENTATION_RECORDS.format(split=split)

  def segmentation_overlays_dir(self, stage: str) -> epath.Path:
    return self.eval_dir(stage) / _SEGMENTATION_OVERLAYS

  def read_segmentation(self, stage: str, split: str) -> dict[str, Any] | None:
    """The segmentation metrics of `stage` on `split`, or None when they were not computed."""
    path = self.segmentation_file(stage, split)
    return read_json(path, f'the {split!r} segmentation metrics of stage {stage!r}') \
        if path.exists() else None

  # ---------------------------------------------------------------------------- paper 002
  @property
  def anchor_file(self) -> epath.Path:
    return self.root.joinpath(*_ANCHOR)

  @property
  def anchor_png(self) -> epath.Path:
    return self.root.joinpath(*_ANCHOR_PNG)

  def write_anchor(self, anchor: np.ndarray, image_ids: list[str], requested: int,
                   png: bytes) -> None:
    """The anchor image [P, P, C] (model-input values), the ids averaged, N asked for."""
    atomic_write_files({self.anchor_file: npz_bytes(
        anchor=np.asarray(anchor, np.float32), image_ids=np.asarray(image_ids),
        requested=np.int64(requested)), self.anchor_png: png})

  def read_anchor(self) -> dict[str, Any]:
    """{'anchor' [P, P, C], 'image_ids', 'requested'} the anchor stage wrote."""
    path = self.anchor_file
    if not path.exists():
      raise LayoutError(f'{path}: not found; expected the anchor image (run the anchor stage '
                        f'of {self.root} first).')
    with np.load(path) as f:
      return {'anchor': f['anchor'], 'image_ids': [str(s) for s in f['image_ids']],
              'requested': int(f['requested'])}

  def align_file(self, stage: str, kind: str) -> epath.Path:
    """align/<file> of kind 'transforms', 'summary' or 'figure'."""
    names = {'transforms': _ALIGN_TRANSFORMS, 'summary': _ALIGN_SUMMARY,
             'figure': _ALIGN_FIGURE}
    return self.root / stage / names[kind]

  @property
  def align_transforms_file(self) -> epath.Path:
    return self.align_file('align', 'transforms')

  def write_align_transforms(self, image_ids: list[str], splits: list[str], params: np.ndarray,
                             matrices: np.ndarray) -> None:
    atomic_write_npz(self.align_transforms_file, image_ids=np.asarray(image_ids),
                     splits=np.asarray(splits), params=np.asarray(params, np.float32),
                     matrices=np.asarray(matrices, np.float32))

  def read_align_transforms(self) -> tuple[list[str], np.ndarray]:
    """(image ids, sampling matrices [N, 2, 3]) the align stage wrote."""
    path = self.align_transforms_file
    if not path.exists():
      raise LayoutError(f'{path}: not found; expected the per-image transforms of the align '
                        f'stage (run it first: --stages=anchor,align).')
    with np.load(path) as f:
      return [str(s) for s in f['image_ids']], f['matrices']

  def disease_masks_file(self, stage: str, kind: str = 'npz') -> epath.Path:
    """<masks stage>/disease_masks.{npz,png,json}."""
    names = {'npz': _DISEASE_MASKS, 'png': _DISEASE_MASKS_PNG, 'json': _DISEASE_MASKS_JSON}
    return self.root / stage / names[kind]

  def write_disease_masks(self, stage: str, arrays: dict[str, np.ndarray],
                          summary: dict[str, Any], png: bytes) -> None:
    atomic_write_files({self.disease_masks_file(stage, 'npz'): npz_bytes(**arrays),
                        self.disease_masks_file(stage, 'json'): json_text(summary),
                        self.disease_masks_file(stage, 'png'): png})

  def read_disease_masks(self, stage: str) -> dict[str, Any]:
    """{'masks' [K, P, P], 'classes', ...} written by a disease-mask stage."""
    path = self.disease_masks_file(stage)
    if not path.exists():
      raise LayoutError(f'{path}: not found; expected disease masks (run the {stage!r} stage '
                        f'of {self.root} first).')
    with np.load(path) as f:
      out = {k: f[k] for k in f.files}
    out['classes'] = [str(c) for c in out['classes']]
    return out

  def write_align_results(self, summary: dict[str, Any], figure_png: bytes) -> None:
    atomic_write_files({self.align_file('align', 'summary'): json_text(summary),
                        self.align_file('align', 'figure'): figure_png})

  def read_align_summary(self) -> dict[str, Any] | None:
    """align/alignment.json (anchor-to-image error before/after), or None."""
    path = self.align_file('align', 'summary')
    return read_json(path, 'the align stage summary') if path.exists() else None

  def read_disease_masks_summary(self, stage: str) -> dict[str, Any] | None:
    path = self.disease_masks_file(stage, 'json')
    return read_json(path, f'the summary of the {stage!r} stage') if path.exists() else None

  # ---------------------------------------------------------------------------- outputs
  @property
  def report_dir(self) -> epath.Path:
    return self.root / _REPORT

  def report_file(self, kind: str) -> epath.Path:
    """report/<file> of one of `REPORT_FILES`'s kinds."""
    if kind not in REPORT_FILES:
      raise KeyError(f'report file kind {kind!r}; valid: {sorted(REPORT_FILES)}')
    return self.report_dir / REPORT_FILES[kind]

  @property
  def error_log_file(self) -> epath.Path:
    """Tracebacks of failed runs (the terminal shows one line)."""
    return self.root / _ERROR_LOG

  @property
  def predictions_dir(self) -> epath.Path:
    return self.root / _PREDICTIONS


def imported_weights_ready(directory: str | epath.PathLike) -> bool:
  """Whether `directory` holds weights written by `python -m cxr_jax.tools.import_weights`."""
  return (epath.Path(directory) / IMPORT_META).exists()
