"""`Predictor`: one trained stage of a run, ready for images (predict, explain, serve, stages).

It holds the model, its best variables (host arrays, params only), what its model description
says about its input and classes, and its operating point; it preprocesses a user's X-ray the
way the
stage's evaluation data was preprocessed, runs the model once per batch with every sown map
(`intermediates`), and gives the functions explanations re-evaluate (head, score maps, logits).
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from etils import epath
from PIL import Image

from cxr_jax import xla_options
from cxr_jax.inference import run as run_lib
from cxr_jax.models import model_function

Intermediates = dict[str, Any]


def find_sown(tree: Any, name: str, ndim: int) -> np.ndarray | None:
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
      found = find_sown(sub, name, ndim)
      if found is not None:
        return found
  return None


def _to_uint8(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Grey [H, W] in [0, 1] -> uint8 [h, w, 1], resized bilinearly (aspect ratio not kept)."""
  h, w = size
  resized = np.asarray(Image.fromarray(np.asarray(image, np.float32), mode='F').resize(
      (w, h), Image.Resampling.BILINEAR), np.float32)
  return np.round(np.clip(resized, 0.0, 1.0) * 255.0).astype(np.uint8)[..., None]


@dataclasses.dataclass
class Predictor:
  """A trained stage ready for images.

  Attributes:
    workdir: the run folder.
    stage: the training stage whose best checkpoint this is.
    model: the flax module (eval mode only).
    variables: its variables (host numpy arrays).
    info: what the stage's model description says (input shape, classes, preprocessing ...).
    operating: thresholds [K] and their source (`run.operating_point`).
    config: the run's config (None when the run has no saved config, e.g. copied models).
  """

  workdir: epath.Path
  stage: str
  model: nn.Module
  variables: dict[str, Any]
  info: run_lib.ModelInfo
  operating: run_lib.OperatingPoint
  config: ml_collections.ConfigDict | None = None
  _forward: Callable[..., Any] | None = dataclasses.field(default=None, repr=False)
  _functions: dict[str, Callable[[jax.Array], jax.Array]] = dataclasses.field(
      default_factory=dict, repr=False)
  _preprocess: Callable[[Any], Any] | None = dataclasses.field(default=None, repr=False)

  # ---------------------------------------------------------------------------- facts
  @property
  def class_names(self) -> tuple[str, ...]:
    return self.info.class_names

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return self.info.image_shape

  @property
  def thresholds(self) -> np.ndarray:
    """Decision thresholds [K]: a class is found when its probability is above its one."""
    return self.operating.thresholds

  @property
  def has_attention(self) -> bool:
    return hasattr(self.model, 'attend')

  @property
  def model_name(self) -> str:
    return self.info.model_name

  def config_section(self, name: str) -> dict[str, Any]:
    """config.<name> of the run as a dict ({} without a config)."""
    if self.config is None or name not in self.config:
      return {}
    section = self.config[name]
    return section.to_dict() if hasattr(section, 'to_dict') else dict(section)

  # ---------------------------------------------------------------------------- input
  @property
  def needs_lung_masks(self) -> bool:
    """True for paper 003's lung-ROI models: `preprocess` then needs the image's lung masks."""
    return 'lung_roi' in self.info.pp_eval

  def preprocess(self, image: np.ndarray, masks: np.ndarray | None = None) -> np.ndarray:
    """Grey [H, W] in [0, 1] -> the model's input [H', W', C] float32.

    The image is resized to the model's input size (as the NIH PNGs were squeezed to
    1024 x 1024), quantised to 8 bits as the training PNGs are, and run through the stage's
    eval preprocessing (`ModelInfo.pp_eval`). masks: binary [H, W, S] (structures left lung,
    right lung[, heart], e.g. a U-Net's, inference/segmentation.py) in the image's frame, which
    a lung-ROI model (`needs_lung_masks`) must have: the image then keeps its own size, since
    the ROI is cut before the eval preprocessing resizes it, and the masks reach the ops as
    'masks' and as 'lung_mask' (the lungs' union), the features `lung_roi` reads.
    """
    if self._preprocess is None:
      from cxr_jax.data import ops, tf_devices
      tf_devices.hide_accelerators()
      self._preprocess = ops.get_preprocess_fn(self.info.pp_eval)
    import tensorflow as tf

    if self.needs_lung_masks and masks is None:
      raise ValueError(f'the model of stage {self.stage!r} was trained on lung ROIs (lung_roi in '
                       'its eval preprocessing): give the lung masks of the image (predict and '
                       'the viewer: --segmentation=UNET_RUN).')
    if masks is None:
      uint8 = _to_uint8(image, self.image_shape[:2])
      features = {'image': tf.constant(uint8)}
    else:
      image = np.asarray(image, np.float32)
      masks = np.asarray(masks)
      if masks.ndim != 3 or masks.shape[:2] != image.shape or masks.shape[-1] < 2:
        raise ValueError(f'masks of shape {masks.shape}: expected [H, W, S >= 2] (left lung, '
                         f'right lung, ...) for the image of shape {image.shape}.')
      uint8 = _to_uint8(image, image.shape)
      binary = (masks > 0).astype(np.uint8) * 255
      features = {'image': tf.constant(uint8), 'masks': tf.constant(binary),
                  'lung_mask': tf.constant(np.maximum(binary[..., 0], binary[..., 1])[..., None])}
    # 'decode' in pp strings passes already decoded uint8 tensors through unchanged.
    x = np.asarray(self._preprocess(features)['image'], np.float32)
    if x.shape != self.image_shape:
      raise ValueError(f'preprocessing gave shape {x.shape}, the model expects '
                       f'{self.image_shape} (pp_eval {self.info.pp_eval!r})')
    return x

  # ---------------------------------------------------------------------------- model
  def forward(self, x: np.ndarray | jax.Array) -> tuple[jax.Array, Intermediates]:
    """x [B, H, W, C] -> (logits [B, K], everything the model sowed), one compiled program
    per batch shape."""
    if self._forward is None:
      model = self.model

      @xla_options.jit
      def fwd(variables, x):
        logits, state = model.apply(variables, x, train=False, mutable=['intermediates'])
        return logits, state.get('intermediates', {})

      self._forward = fwd
    return self._forward(self.variables, x)

  def predict(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Probabilities [N, K] of preprocessed images [N, H, W, C], `batch_size` at a time (the
    last batch is padded, so one compiled program serves every batch)."""
    images = np.asarray(images, np.float32)
    out = []
    for start in range(0, len(images), batch_size):
      chunk = images[start:start + batch_size]
      n = len(chunk)
      if n < batch_size and len(images) > batch_size:
        chunk = np.concatenate([chunk, np.zeros((batch_size - n, *chunk.shape[1:]), chunk.dtype)])
      logits, _ = self.forward(chunk)
      out.append(self.probabilities(logits)[:n])
    return np.concatenate(out) if out else np.zeros((0, len(self.class_names)), np.float32)

  def run(self, x: np.ndarray) -> tuple[np.ndarray, Intermediates]:
    """x [H, W, C] -> (probabilities [K], intermediates of the one image)."""
    logits, inter = self.forward(x[None])
    return self.probabilities(logits)[0], inter

  def probabilities(self, logits: np.ndarray | jax.Array) -> np.ndarray:
    """logits [B, K] -> probabilities [B, K] (sigmoid, or softmax for single-label models)."""
    from cxr_jax.losses import probabilities
    return np.asarray(probabilities(np.asarray(logits, np.float32), self.info.output))

  def findings(self, probs: np.ndarray) -> list[tuple[str, float]]:
    """(class, probability) of the classes above their thresholds, most probable first."""
    found = [(n, float(p)) for n, p, t in zip(self.class_names, probs, self.thresholds,
                                              strict=True) if p > t]
    return sorted(found, key=lambda f: -f[1])

  # ---------------------------------------------------------------------------- sown maps
  def attention_maps(self, inter: Intermediates) -> np.ndarray:
    """Attention weights [B, T, h, w] sown by an attention model ('attention')."""
    if not self.has_attention:
      raise run_lib.RunError(
          f'the model of stage {self.stage!r} ({self.model_name}) has no attention; use PDA, '
          'CAM or Grad-CAM, or a stage of an attention model (e.g. --stage=train_attention).')
    found = find_sown(inter, 'attention', ndim=4)
    if found is None:
      raise ValueError('the attention model did not sow an [B, T, h, w] attention map')
    return np.asarray(found, np.float32)

  def feature_maps(self, inter: Intermediates) -> np.ndarray:
    """The last feature maps before pooling [B, h, w, C'] of a batch."""
    found = find_sown(inter, 'features', ndim=4)
    if found is None:
      raise ValueError('the model did not sow its feature map (intermediates "features")')
    return np.asarray(found, np.float32)

  # ---------------------------------------------------------------------------- functions
  def logits_fn(self) -> Callable[[jax.Array], jax.Array]:
    """images [N, H, W, C] -> logits [N, K], the same object every call (PDA's jit key)."""
    if 'logits' not in self._functions:
      model, variables = self.model, self.variables
      self._functions['logits'] = lambda x: model.apply(variables, x, train=False)
    return self._functions['logits']

  def head_fn(self) -> Callable[[jax.Array], jax.Array]:
    """features [N, h, w, C'] -> logits [N, K]: what feature-level PDA and Grad-CAM
    re-evaluate; the same object every call, so compiled programs are reused."""
    return self._model_function('head_fn')

  def score_map_fn(self) -> Callable[[jax.Array], jax.Array]:
    """features [N, h, w, C'] -> class score maps [N, h, w, K] (CAM; the space attention
    head's own map); RunError for models without one (use Grad-CAM)."""
    return self._model_function('score_map_fn')

  def supports(self, method: str) -> bool:
    """Whether explanation `method` ('attention', 'cam', 'grad_cam', 'pda') applies."""
    if method == 'attention':
      return self.has_attention
    if method == 'cam':
      return model_function(self.model, 'score_map_fn') is not None
    if method in ('grad_cam', 'pda'):
      return model_function(self.model, 'head_fn') is not None or method == 'pda'
    return False

  def _model_function(self, name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in self._functions:
      make = model_function(self.model, name)
      if make is None:
        raise run_lib.RunError(
            f'the model of stage {self.stage!r} ({self.model_name}) has no {name} (a linear '
            'class score map); use Grad-CAM instead.')
      self._functions[name] = make(self.model, self.variables)
    return self._functions[name]


def load_predictor(workdir: str | epath.PathLike, stage: str | None = None, *,
                   task: str | None = 'classification') -> Predictor:
  """Restores the best checkpoint of `stage` (default: the run's last training stage).

  task: the kind of model expected ('classification', or 'segmentation' for paper 004's U-Net,
  see inference/segmentation.py); a stage of another kind raises RunError naming it. None
  accepts either.
  """
  workdir = epath.Path(workdir)
  if not workdir.is_dir():
    raise run_lib.RunError(f'--workdir={workdir}: no such folder.')
  stage = stage or run_lib.default_stage(workdir)
  run_lib.check_stage(workdir, stage)
  info = run_lib.read_model_info(workdir / stage)
  if task is not None and info.task != task:
    if task == 'classification':
      from cxr_jax.inference.segmentation import check_classifier
      check_classifier(info, str(workdir / stage))
    raise run_lib.RunError(f'{workdir / stage}: a {info.task} model ({info.model_name}), not a '
                           f'{task} model.')
  model, variables, info = run_lib.restore_model(workdir / stage)
  config = None
  from cxr_jax import layout
  if layout.Run(workdir).has_config():
    config = run_lib.read_config(workdir)
  return Predictor(workdir, stage, model, variables, info,
                   run_lib.operating_point(workdir, stage, info), config)
