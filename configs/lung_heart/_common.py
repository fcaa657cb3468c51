r"""Paper 004 (Fang et al., Weighing Features of Lung and Heart Regions): what the four Table 2
columns share. Not a config itself: densenet121.py (CheXNet), resnet50.py (DCNN),
msa_densenet.py (Ours w/o F_l) and msa_densenet_fw.py (Ours) call `get_config` here with their
modules switched on, so the runs differ only in those modules.

  python -m cxr_jax.main --config=configs/lung_heart_unet.py --workdir=workdir/lung_heart_unet
  for c in resnet50 densenet121 msa_densenet msa_densenet_fw; do
    python -m cxr_jax.main --config=configs/lung_heart/$c.py --workdir=workdir/lh_$c
  done
  python -m cxr_jax.report --reference=paper004 --out=reports/lung_heart \
    --workdirs=workdir/lh_resnet50,workdir/lh_densenet121,workdir/lh_msa_densenet,workdir/lh_msa_densenet_fw
prints Table 2 (per-class AUROC, one column per run, beside the paper's columns), Table 3 (mean
CAM IoU per class on the box split for msa_densenet = FE and densenet121 = FE w/o MA, beside the
paper's rows) and writes Fig. 3 (ROC curves of every run, roc.png) with `--out`.
(`:demo` after each config path: the same on the synthetic phantom on a CPU, see `apply_demo`.)

Recipe (sections 3-4): NIH ChestX-ray14, the official (benchmark) split, 14 classes, BCE (Eq. 1)
on 14 sigmoid outputs; DenseNet-121 backbone; images resized to 256 x 256 and centre-cropped
to 224 x 224 "for training" (no other augmentation is named), grey repeated to 3 channels,
"normalized with the same mean and standard deviation" (ImageNet's); Adam, learning rate 1e-3,
weight decay 1e-4, batch 512, 50 epochs; test AUROC per class (Table 2) and ROC curves (Fig. 3);
CAM IoU on the box split (Table 3).

Readings (the paper is silent or contradicts itself):
- Initialisation: "We use the pre-trained 121-layer DenseNet" (3.2, 4) and "pre-trained
  ResNet-50" for DCNN, but also "trained for 50 epochs from scratch" (4): ImageNet weights
  (torchvision's, via the weight importer; the MSA and the 14-class head start fresh), as the
  two mentions and CheXNet do. `--config.init_from.checkpoint=''` trains from scratch.
    python -m cxr_jax.tools.import_weights --source=torchvision --arch=densenet121 \
      --input=<densenet121-*.pth> --output=weights/torchvision_densenet121
- Weight decay 1e-4 as PyTorch's Adam applies it: coupled L2 added to the gradient
  (`optimizer.decoupled=False`), on every parameter.
- Validation: "10% of each disease in the train set" cannot be drawn per disease in multi-label
  data while keeping patients apart; the builder's official-split validation is 10% of the
  train_val *patients* (so about 10% of each disease); the best checkpoint by validation mean
  AUROC is tested (the paper does not say how it chose; the released code validated on test).
- "CXR-IRNet" feature extractor = DenseNet-121 features after `norm5`; Table 3's FE is the MSA
  DenseNet without feature weighting (msa_densenet.py) and FE w/o MA the plain DenseNet.
- Multi-scale attention (cxr_jax/attention/multiscale.py): the released code's stride-1
  reading; `--config.model.msa_stride=2` is the text's "kernel step of 2".
- Feature weighting (cxr_jax/attention/feature_weighting.py): masks of the U-Net run
  (configs/lung_heart_unet.py, `config.segment.source`) cached by the `segment` stage for the
  train/validation/test splits, cropped with the image, taken by the model as an input
  (`data.inputs=('masks',)`); pooled mask binarised at 0.5 and sigmoid on the features, both
  as the released code (`model.fw_binarize`, `model.fw_sigmoid`).
- Table 3 (`localize` stage): CAM of every class with a box, upsampled to the whole 256 image
  (the box split is seen whole at the training scale, as for paper 001, so no expert box is
  cut), binarised at 0.5 of its min-max range, the largest connected component's bounding box:
  GT-blind, never the released code's oracle that places boxes of the ground-truth size and
  keeps the best IoU. Mean IoU per class of each expert box with its best predicted box.
"""

import pathlib

import ml_collections

from cxr_jax import config_lib

IMAGENET_DENSENET121 = 'weights/torchvision_densenet121'
IMAGENET_RESNET50 = 'weights/torchvision_resnet50'
UNET_RUN = 'workdir/lung_heart_unet'


def get_config(name: str, *, backbone: str, msa: bool, fw: bool, label: str,
               arg: str | None) -> ml_collections.ConfigDict:
  """One column of Table 2: the backbone, the multi-scale attention (`msa`) and the feature
  weighting (`fw`) switched on or off."""
  config = config_lib.base_config()
  config.name = name
  config.stages = (('segment',) if fw else ()) + ('train_classifier', 'evaluate') + (
      () if fw else ('localize',)) + ('report',)
  config.report_models = (('train_classifier', label),)

  config.data.name = 'nih_chest_xray14/official-256'
  config.data.pp_train = 'decode|grayscale_to_rgb|center_crop(224)|normalize("imagenet")'
  config.data.pp_eval = 'decode|grayscale_to_rgb|center_crop(224)|normalize("imagenet")'
  config.data.shuffle_buffer = 20_000
  if fw:
    config.data.inputs = ('masks',)
    config.data.mask_cache = 'segment'  # this run's segment stage
    config.segment.source = UNET_RUN

  if backbone == 'densenet121':
    config.model = ml_collections.ConfigDict({
        'name': 'densenet121', 'input_attention': 'multiscale' if msa else '',
        'msa_stride': 1, 'feature_weighting': fw, 'fw_sigmoid': True, 'fw_binarize': True})
    config.init_from.checkpoint = IMAGENET_DENSENET121
    config.init_from.fresh = ('params/msa/*',) if msa else ()
  elif backbone == 'resnet50':
    config.model = ml_collections.ConfigDict({'name': 'resnet50'})
    config.init_from.checkpoint = IMAGENET_RESNET50
  else:
    raise ValueError(f'backbone {backbone!r}')

  config.loss = 'sigmoid_bce'
  # On a CPU (no effect on accelerators): YNNPACK's element-wise fusions (cxr_jax/xla_options.py)
  # with the models' default 'auto' convolutions ('matmul' on the CPU; 224 px, batch 16, 2 cores,
  # fresh processes, `benchmarks/conv_impl.py`: ResNet-50 5.19 img/s vs 4.35 with XLA's own,
  # DenseNet-121 4.26 vs 4.19).
  config.cpu_fusions = (*config.cpu_fusions, 'eltwise')
  config.optimizer.name = 'adam'
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 1e-4
  config.optimizer.decoupled = False
  config.batch_size = 512
  config.eval_batch_size = 512
  config.num_epochs = 50.0
  config.log_every_steps = 50
  config.eval_every_steps = 153  # ~ one epoch of the official train split at batch 512
  config.checkpoint_every_steps = 153
  config.best_metric = 'mean_auroc'

  config.localize.split = 'bbox'
  config.localize.method = 'cam'
  config.localize.pp = 'decode|grayscale_to_rgb|normalize("imagenet")'
  config.localize.boxes.threshold = 0.5
  config.localize.boxes.mode = 'largest'

  if arg == 'demo':
    apply_demo(config, fw=fw)
  elif arg:
    raise ValueError(f"Unknown config argument {arg!r}; valid: 'demo'.")
  return config


def apply_demo(config: ml_collections.ConfigDict, *, fw: bool) -> None:
  """Synthetic phantom at 64 px, upsampled to 144 and centre-cropped to 128 (the paper's
  256 -> 224 geometry, a 4 x 4 last feature map), a narrow DenseNet-121 layout from scratch;
  minutes on 2 CPU cores. The feature-weighting demo trains its own U-Net on the phantom's
  masks first (stage train_segmenter) and segments the phantom with it."""
  config.data.name = 'cxr_phantom/64'
  config.data.pp_train = ('decode|resize(144)|center_crop(128)|grayscale_to_rgb|'
                          'normalize("imagenet")')
  config.data.pp_eval = config.data.pp_train
  config.data.cache = True
  if config.model.name == 'densenet121':
    config.model.growth_rate = 8
    config.model.block_config = (2, 4, 6, 4)
    config.model.num_init_features = 16
  else:
    config.model.width = 8
  config.init_from.checkpoint = ''
  config.init_from.fresh = ()
  config.batch_size = 32
  # The demo's narrow networks gain little from the element-wise fusions (the DenseNet here, 128
  # px, batch 32: 0.148-0.156 s per step with them, 0.157-0.173 s without; at 64 px 0.045-0.052
  # vs 0.040-0.042 s; see cxr_jax/xla_options.py): jaxlib's usual set.
  config.cpu_fusions = tuple(f for f in config.cpu_fusions if f != 'eltwise')
  config.eval_batch_size = 256
  config.num_epochs = -1.0
  config.num_train_steps = 500
  config.log_every_steps = 50
  config.eval_every_steps = 250
  config.checkpoint_every_steps = 250
  config.localize.pp = 'decode|resize(144)|grayscale_to_rgb|normalize("imagenet")'
  config.localize.num_overlays = 4
  if fw:
    # configs/lung_heart_unet.py, loaded by path like every config.
    unet = config_lib.load_sibling(str(pathlib.Path(__file__).parents[1] / '_'),
                                   'lung_heart_unet.py')
    config.stages = ('train_segmenter', 'evaluate_segmentation', *config.stages)
    config.segment.source = ''  # this run's train_segmenter
    config.segment.batch_size = 256
    seg = config_lib.base_config()
    unet.segmenter_fields(seg)
    unet.demo_fields(seg)
    config.stage_overrides.train_segmenter = ml_collections.ConfigDict({
        key: seg[key] for key in ('data', 'model', 'loss', 'evaluator', 'best_metric',
                                  'optimizer', 'batch_size', 'eval_batch_size', 'num_epochs',
                                  'num_train_steps', 'log_every_steps', 'eval_every_steps',
                                  'checkpoint_every_steps', 'init_from')})
