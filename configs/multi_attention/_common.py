r"""Paper 001 (Ma et al., Multi-Attention Network): what every column of Table 1 shares.

Not a config itself: bsl.py, bsl_fam.py, bsl_fam_sam.py and ma.py each call `get_config` here
with their modules switched on, so the four runs differ only in the attention modules.

Run the four columns and put them side by side (Table 1 format, + localisation tables):
  for c in bsl bsl_fam bsl_fam_sam ma; do
    python -m cxr_jax.main --config=configs/multi_attention/$c.py --workdir=workdir/ma_$c
  done
  python -m cxr_jax.report \
    --workdirs=workdir/ma_bsl,workdir/ma_bsl_fam,workdir/ma_bsl_fam_sam,workdir/ma_ma
(`:demo` after each config path: the same on synthetic data on a CPU, see `apply_demo`.)

Recipe (section 4.1): ImageNet-initialised ResNet-101, NIH ChestX-ray14 with the official
patient-level train_val/test lists (10% of train_val patients as validation), 14 classes;
images downscaled to 256 x 256, random translation of -12..12 px, 224 x 224 crop, ImageNet mean
and standard deviation; SGD momentum 0.9, weight decay 1e-4 (L2 on every parameter, as torch's
SGD), batch 96, learning rate 0.01 divided by 10 after 20 epochs; multi-label BCE on 14 sigmoid
outputs; Table 1 reports test AUROC per class.

Readings (the paper is silent or ambiguous):
- "random translation ... and our crop size is 224": `random_translate(12)` on the 256 image
  then the centre 224 crop, i.e. a random 224 crop whose offset is 16 +- 12 px; evaluation uses
  the centre crop.
- Total epochs are not given: 30 (10 after the learning-rate drop); the best checkpoint by
  validation mean AUROC is evaluated (the paper does not say how it chose its model).
- ImageNet weights come from the weight importer (see WORKSPACE.md):
    python -m cxr_jax.tools.import_weights --source=torchvision --arch=resnet101 \
      --input=<resnet101-*.pth> --output=weights/torchvision_resnet101
  SE blocks are not in an ImageNet ResNet-101: they start from their own initialisation
  (`init_from.fresh`), as do the 14-class heads.
- Space attention (cxr_jax/attention/space_attention.py has the algebra): as written, its
  linear classifier on [local | global] averages to g (W_l + W_g) + b, i.e. GAP + `fc` with a
  doubled classifier learning rate, and W_l, W_g get identical gradients, so W_l - W_g keeps its
  initial value and the heat map (CAM of W_l) keeps that init noise. `sam_init='tied'` (default)
  starts W_l = W_g = W_0 / 2, W_0 initialised as the baseline's `fc`, so the difference stays 0
  and the map is the CAM of the effective classifier; 'lecun' is the independent init of earlier
  runs, 'zeros' a zero kernel. `sam_normalize=False` is the paper's text; True is ParseNet's
  (its ref. [16]) L2 normalisation of each branch with learned per-channel scales starting at
  `sam_norm_scale` = 10, which makes the branches differ and gives the head capacity.
- Heat maps / localisation (`localize` stage, on the 880-image box split): class score maps of
  the last feature map ('cam': for the space attention head this is exactly the map "without the
  last average pooling", Fig. 4 right) upsampled to the input and binarised at 0.5 of their
  range; the box split is seen whole at the training scale (256 px, no crop) so no expert box is
  cut; fully convolutional models take any size.
- Demo (`:demo`, synthetic `cxr_phantom` at 64 px on 2 CPU cores): ResNet-50 layout at width 16
  with layer3/layer4 dilated (an 8 x 8 last map instead of 2 x 2, so space attention and heat
  maps have locations to work with), from scratch (no ImageNet weights here), 4 px translation,
  batch 32, 600 steps at learning rate 0.1 (/10 after 450); see `apply_demo`. Measured here
  (2 CPU cores, 6-9 min per config): test mean AUROC BSL 0.822, +FAM 0.833, +SAM 0.855,
  MA 0.859 (one seed: the ordering of Table 1, not its significance; the +SAM and MA runs used
  the former independent head init, `sam_init='lecun'`); MA's stage 1 is bit-identical to the
  BSL+FAM+SAM run, its set B holds 6,718 of 16,000 training images.
"""

import ml_collections

from cxr_jax import config_lib

# torchvision's ResNet-101 converted by `python -m cxr_jax.tools.import_weights` (WORKSPACE.md).
IMAGENET_RESNET101 = 'weights/torchvision_resnet101'


def get_config(name: str, *, fam: bool, sam: bool, hard: bool, label: str,
               arg: str | None) -> ml_collections.ConfigDict:
  """One column of Table 1: the feature (`fam`), space (`sam`) and hard example (`hard`)
  attention modules switched on or off."""
  config = config_lib.base_config()
  config.name = name
  train_stages = ('train_classifier', 'mine_hard_examples', 'train_hard_examples') if hard \
      else ('train_classifier',)
  config.stages = (*train_stages, 'evaluate', 'fit_ood', 'localize', 'report')
  config.report_models = ((('train_classifier', f'{label} stage 1 (set A)'),
                           ('train_hard_examples', label)) if hard
                          else (('train_classifier', label),))

  config.data.name = 'nih_chest_xray14/official-256'
  config.data.pp_train = ('decode|grayscale_to_rgb|random_translate(12)|center_crop(224)|'
                          'normalize("imagenet")')
  config.data.pp_eval = 'decode|grayscale_to_rgb|center_crop(224)|normalize("imagenet")'
  config.data.shuffle_buffer = 100_000  # > the train split: copies of set B spread evenly

  config.model = ml_collections.ConfigDict({
      'name': 'resnet101', 'se_reduction': 16 if fam else 0,
      'head': 'space_attention' if sam else 'gap_dense', 'sam_pool': 'after_classifier',
      'sam_normalize': False, 'sam_init': 'tied', 'sam_norm_scale': 10.0,
      'replace_stride_with_dilation': (False, False, False)})
  config.init_from.checkpoint = IMAGENET_RESNET101
  # On a CPU (no effect on accelerators): YNNPACK's element-wise fusions (cxr_jax/xla_options.py)
  # with the model's default 'auto' convolutions ('matmul' on the CPU: 224 px, batch 16, 2 cores,
  # fresh processes, ResNet-50 5.19 img/s vs 4.35 with XLA's own, `benchmarks/conv_impl.py`).
  config.cpu_fusions = (*config.cpu_fusions, 'eltwise')
  config.init_from.fresh = ('params/*/se/*',) if fam else ()

  config.loss = 'sigmoid_bce'
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 0.01
  config.optimizer.kwargs = ml_collections.ConfigDict({'momentum': 0.9})
  config.optimizer.weight_decay = 1e-4
  config.optimizer.decoupled = False
  config.optimizer.schedule = ml_collections.ConfigDict(
      {'name': 'step', 'boundary_epochs': (20.0,), 'factor': 0.1})
  config.batch_size = 96
  config.eval_batch_size = 192
  config.num_epochs = 30.0
  config.log_every_steps = 100
  config.eval_every_steps = 811  # ~ one epoch of the official train split at batch 96
  config.checkpoint_every_steps = 811
  config.best_metric = 'mean_auroc'

  # Stage 2 retrains on set C from the ImageNet initialisation ("we retrain the network"); set
  # `config.stage_overrides.train_hard_examples.init_from.stage='train_classifier'` to continue
  # from stage 1 instead.
  config.hard_examples.source_stage = 'train_classifier'
  config.hard_examples.threshold = 0.5
  config.hard_examples.copies = 'per_image'

  config.localize.split = 'bbox'
  config.localize.method = 'cam'
  config.localize.pp = 'decode|grayscale_to_rgb|normalize("imagenet")'
  config.localize.boxes.threshold = 0.5
  config.localize.boxes.mode = 'largest'

  if arg == 'demo':
    apply_demo(config)
  elif arg:
    raise ValueError(f"Unknown config argument {arg!r}; valid: 'demo'.")
  return config


def apply_demo(config: ml_collections.ConfigDict) -> None:
  """Synthetic 64 px phantom, a narrow dilated ResNet-50 layout, minutes on 2 CPU cores."""
  config.data.name = 'cxr_phantom/64'
  config.data.pp_train = 'decode|grayscale_to_rgb|random_translate(4)|normalize("imagenet")'
  config.data.pp_eval = 'decode|grayscale_to_rgb|normalize("imagenet")'
  config.data.cache = True
  config.data.shuffle_buffer = 20_000
  config.model.name = 'resnet50'
  config.model.width = 16
  config.model.replace_stride_with_dilation = (False, True, True)
  config.init_from.checkpoint = ''
  config.init_from.fresh = ()
  config.batch_size = 32
  # The demo's narrow networks gain nothing from the element-wise fusions (ResNet-50 at width
  # 16, 64 px, batch 32: 0.28 s per step with or without them; see cxr_jax/xla_options.py).
  config.cpu_fusions = tuple(f for f in config.cpu_fusions if f != 'eltwise')
  config.eval_batch_size = 256
  config.num_epochs = -1
  config.num_train_steps = 600
  # From scratch, lr 0.01 barely moves in a few hundred steps (measured: validation mean AUROC
  # 0.59 at step 500, against 0.85 with 0.1); the drop keeps the paper's shape (/10 at 3/4).
  config.optimizer.learning_rate = 0.1
  config.optimizer.schedule.boundary_epochs = ()
  config.optimizer.schedule.boundaries = (450,)
  config.log_every_steps = 50
  config.eval_every_steps = 200
  config.checkpoint_every_steps = 200
  config.localize.pp = ''
  config.localize.num_overlays = 4
