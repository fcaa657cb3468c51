r"""Paper 002 (Kim, Jung, Lee: Weakly Supervised Thoracic Disease Localization via Disease Masks):
what its five runs share.

Not a config itself: resnet50.py, resnet50_aligned.py, dm.py, dm_aligned.py and pdm.py call
`get_config` here with the alignment module and the disease masks switched on or off.

Run them and put them side by side (Table 1 / 2 localisation, Table 3 / 4 AUROC):
  for c in resnet50 resnet50_aligned dm dm_aligned pdm; do
    python -m cxr_jax.main --config=configs/disease_masks/$c.py --workdir=workdir/p002_$c
  done
  python -m cxr_jax.report --workdirs=workdir/p002_resnet50,workdir/p002_resnet50_aligned,\
workdir/p002_dm_aligned       # Table 1 (ResNet-50 | +Alignment | +Alignment+DM) and Table 3
  python -m cxr_jax.report --workdirs=workdir/p002_pdm,workdir/p002_dm_aligned     # Table 2
(`:demo` after each config path: the same on the synthetic phantom on a CPU, see `apply_demo`.)
Each run's own report holds its models' Tables 1, 3 and 4, the anchor, the alignment (error
before/after, Fig. 4) and the disease masks (images per class, Fig. 3 / Fig. 7).

Recipe (sections 3-4): NIH ChestX-ray14 (official train_val/test lists, 10 % of train_val
patients as validation) at 512 x 512, each channel normalised to [-1, 1]; ResNet-50 classifier
with the weighted BCE of eq. 10 (`weighted_bce`), Adam 1e-4, batch 32, 5 epochs; DM attention
retrained 5 more epochs from it; alignment module: ResNet-18 regressing (s_x, s_y, t_x, t_y,
theta), SGD 1e-3, batch 16, 5 epochs, L_e (eq. 8) + L_p (eq. 7) on conv2_x..conv5_x of a
ResNet-50 trained on the data, the anchor = mean of 2,000 'No Finding' images; disease masks
from images with P_c >= 0.8; localisation by CAM on the 984 (here 880-image) box split, accuracy
at T(IoU) 0.3 / 0.5 / 0.7.

Stages: [anchor, train_loss_network, align] (aligned runs) -> train_classifier ->
[disease_masks | pseudo_disease_masks -> train_dm] -> evaluate -> localize -> report.

Readings (the paper is silent or ambiguous; every one is a config value):
- Eq. 6 puts B(G(.)) inside phi(I): the smoothing (G = 16 x 16 average pooling, a 32 x 32 grid
  at 512 px, `align.smooth_kernel`; B = bilinear restore) enters only the alignment loss; the
  classifier sees the sharp warp. The regressor starts at the identity transform (zero last
  layer, bias (1, 1, 0, 0, 0)). Eq. 8 is the per-pixel L2 norm (over channels; not a mean of
  squares), averaged over pixels by default (`align.euclidean_reduction='mean'`): the literal
  sum ('sum') has the same minimiser but a gradient P^2 = 262,144 times larger at 512 px, which
  with the paper's SGD 1e-3 throws the transform out of range in the first steps (the run then
  stops, see below); the paper's learning rate only makes sense for a per-pixel average.
  Plain SGD (no momentum: the paper names none).
- The perceptual loss network is this run's `train_loss_network` stage: the same ResNet-50
  recipe on the unaligned data ("pretrained on the ChestX-ray14 dataset");
  `--config.align.loss_network=<stage folder of another run>` reuses one (that stage then
  skips itself), or an imported-weights folder (ImageNet: a labelled deviation).
- Aligned data: the align stage writes one transform per image id; later stages read the
  images through the `align("{workdir}")` preprocessing op (warped on the fly, bilinear, zero
  = black outside; expert boxes move with the image: the box around their mapped corners). The
  localisation of aligned models is therefore measured in the aligned frame.
- A degenerate alignment (a non-finite transform, |s_x| or |s_y| outside
  [`align.min_scale`, `align.max_scale`] = [0.2, 5]) stops the align stage with
  `AlignmentDiverged`, naming the step and the last good checkpoint, which is kept (a
  checkpoint is only written once the next step has shown its parameters to be sane).
- Classifier initialisation: not stated; ImageNet ResNet-50 (`init_from.checkpoint`, imported
  with `python -m cxr_jax.tools.import_weights --source=torchvision --arch=resnet50
  --input=<resnet50-*.pth> --output=weights/torchvision_resnet50`), as its AUROCs suggest.
- Weighted BCE: |P|, |N| counted over all (image, class) entries of the global batch as in its
  reference [18] (`loss='weighted_bce'`; 'weighted_bce_per_class' counts per class); the loss
  is eq. 10 divided by B K.
- Disease masks: P_c is the model's probability (sigmoid of the logit, i.e. of the mean
  CAM + bias); "dropping images where P_c < 0.8" is read among the images labelled c
  (`disease_masks.positives_only`); CAMs at the input size P (eq. 1: S_c in R^{P x P}, bilinear
  upsampling); flip-sum for every box class except cardiomegaly (`asymmetric`); T: psi = mean *
  [mean >= 0.5] (`threshold`, `binarize=False` keeps the "spatial probability"; True gives a
  0/1 mask). A class no image qualifies for gets psi = 0 (`empty='zeros'`; 'positives' uses
  all its positives; 'error' stops).
- DM attention: per class (f'_c = psi_c f + f; eq. 4 has no class index); psi resized from
  P x P to the 16 x 16 feature map by area averaging; the six classes without a box (no mask)
  have psi = 0, f' = f. Localisation with S^_c = (1 + psi_c) S_c.
- Pseudo-disease masks (Table 2, Fig. 7): regions drawn on the anchor in normalised
  coordinates (`pdm.shapes`, `pdm.regions`); "whole lung" for infiltration, mass, nodule and
  pneumonia; lower lung zones for atelectasis and effusion, upper zones for pneumothorax, the
  heart for cardiomegaly (our drawing of Wikipedia-level knowledge).
- Boxes from CAMs: Wang et al.'s (its ref. [18]) thresholds 60 and 180 of 255 on the min-max
  normalised map, a box per connected region (`localize.boxes.mode='multi_threshold'`); AFP is
  reported next to accuracy because more boxes score more.
"""

import ml_collections

from cxr_jax import config_lib
from cxr_jax.labels import BOX_CLASSES

IMAGENET_RESNET50 = 'weights/torchvision_resnet50'
UNALIGNED_PP = 'decode|grayscale_to_rgb|normalize("minus_one_one")'
ALIGNED_PP = 'decode|align("{workdir}")|grayscale_to_rgb|normalize("minus_one_one")'
TRAIN_SPLIT_IMAGES = 78_152  # official-512 train split


def _lungs() -> dict[str, tuple]:
  """Regions of a centred PA chest in normalised coordinates (x right, y down; the patient's
  right lung on the image left)."""
  return {
      'right_lung': ('polygon', 0.30, 0.18, 0.42, 0.17, 0.47, 0.30, 0.47, 0.72, 0.40, 0.80,
                     0.22, 0.82, 0.17, 0.70, 0.20, 0.35),
      'left_lung': ('polygon', 0.70, 0.18, 0.58, 0.17, 0.53, 0.30, 0.53, 0.72, 0.60, 0.80,
                    0.78, 0.82, 0.83, 0.70, 0.80, 0.35),
      'right_lower': ('polygon', 0.19, 0.55, 0.47, 0.55, 0.47, 0.72, 0.40, 0.80, 0.22, 0.82,
                      0.17, 0.70),
      'left_lower': ('polygon', 0.81, 0.55, 0.53, 0.55, 0.53, 0.72, 0.60, 0.80, 0.78, 0.82,
                     0.83, 0.70),
      'right_upper': ('polygon', 0.30, 0.18, 0.42, 0.17, 0.47, 0.30, 0.47, 0.45, 0.19, 0.45,
                      0.20, 0.35),
      'left_upper': ('polygon', 0.70, 0.18, 0.58, 0.17, 0.53, 0.30, 0.53, 0.45, 0.81, 0.45,
                     0.80, 0.35),
      'heart': ('polygon', 0.45, 0.45, 0.58, 0.47, 0.70, 0.58, 0.72, 0.72, 0.60, 0.80, 0.45,
                0.78, 0.40, 0.65),
  }


def get_config(name: str, *, align: bool, masks: str, labels: tuple[str, ...],
               arg: str | None) -> ml_collections.ConfigDict:
  """One run of paper 002: `align` the inputs; `masks` '' (none), 'dm' (eq. 3) or 'pdm'
  (pseudo masks); `labels` the report labels of its classifier and (with masks) its DM model."""
  if masks not in ('', 'dm', 'pdm'):
    raise ValueError(f"masks={masks!r}; valid: '', 'dm', 'pdm'")
  config = config_lib.base_config()
  config.name = name
  front = ('anchor', 'train_loss_network', 'align') if align else ()
  mask_stages = {'': (), 'dm': ('disease_masks', 'train_dm'),
                 'pdm': ('pseudo_disease_masks', 'train_dm')}[masks]
  config.stages = (*front, 'train_classifier', *mask_stages, 'evaluate', 'localize', 'report')
  models = (('train_classifier', labels[0]),)
  if masks:
    models += (('train_dm', labels[1]),)
  config.report_models = models

  config.data.name = 'nih_chest_xray14/official-512'
  pp = ALIGNED_PP if align else UNALIGNED_PP
  config.data.pp_train = pp
  config.data.pp_eval = pp
  config.data.shuffle_buffer = 20_000

  config.model = ml_collections.ConfigDict({
      'name': 'resnet50', 'head': 'gap_dense', 'disease_masks': (),
      'replace_stride_with_dilation': (False, False, False)})
  config.init_from.checkpoint = IMAGENET_RESNET50
  config.loss = 'weighted_bce'
  # On a CPU (no effect on accelerators): YNNPACK's element-wise fusions (cxr_jax/xla_options.py)
  # with the model's default 'auto' convolutions ('matmul' on the CPU: 224 px, batch 16, 2 cores,
  # fresh processes, ResNet-50 5.19 img/s vs 4.35 with XLA's own, `benchmarks/conv_impl.py`).
  config.cpu_fusions = (*config.cpu_fusions, 'eltwise')
  config.optimizer.name = 'adam'
  config.optimizer.learning_rate = 1e-4
  config.batch_size = 32
  config.eval_batch_size = 64
  config.num_epochs = 5.0
  config.log_every_steps = 100
  config.eval_every_steps = TRAIN_SPLIT_IMAGES // 32 + 1  # once per epoch
  config.checkpoint_every_steps = config.eval_every_steps
  config.best_metric = 'mean_auroc'

  # The perceptual loss network: the same recipe on the unaligned data.
  unaligned = ml_collections.ConfigDict(config.data.to_dict())
  unaligned.pp_train = UNALIGNED_PP
  unaligned.pp_eval = UNALIGNED_PP
  config.stage_overrides.train_loss_network = ml_collections.ConfigDict({'data': unaligned})
  # DM attention: the classifier's weights, 5 more epochs; psi enters the model config at run
  # time (stages/disease_masks.py: dm_train_config).
  dm_model = ml_collections.ConfigDict(config.model.to_dict())
  dm_model.head = 'disease_masks'
  config.stage_overrides.train_dm = ml_collections.ConfigDict({
      'model': dm_model,
      'init_from': {'stage': 'train_classifier', 'target': '', 'checkpoint': '', 'fresh': ()}})

  config.align = ml_collections.ConfigDict({
      'pp': UNALIGNED_PP, 'fill': -1.0, 'model': {'name': 'resnet18'},
      'loss_network': 'train_loss_network',
      'perceptual_layers': ('conv2_x', 'conv3_x', 'conv4_x', 'conv5_x'),
      'smooth_kernel': 16, 'euclidean_reduction': 'mean',
      'optimizer': config_lib.base_config().optimizer,
      'batch_size': 16, 'num_epochs': 5.0, 'num_train_steps': -1,
      'min_scale': 0.2, 'max_scale': 5.0, 'log_every_steps': 100,
      'checkpoint_every_steps': 2000, 'anchor_images': 2000, 'anchor_seed': 0,
      'figure_images': 8})
  config.align.optimizer.name = 'sgd'
  config.align.optimizer.learning_rate = 1e-3
  config.align.optimizer.kwargs = ml_collections.ConfigDict({'momentum': 0.0})

  config.disease_masks = ml_collections.ConfigDict({
      'source_stage': 'train_classifier', 'split': '', 'classes': BOX_CLASSES,
      'min_prob': 0.8, 'positives_only': True, 'asymmetric': ('Cardiomegaly',),
      'threshold': 0.5, 'binarize': False, 'empty': 'zeros',
      'attention_from': 'pseudo_disease_masks' if masks == 'pdm' else 'disease_masks'})
  config.pdm = ml_collections.ConfigDict({
      'shapes': _lungs(),
      'regions': {
          'Atelectasis': ('right_lower', 'left_lower'),
          'Cardiomegaly': ('heart',),
          'Effusion': ('right_lower', 'left_lower'),
          'Infiltration': ('right_lung', 'left_lung'),
          'Mass': ('right_lung', 'left_lung'),
          'Nodule': ('right_lung', 'left_lung'),
          'Pneumonia': ('right_lung', 'left_lung'),
          'Pneumothorax': ('right_upper', 'left_upper')}})

  config.localize.split = 'bbox'
  config.localize.method = 'cam'
  config.localize.boxes.mode = 'multi_threshold'
  config.localize.iou_thresholds = (0.1, 0.3, 0.5, 0.7)
  config.localize.classes = BOX_CLASSES  # the phantom boxes every finding; the paper scores 8

  if arg == 'demo':
    apply_demo(config)
  elif arg:
    raise ValueError(f"Unknown config argument {arg!r}; valid: 'demo'.")
  return config


def apply_demo(config: ml_collections.ConfigDict) -> None:
  """The synthetic 64 px phantom, misaligned on purpose, small networks (dm_aligned: 31 min on 2
  shared CPU cores, measured; the unaligned runs skip the loss network and the alignment).

  Every demo run reads the phantom through `affine_jitter`: a fixed random affine per image
  (rotation +-12 degrees, scales 1 +- 0.12, shifts +-0.12 of the half-width) on top of the
  phantom's own pose variation, so that the aligned runs have something to undo (the align
  stage reports the anchor-to-image error before and after) and every run sees the same data.
  """
  jitter = 'affine_jitter(12, 0.12, 0.12)'
  for data in (config.data, config.stage_overrides.train_loss_network.data):
    data.name = 'cxr_phantom/64'
    data.cache = True
    for key in ('pp_train', 'pp_eval'):
      data[key] = data[key].replace('decode|', f'decode|{jitter}|')
  config.align.pp = config.align.pp.replace('decode|', f'decode|{jitter}|')
  # A narrow ResNet-50 with layer3/layer4 dilated: an 8 x 8 last map at 64 px (a CAM needs
  # locations), from scratch (no ImageNet weights here).
  for model in (config.model, config.stage_overrides.train_dm.model):
    model.width = 16
    model.replace_stride_with_dilation = (False, True, True)
  config.init_from.checkpoint = ''
  config.batch_size = 32
  # The demo's narrow networks gain nothing from the element-wise fusions (ResNet-50 at width
  # 16, 64 px, batch 32: 0.28 s per step with or without them; see cxr_jax/xla_options.py).
  config.cpu_fusions = tuple(f for f in config.cpu_fusions if f != 'eltwise')
  config.eval_batch_size = 250
  config.num_epochs = -1
  config.num_train_steps = 300
  config.stage_overrides.train_dm.num_train_steps = 150
  # The perceptual loss only needs features that see the chest: a shorter run.
  config.stage_overrides.train_loss_network.num_train_steps = 150
  # From scratch, Adam 1e-4 moves too slowly in a few hundred steps: 1e-3.
  config.optimizer.learning_rate = 1e-3
  config.stage_overrides.train_dm.optimizer = ml_collections.ConfigDict(
      config.optimizer.to_dict())
  config.stage_overrides.train_dm.optimizer.learning_rate = 1e-4
  config.log_every_steps = 50
  config.eval_every_steps = 150
  config.checkpoint_every_steps = 150
  config.align.model.width = 16
  config.align.smooth_kernel = 2  # the paper's 32 x 32 grid at 64 px
  config.align.num_epochs = -1
  config.align.num_train_steps = 300
  config.align.log_every_steps = 50
  config.align.checkpoint_every_steps = 150
  config.align.figure_images = 6
  config.localize.num_overlays = 4
