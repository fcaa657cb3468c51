"""The base config every method config starts from, and the checks run before a job starts.

Method configs (`configs/*.py`) call `base_config()` and override; `validate` turns a bad
name or value into one clear error naming the `config.` key before any work is done.
"""

import copy
import importlib.util
import pathlib
from collections.abc import Container
from typing import Any

import ml_collections

from cxr_jax.labels import NIH_CLASSES


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every method; each field is documented where it is used."""
  c = ml_collections.ConfigDict()
  c.name = ''
  c.seed = 0
  c.dtype = 'float32'  # compute dtype; 'bfloat16' on accelerators, parameters stay float32
  # On XLA:CPU only: the YNNPACK fusion types the train step is compiled with
  # (cxr_jax/xla_options.py). 'eltwise' speeds up the large networks' steps and slows small ones
  # (measured per model; configs add it where it pays); ignored on GPUs and TPUs.
  c.cpu_fusions = ('dot', 'reduce', 'individual_dot')
  c.stages = ('train_classifier', 'evaluate', 'fit_ood', 'report')
  # Training stages whose best checkpoints `evaluate` and `report` put side by side, in table
  # order: (stage, label in the tables) pairs.
  c.report_models = (('train_classifier', 'Model'),)
  # Initialise the model before training (strict shapes): from an earlier stage's best
  # checkpoint (stage name; `target` = the top-level parameter subtree to fill, e.g. 'backbone')
  # or from imported weights (`checkpoint` = a `python -m cxr_jax.tools.import_weights` output
  # directory, e.g. ImageNet ResNet-101; the classifier head keeps this run's initialisation;
  # `fresh` = glob patterns of variables the checkpoint lacks that keep this run's
  # initialisation, e.g. ('params/*/se/*',) for SE blocks on an ImageNet ResNet).
  c.init_from = ml_collections.ConfigDict({'stage': '', 'target': '', 'checkpoint': '',
                                           'fresh': ()})
  # Per training stage, top-level fields replaced wholesale for that stage (see stages.py).
  c.stage_overrides = ml_collections.ConfigDict()

  c.data = ml_collections.ConfigDict()
  c.data.name = 'cxr_phantom/64'
  c.data.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.data.train_split = 'train'
  c.data.eval_splits = ml_collections.ConfigDict({'validation': 'validation', 'test': 'test'})
  c.data.classes = NIH_CLASSES
  c.data.drop_no_finding = False
  c.data.pp_train = 'decode|normalize("minus_one_one")'
  c.data.pp_eval = 'decode|normalize("minus_one_one")'
  c.data.shuffle_buffer = 10_000
  c.data.cache = False
  c.data.prefetch = 2
  # JSON {'copies': {image_id: k}}: those train examples appear 1 + k times per epoch (paper
  # 001's set C; the train_hard_examples stage sets it to what mine_hard_examples wrote).
  c.data.extra_copies = ''
  # The feature the loss and the evaluator read ('labels': multi-hot over `classes`; 'label':
  # one class index; 'masks': segmentation masks), and the features the model takes besides
  # the image (passed to it by name, e.g. ('masks',)); cxr_jax/data/pipeline.py.
  c.data.target = 'labels'
  c.data.inputs = ()
  # Features the preprocessing ops read that are not batched (e.g. ('lung_mask', 'image_id')
  # for paper 003's lung_roi), and a JSON file of splits by image id (k-fold
  # cross-validation; the cross_validate stage sets it per fold): cxr_jax/data/pipeline.py.
  c.data.pp_keys = ()
  c.data.split_ids = ''
  # Segmentation (paper 004; target 'masks'): the names of the mask channels, which are the
  # model's outputs (cxr_jax/segmentation_metrics.py); `validation_holdout` > 0 holds that
  # fraction of the train split out of training as the split 'train_holdout' (for data sets
  # without a validation split); `mask_cache` = masks the `segment` stage wrote, joined to the
  # examples by image id ('segment' = this run's segment stage; else a folder).
  c.data.structures = ('left_lung', 'right_lung', 'heart')
  c.data.validation_holdout = 0.0
  c.data.mask_cache = ''

  c.model = ml_collections.ConfigDict({'name': 'mobilenet_v1'})
  c.loss = 'sigmoid_bce'

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'adam'
  c.optimizer.learning_rate = 1e-3
  c.optimizer.schedule = ml_collections.ConfigDict({'name': 'constant'})
  c.optimizer.weight_decay = 0.0
  c.optimizer.decoupled = False
  c.optimizer.decay_mask = 'all'
  c.optimizer.grad_clip_norm = 0.0
  c.optimizer.kwargs = ml_collections.ConfigDict()
  c.optimizer.frozen = ()  # parameter path prefixes not trained, e.g. ('backbone',)
  c.optimizer.plateau = ml_collections.ConfigDict({
      'enabled': False, 'metric': 'loss', 'patience': 5, 'factor': 0.1, 'cooldown': 0,
      'max_reductions': 3})

  c.batch_size = 64
  c.eval_batch_size = 128
  c.num_train_steps = -1  # > 0 overrides num_epochs
  c.num_epochs = 1.0
  c.log_every_steps = 50
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 2
  # A step whose loss or gradient is not finite is never applied. 'stop': training stops at
  # the next log/eval/checkpoint step with an error naming that step and the last good
  # checkpoint (kept); 'skip': such steps are skipped and counted (train/nonfinite_steps).
  c.nan_policy = 'stop'

  # Prediction Difference Analysis heat maps (stage `explain`, and `python -m cxr_jax.predict
  # --explain=pda`): level 'features' (paper 000: last feature map, head only) or 'pixels'.
  # The stage explains the first `num_images` images *with boxes* of `split` ('' = the test
  # split, data.eval_splits.test: never images the model trained on or was selected with).
  # laplace_n: N of PDA's Laplace correction, 0 = the training split's size.
  c.explain = ml_collections.ConfigDict({
      'level': 'features', 'split': '', 'num_images': 8, 'sampler': 'marginal',
      'window': 2, 'stride': 1, 'padding': 1, 'num_samples': 10, 'chunk_size': 256,
      'num_reference': 64, 'laplace_n': 0, 'seed': 0})

  # Paper 001's hard example attention (stages mine_hard_examples, train_hard_examples): the
  # model of `source_stage` scores the train split; positives with prob <= threshold are hard;
  # 'per_image' adds each image with a hard positive once, 'per_pair' once per missed class.
  c.hard_examples = ml_collections.ConfigDict(
      {'source_stage': 'train_classifier', 'threshold': 0.5, 'copies': 'per_image'})

  # Localisation on a box split (stage `localize`, cxr_jax/stages/localize.py): heat maps by
  # `method` ('cam': class score maps of linear heads and of the space attention head;
  # 'grad_cam': any head) at the last feature map, upsampled to the model input, binarised
  # into boxes (`boxes`: explain/boxes.py BoxSettings; mode 'largest', 'all', 'peak' or
  # 'multi_threshold' = Wang et al.'s boxes at every level of `boxes.thresholds`) without any
  # ground truth; `pp` = the preprocessing of that split ('' = data.pp_eval); accuracy and
  # average false positives (AFP) at each T(IoU) of `iou_thresholds`; `require_prediction`: a
  # box counts as missed unless the model also predicts its class; `classes`: score only these
  # classes' boxes (() = every class of the model).
  c.localize = ml_collections.ConfigDict({
      'split': 'bbox', 'method': 'cam', 'pp': '',
      'boxes': ml_collections.ConfigDict({'threshold': 0.5, 'normalize': 'minmax',
                                          'mode': 'largest', 'min_area': 0.0,
                                          'connectivity': 8,
                                          'thresholds': (60 / 255, 180 / 255)}),
      'iou_thresholds': (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7), 'require_prediction': False,
      'batch_size': 16, 'num_overlays': 8, 'classes': ()})

  # Out-of-distribution gate of the viewer (stage `fit_ood`, cxr_jax/ood.py): PCA
  # reconstruction error of standardised s x s thumbnails (`image_size`, components keeping
  # `variance`; `features`: also the Mahalanobis distance of the pooled last feature map),
  # fitted on up to `max_images` images of the training split (robust z scores from
  # `folds`-fold cross-fitting), the threshold set on the validation split for
  # `false_alarm_rate`; one gate per model of `stages` (() = the stages of report_models).
  c.ood = ml_collections.ConfigDict({
      'false_alarm_rate': 0.05, 'image_size': 32, 'variance': 0.95, 'features': False,
      'max_images': 2000, 'folds': 5, 'batch_size': 64, 'stages': ()})
  # k-fold cross-validation (stage `cross_validate`, cxr_jax/data/folds.py): folds = k >= 3
  # (0: off) over the examples of TFDS split `pool`, stratified by the single label, grouped by
  # patient, shuffled with `seed`; each fold runs `stages` in its own sub-run of the workdir.
  c.cv = ml_collections.ConfigDict({'folds': 0, 'seed': 0, 'pool': 'train+validation+test',
                                    'stages': ('train_classifier', 'evaluate')})
  # Paper 004's `segment` stage (cxr_jax/stages/segment.py): the U-Net of `source` ('' = this
  # run's train_segmenter stage; else 'RUN' or 'RUN:stage' of a segmentation run) segments
  # every image of `splits` (() = config.data.train_split and eval_splits) of config.data into
  # a mask cache, `shard_size` images per shard, binarised at `threshold`.
  c.segment = ml_collections.ConfigDict({'source': '', 'splits': (), 'batch_size': 32,
                                         'shard_size': 512, 'threshold': 0.5})

  c.evaluator = 'multilabel_classification'
  c.best_metric = 'mean_auroc'
  # Decision threshold: a probability, or 'per_class': one threshold per class chosen on the
  # validation split by `threshold_rule` ('max_f1': each class's F1; 'youden': sensitivity +
  # specificity - 1), stored with the run by the evaluate stage (
  # layout.Run.thresholds_file) and applied to the test split, `predict` and the viewer.
  c.threshold = ml_collections.FieldReference(0.5, field_type=object)
  c.threshold_rule = 'max_f1'
  return c


SEGMENTATION_TARGET = 'masks'


def is_segmentation(config: ml_collections.ConfigDict) -> bool:
  """Whether `config` trains a segmenter (target 'masks'), not a classifier."""
  return config.data.get('target', 'labels') == SEGMENTATION_TARGET


def output_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """What the model's K outputs are: config.data.structures for a segmenter, else
  config.data.classes."""
  if is_segmentation(config):
    return tuple(config.data.get('structures', ()))
  return tuple(config.data.classes)


def stage_config(config: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
  """`config` with the top-level fields in `config.stage_overrides.<stage>` replaced wholesale.

  A method with two training stages keeps stage 1's settings at the top level and lists what
  stage 2 changes under its name, e.g. `config.stage_overrides.train_attention.model`.
  """
  overrides = config.stage_overrides.get(stage)
  if not overrides:
    return config
  cfg = copy.deepcopy(config)
  with cfg.unlocked():
    for key, value in overrides.items():
      if key not in cfg or key == 'stage_overrides':
        raise ValueError(f'config.stage_overrides.{stage}.{key}: not a config field that a '
                         'stage can override.')
      cfg[key] = copy.deepcopy(value)
  return cfg


# Stands for the run's folder in config strings (e.g. paper 002's `align("{workdir}")` pp op,
# which reads that run's alignment transforms); `stages.run` fills it in before any stage runs.
WORKDIR_TOKEN = '{workdir}'


def expand_workdir(config: ml_collections.ConfigDict, workdir: Any) -> ml_collections.ConfigDict:
  """`config` with every WORKDIR_TOKEN in its string fields replaced by the absolute run
  folder (a copy; `config` itself when it has none)."""
  if WORKDIR_TOKEN not in config.to_json_best_effort():
    return config
  from etils import epath
  root = str(epath.Path(workdir).absolute())
  cfg = copy.deepcopy(config)

  def visit(node: ml_collections.ConfigDict) -> None:
    for key, value in list(node.items()):
      if isinstance(value, ml_collections.ConfigDict):
        visit(value)
      elif isinstance(value, str) and WORKDIR_TOKEN in value:
        node[key] = value.replace(WORKDIR_TOKEN, root)

  visit(cfg)
  return cfg


def load_sibling(config_file: str, name: str) -> Any:
  """The module `name` ('_common.py') next to `config_file` (a config's `__file__`).

  Config files are loaded by path (`--config=configs/x.py`), not as a package, so the parts
  several configs share are loaded the same way.
  """
  path = pathlib.Path(config_file).with_name(name)
  spec = importlib.util.spec_from_file_location(f'cxr_jax_configs_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _positive(config: ml_collections.ConfigDict, *keys: str) -> None:
  for key in keys:
    value = config
    for part in key.split('.'):
      value = value[part]
    if not value > 0:
      raise ValueError(f'config.{key}={value!r}: expected a positive number.')


def _check(key: str, fn, *args) -> None:
  """Runs a registry lookup or parser; its ValueError is re-raised naming `config.<key>`."""
  try:
    fn(*args)
  except ValueError as e:
    raise ValueError(f'config.{key}: {e}') from None


def _one_of(value: str, valid: tuple[str, ...]) -> None:
  if value not in valid:
    raise ValueError(f'{value!r}; valid: {list(valid)}')


def validate(config: ml_collections.ConfigDict, stage_names: Container[str] | None = None
             ) -> None:
  """Raises ValueError naming the first bad `config.` key (registries list valid names).

  stage_names: the registered stages (cxr_jax.stages.STAGES); None skips that check (a run
  read back for inference).
  """
  def check_stage(key: str, stage: str) -> None:
    if stage_names is not None and stage not in stage_names:
      raise ValueError(f'config.{key}: unknown stage {stage!r}; valid names: '
                       f'{", ".join(sorted(stage_names))}')

  for stage in config.stages:
    check_stage('stages', stage)
  # Cross-validated runs report the models their folds train (config.cv.stages).
  cv_stages = tuple(config.cv.stages) if 'cross_validate' in config.stages else ()
  for stage, _ in config.report_models:
    if stage not in config.stages and stage not in cv_stages:
      raise ValueError(f'config.report_models: {stage!r} is not one of config.stages '
                       f'{list(config.stages)}.')
  if 'cross_validate' in config.stages:
    if config.cv.folds < 3:
      raise ValueError(f'config.cv.folds={config.cv.folds!r}: the cross_validate stage needs '
                       '>= 3 folds (one tests, the next validates, the rest train).')
    for stage in config.cv.stages:
      check_stage('cv.stages', stage)
  _check_fields(config)
  for stage in config.stage_overrides:
    check_stage('stage_overrides', stage)
    try:
      _check_fields(stage_config(config, stage))
    except ValueError as e:
      raise ValueError(f'{e} (with config.stage_overrides.{stage})') from None


def _check_fields(config: ml_collections.ConfigDict) -> None:
  """The checks of `validate` that apply to one stage's effective config."""
  from cxr_jax import evaluate, losses, metrics, optim, xla_options
  from cxr_jax.data import ops
  from cxr_jax.evaluators import EVALUATORS
  from cxr_jax.labels import class_indices
  from cxr_jax.models import MODELS, parse_dtype

  _check('model.name', MODELS.get, config.model.name)
  _check('dtype', parse_dtype, config.dtype)
  xla_options.check_cpu_fusions(tuple(config.get('cpu_fusions', ())))  # names config.cpu_fusions
  _check('loss', losses.get_loss, config.loss)
  _check('optimizer.name', optim.OPTIMIZERS.get, config.optimizer.name)
  _check('optimizer.schedule.name', optim.SCHEDULES.get, config.optimizer.schedule.name)
  _check('evaluator', EVALUATORS.get, config.evaluator)
  scalars = getattr(EVALUATORS.get(config.evaluator), 'SCALAR_METRICS', None)
  _check('best_metric', evaluate.select_metric, {}, config.best_metric, True, scalars)
  if config.optimizer.plateau.enabled:
    _check('optimizer.plateau.metric', evaluate.select_metric, {}, config.optimizer.plateau.metric,
          True, scalars)
  if config.data.get('target', 'labels') == 'labels':
    # Multi-hot labels are gathered from the NIH vocabulary; a single-label target ('label')
    # names its own classes (e.g. ('normal', 'tb')).
    _check('data.classes', class_indices, tuple(config.data.classes))
  elif not config.data.classes or len(set(config.data.classes)) != len(config.data.classes):
    raise ValueError(f'config.data.classes={tuple(config.data.classes)!r}: expected distinct '
                     'class names.')
  _check_segmentation(config)
  _check('localize.method', _one_of, config.localize.method, ('cam', 'grad_cam'))
  _check('localize.classes', class_indices, tuple(config.localize.get('classes') or ()))
  _check('hard_examples.copies', _one_of, config.hard_examples.copies,
         ('per_image', 'per_pair'))
  if not 0.0 < config.hard_examples.threshold < 1.0:
    raise ValueError(f'config.hard_examples.threshold={config.hard_examples.threshold!r}: '
                     'expected a probability in (0, 1).')
  from cxr_jax.explain.boxes import BoxSettings
  BoxSettings.from_config(config.localize.boxes)  # its errors name config.localize.boxes.<key>
  if config.localize.pp:
    _check('localize.pp', ops.get_preprocess_fn, config.localize.pp)
  _check('data.pp_train', ops.get_preprocess_fn, config.data.pp_train)
  _check('data.pp_eval', ops.get_preprocess_fn, config.data.pp_eval)
  _positive(config, 'batch_size', 'eval_batch_size', 'log_every_steps', 'eval_every_steps',
            'checkpoint_every_steps', 'keep_checkpoints', 'optimizer.learning_rate')
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise ValueError('config.num_train_steps or config.num_epochs must be positive.')
  threshold = config.threshold
  if isinstance(threshold, str):
    if threshold != 'per_class':
      raise ValueError(f"config.threshold={threshold!r}: expected a probability in (0, 1) or "
                       "'per_class'.")
  elif isinstance(threshold, bool) or not isinstance(threshold, int | float) or not (
      0.0 < threshold < 1.0):
    raise ValueError(f"config.threshold={threshold!r}: expected a probability in (0, 1) or "
                     "'per_class'.")
  _check('nan_policy', _one_of, config.get('nan_policy', 'stop'), ('stop', 'skip'))
  _check('threshold_rule', _one_of, config.get('threshold_rule', 'max_f1'),
         tuple(metrics.THRESHOLD_RULES))
  if 'ood' in config and not 0.0 < config.ood.false_alarm_rate < 1.0:
    raise ValueError(f'config.ood.false_alarm_rate={config.ood.false_alarm_rate!r}: expected a '
                     'rate in (0, 1).')
  if 'align' in config:
    _check_paper002(config)
  if config.explain.get('laplace_n', 0) < 0:
    raise ValueError(f'config.explain.laplace_n={config.explain.laplace_n!r}: expected >= 0 '
                     '(0 = the training split size).')


def _check_segmentation(config: ml_collections.ConfigDict) -> None:
  """Paper 004's fields: structures, hold-out fraction, the segment stage's settings."""
  from cxr_jax import segmentation_metrics
  holdout = config.data.get('validation_holdout', 0.0)
  if not 0.0 <= holdout < 1.0:
    raise ValueError(f'config.data.validation_holdout={holdout!r}: expected a fraction in '
                     '[0, 1).')
  if is_segmentation(config):
    _check('data.structures', segmentation_metrics.check_structures,
           tuple(config.data.get('structures', ())))
    if config.evaluator != 'segmentation':
      raise ValueError(f"config.evaluator={config.evaluator!r}: a segmentation config "
                       "(config.data.target='masks') needs the 'segmentation' evaluator.")
  if 'segment' in config:
    seg = config.segment
    if not 0.0 < seg.threshold < 1.0:
      raise ValueError(f'config.segment.threshold={seg.threshold!r}: expected a probability in '
                       '(0, 1).')
    _positive(config, 'segment.batch_size', 'segment.shard_size')


def _check_paper002(config: ml_collections.ConfigDict) -> None:
  """Paper 002's sections: the alignment module, disease masks (configs/disease_masks)."""
  from cxr_jax import optim
  from cxr_jax.data import ops
  from cxr_jax.labels import class_indices
  from cxr_jax.models import MODELS
  a = config.align
  _check('align.model.name', MODELS.get, a.model.name)
  _check('align.optimizer.name', optim.OPTIMIZERS.get, a.optimizer.name)
  _check('align.optimizer.schedule.name', optim.SCHEDULES.get, a.optimizer.schedule.name)
  _check('align.pp', ops.get_preprocess_fn, a.pp)
  _check('align.euclidean_reduction', _one_of, a.euclidean_reduction, ('sum', 'mean'))
  _positive(config, 'align.batch_size', 'align.smooth_kernel', 'align.anchor_images',
            'align.log_every_steps', 'align.checkpoint_every_steps', 'align.min_scale',
            'align.optimizer.learning_rate')
  if a.num_train_steps <= 0 and a.num_epochs <= 0:
    raise ValueError('config.align.num_train_steps or config.align.num_epochs must be positive.')
  if not a.min_scale < 1.0 < a.max_scale:
    raise ValueError(f'config.align.min_scale={a.min_scale}, max_scale={a.max_scale}: expected '
                     'min_scale < 1 < max_scale (the identity must be allowed).')
  d = config.disease_masks
  _check('disease_masks.classes', class_indices, tuple(d.classes))
  _check('disease_masks.asymmetric', class_indices, tuple(d.asymmetric))
  _check('disease_masks.empty', _one_of, d.empty, ('zeros', 'positives', 'error'))
  _check('disease_masks.attention_from', _one_of, d.attention_from,
         ('disease_masks', 'pseudo_disease_masks'))
  if not 0.0 < d.min_prob <= 1.0 or not 0.0 <= d.threshold <= 1.0:
    raise ValueError(f'config.disease_masks.min_prob={d.min_prob} / threshold={d.threshold}: '
                     'expected probabilities (min_prob in (0, 1], threshold in [0, 1]).')
