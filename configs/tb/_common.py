"""What paper 003's four TB configs share (configs/tb/{custom_cnn,alexnet,vgg16,vgg19}.py).

Sivaramakrishnan et al. 2018, "Visualizing abnormalities in chest radiographs through salient
network activations in Deep Learning": normal vs TB on the NLM Montgomery and Shenzhen sets.

Section II-A: lungs segmented (ROI), "the ROI is resized to a 1024 x 1024 matrix and
contrast-enhanced by applying CLAHE"; 70/20/10 train/validation/test; augmentation by
translations and rotations. Section II-B/C: 2-way softmax, "multinomial logistic regression"
(softmax cross entropy), SGD with momentum, L2 5e-4, learning rate 1e-3 divided by 10 when
validation accuracy stops improving (three times at most), 60 epochs.

Readings and choices where the paper is silent (each a config field):
- Data: `tb_combined/1024` (both sets, 70/20/10 seeded and stratified by set and label, as the
  paper trains on both); `--config.data.name=montgomery_tb/1024` or `shenzhen_tb/1024` for one
  set, `cxr_samples/montgomery_tb` with `--config.data.data_dir=...` for the team's samples.
- Lung ROI: `lung_roi("crop")` crops to the bounding box of the data set's lung masks
  (`lung_mask`: Montgomery's manual masks, Shenzhen's Kaggle masks); `lung_roi("mask")` zeroes
  what lies outside the lungs instead: the config argument `roi=mask` (`roi=crop_mask`: both;
  `roi=none`: no ROI, e.g. for the Montgomery sample, which has no masks), e.g.
  `--config=configs/tb/custom_cnn.py:cv,roi=none`. An image without a mask fails naming the
  image. Lungs from a U-Net run (paper 004) where the data set has no masks: the config argument
  `masks=unet` (only the U-Net's) or `masks=both` (the data set's manual mask where there is
  one, else the U-Net's), with `--config.data.mask_cache=UNET_RUN/segment` (the `segment`
  stage's or `python -m cxr_jax.segment`'s cache of this data set), e.g.
  `:roi=crop,masks=unet --config.data.name=cxr_samples/montgomery_tb --config.data.mask_cache=...`.
- CLAHE: scikit-image's equalize_adapthist with Matlab adapthisteq's defaults (8 x 8 tiles,
  clip limit 0.01, 256 bins): the paper ran Matlab R2017a and names no values.
- Augmentation: random translation by up to 10 % of the input size and rotation up to 10
  degrees (ours), on the network-size image.
- Momentum 0.9 (not given); L2 on weights only (Matlab's BiasL2Factor is 0); plateau patience
  5 evaluations (ours), one evaluation per `eval_every_steps`.
- Batch 16 (not given): "15,000 iterations (60 epochs)" means 250 iterations per epoch, which
  at 560 training images fits an offline-augmented set ~7x the size at batch 16; we augment on
  the fly and count epochs over the split (`--config.num_train_steps=15000` for the count).
- Operating point: the threshold on P(tb) maximising F1 on the validation split (the softmax's
  argmax is 0.5: `--config.threshold=0.5`); the best checkpoint by validation accuracy.
"""

import ml_collections

from cxr_jax import config_lib

CLASSES = ('normal', 'tb')
STAGES = ('train_classifier', 'evaluate', 'activations', 'report')


def pp_strings(roi: str, size: int, norm: str, roi_size: int = 1024,
               sources: tuple[str, ...] = ('lung_mask',), label: str = '',
               augment: bool = True) -> tuple[str, str]:
  """(pp_train, pp_eval): ROI -> roi_size -> CLAHE -> network size -> RGB -> [augment] ->
  normalisation."""
  roi_op = '' if roi == 'none' else f'lung_roi("{roi}", sources={tuple(sources)!r})|'
  common = f'{label}{roi_op}resize({roi_size})|clahe(0.01, 8)|resize({size})|grayscale_to_rgb|'
  shift = max(1, round(0.1 * size))
  train = common + (f'random_translate({shift})|rotate(10)|' if augment else '')
  return train + f'normalize("{norm}")', common + f'normalize("{norm}")'


def base(name: str, model: ml_collections.ConfigDict, size: int, norm: str
         ) -> ml_collections.ConfigDict:
  config = config_lib.base_config()
  config.name = name
  config.stages = STAGES
  config.report_models = (('train_classifier', name),)
  config.data.name = 'tb_combined/1024'
  config.data.target = 'label'
  config.data.classes = CLASSES
  config.data.pp_keys = ('lung_mask', 'image_id')
  config.data.pp_train, config.data.pp_eval = pp_strings('crop', size, norm)
  config.data.shuffle_buffer = 1000
  config.model = model
  config.loss = 'softmax_ce'
  config.evaluator = 'single_label_classification'
  config.best_metric = 'accuracy'
  config.threshold = 'per_class'
  config.threshold_rule = 'max_f1'
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 1e-3
  config.optimizer.kwargs = ml_collections.ConfigDict({'momentum': 0.9})
  config.optimizer.weight_decay = 5e-4
  config.optimizer.decay_mask = 'kernels'
  config.optimizer.plateau = ml_collections.ConfigDict({
      'enabled': True, 'metric': 'accuracy', 'patience': 5, 'factor': 0.1, 'cooldown': 0,
      'max_reductions': 3})
  config.batch_size = 16
  config.eval_batch_size = 32
  config.num_epochs = 60
  config.log_every_steps = 10
  config.eval_every_steps = 35  # about one epoch of tb_combined's 560 training images
  config.checkpoint_every_steps = 350
  config.activations = ml_collections.ConfigDict({
      'filter_layers': ('conv1', 'conv3'), 'layer': 'conv5', 'num_images': 4,
      'num_filters': 16, 'steps': 30, 'threshold': 0.6, 'color_steps': 8, 'alpha': 0.6,
      'channel': -1})
  return config


ROI_MODES = ('crop', 'mask', 'crop_mask', 'none')
# Where lung_roi takes the lungs from (config argument masks=...): the data set's 'lung_mask',
# the 'masks' of a U-Net mask cache (config.data.mask_cache; lung channels left, right), or the
# first non-empty of both.
MASK_SOURCES = {'dataset': ('lung_mask',), 'unet': ('masks',), 'both': ('lung_mask', 'masks')}


def finish(config: ml_collections.ConfigDict, arg: str | None, demo, size: int, norm: str
           ) -> ml_collections.ConfigDict:
  """Applies the config argument: comma-separated 'demo' (synthetic data, CPU-sized), 'cv'
  (5-fold cross-validation), 'roi=crop|mask|crop_mask|none' (the lung ROI, default crop)."""
  parts = [p.strip() for p in (arg or '').split(',') if p.strip()]
  roi, masks = 'crop', 'dataset'
  for p in parts:
    if p.startswith('roi='):
      roi = p[4:]
      if roi not in ROI_MODES:
        raise ValueError(f'Config argument {p!r}: roi must be one of {ROI_MODES}.')
    elif p.startswith('masks='):
      masks = p[6:]
      if masks not in MASK_SOURCES:
        raise ValueError(f'Config argument {p!r}: masks must be one of {tuple(MASK_SOURCES)}.')
    elif p not in ('demo', 'cv'):
      raise ValueError(f"Unknown config argument {arg!r}; valid: comma-separated 'demo', "
                       f"'cv', 'roi=<{'|'.join(ROI_MODES)}>', "
                       f"'masks=<{'|'.join(MASK_SOURCES)}>'.")
  if roi != 'crop' or masks != 'dataset':
    sources = MASK_SOURCES[masks]
    config.data.pp_train, config.data.pp_eval = pp_strings(roi, size, norm, sources=sources)
    config.data.pp_keys = ('image_id',) if roi == 'none' else (*sources, 'image_id')
  if 'demo' in parts:
    demo(config, roi)
  if 'cv' in parts:
    use_cross_validation(config)
  return config


def use_cross_validation(config: ml_collections.ConfigDict, folds: int = 5) -> None:
  """k-fold patient-level stratified CV instead of the fixed split (config.cv)."""
  config.cv.folds = folds
  config.cv.stages = ('train_classifier', 'evaluate')
  config.stages = ('cross_validate', 'report')


def phantom_demo(config: ml_collections.ConfigDict, size: int, norm: str, roi: str = 'crop'
                 ) -> None:
  """The synthetic `cxr_phantom/64` as a normal / abnormal task (any of the 14 findings), its
  left/right lung masks as the ROI, CLAHE at 128 px, the network at `size` px; a few hundred
  steps on 2 CPU cores."""
  config.data.name = 'cxr_phantom/64'
  config.data.pp_keys = ('labels', 'masks', 'image_id')
  config.data.pp_train, config.data.pp_eval = pp_strings(
      roi, size, norm, roi_size=128, sources=('masks',), label='label_from_findings|')
  config.data.cache = True
  config.batch_size = 32
  config.eval_batch_size = 64
  config.num_epochs = -1
  config.num_train_steps = 300
  config.log_every_steps = 25
  config.eval_every_steps = 50
  config.checkpoint_every_steps = 150
  config.activations.num_images = 2
  config.activations.steps = 15


VGG_SIZE = 224


def vgg(arch: str, filter_layers: tuple[str, str], arg: str | None
        ) -> ml_collections.ConfigDict:
  """configs/tb/vgg16.py and vgg19.py: `arch` fine-tuned from torchvision's ImageNet weights
  (weights/torchvision_<arch>), only its last FC (`classifier_6`) replaced, at 20x the rate."""
  model = ml_collections.ConfigDict({'name': arch})
  config = base(f'tb_{arch}', model, VGG_SIZE, 'imagenet')
  config.init_from.checkpoint = f'weights/torchvision_{arch}'
  config.optimizer.lr_multipliers = ml_collections.ConfigDict({'classifier_6': 20.0})
  config.activations.filter_layers = filter_layers
  return finish(config, arg, vgg_demo, VGG_SIZE, 'imagenet')


def vgg_demo(config: ml_collections.ConfigDict, roi: str = 'crop') -> None:
  """`:demo` of the VGGs: a narrow VGG from scratch on the phantom at 64 px."""
  phantom_demo(config, 64, 'imagenet', roi)
  config.init_from.checkpoint = ''
  config.model.widths = (8, 16, 32, 64, 64)
  config.model.hidden = 128
  config.optimizer.learning_rate = 1e-2
