"""`Segmenter`: a trained lung/heart U-Net (paper 004) ready for X-rays of any size.

For the viewer (contours), the `segment` stage (mask caches) and anyone who wants masks:

  from cxr_jax.inference.segmentation import load_segmenter
  seg = load_segmenter('workdir/lung_heart_unet')     # its train_segmenter stage
  seg.structures                                      ('left_lung', 'right_lung', 'heart')
  probs = seg.segment(images)                         [N, H, W, S] float32 in [0, 1]
  masks = seg.masks(images)                           [N, H, W, S] bool (probs >= threshold)
  m_g = seg.global_mask(images)                       [N, H, W] bool: paper 004's M_g

`images` are grey [N, H, W] (or one [H, W]) in [0, 1], any size: each is resized to the U-Net's
input size, quantised to 8 bits like the training PNGs and run through the run's evaluation
preprocessing (a segmenter's pp_eval keeps the whole frame: no crop), and the probabilities are
resized back (bilinear) to the image's own size, so masks and image line up pixel for pixel.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from cxr_jax import segmentation_metrics, xla_options
from cxr_jax.inference import run as run_lib
from cxr_jax.inference.predictor import Predictor, load_predictor

# Training stages that hold segmenters, in the order `load_segmenter` looks for one.
SEGMENTER_STAGES = ('train_segmenter', 'train')
# pp ops that move the frame: a segmenter whose pp_eval has one cannot map its masks back.
_FRAME_OPS = ('center_crop', 'random_crop', 'random_translate', 'flip_lr', 'rotate')


def is_segmenter(info: run_lib.ModelInfo) -> bool:
  return info.task == 'segmentation'


def check_classifier(info: run_lib.ModelInfo, where: str) -> None:
  """RunError when `where` (a stage folder) holds a segmenter where a classifier is needed."""
  if is_segmenter(info):
    raise run_lib.RunError(
        f'{where}: a segmentation model ({info.model_name}: per-pixel masks of '
        f'{list(info.class_names)}), not a classifier; pass the run of a classifier, or read '
        'this one with cxr_jax.inference.segmentation.load_segmenter.')


@dataclasses.dataclass
class Segmenter:
  """A segmentation stage of a run ready for images (a `Predictor` of a U-Net).

  Attributes:
    predictor: the stage's Predictor (model, variables, model description, config).
    threshold: probability at which `masks` binarises (0.5 unless the run says otherwise).
  """

  predictor: Predictor
  threshold: float = 0.5
  _probs: dict[tuple[int, int], Callable[..., Any]] = dataclasses.field(
      default_factory=dict, repr=False)

  @property
  def structures(self) -> tuple[str, ...]:
    """The S mask channels, in order (e.g. left_lung, right_lung, heart; patient's sides)."""
    return self.predictor.class_names

  @property
  def input_shape(self) -> tuple[int, int, int]:
    """(H, W, C) the U-Net runs at."""
    return self.predictor.image_shape

  @property
  def workdir(self) -> epath.Path:
    return self.predictor.workdir

  @property
  def stage(self) -> str:
    return self.predictor.stage

  def preprocess(self, images: np.ndarray) -> np.ndarray:
    """Grey [N, H, W] in [0, 1] -> model inputs [N, h, w, C] (resize, 8-bit, pp_eval)."""
    return np.stack([self.predictor.preprocess(im) for im in images])

  def probabilities(self, x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Model inputs [N, h, w, C] -> probabilities [N, H, W, S] resized to `size` (H, W)."""
    size = (int(size[0]), int(size[1]))
    if size not in self._probs:
      model = self.predictor.model

      @xla_options.jit
      def fn(variables, x):
        probs = jax.nn.sigmoid(model.apply(variables, x, train=False).astype(jnp.float32))
        if probs.shape[1:3] == size:
          return probs
        return jax.image.resize(probs, (probs.shape[0], *size, probs.shape[-1]), 'bilinear')

      self._probs[size] = fn
    return np.asarray(self._probs[size](self.predictor.variables, jnp.asarray(x, jnp.float32)))

  def segment(self, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Grey images [N, H, W] (or [H, W]) in [0, 1] -> probabilities [N, H, W, S] (or
    [H, W, S]) in the images' own frame."""
    images = np.asarray(images, np.float32)
    single = images.ndim == 2
    if single:
      images = images[None]
    if images.ndim != 3:
      raise ValueError(f'segment expects grey images [N, H, W] or [H, W] in [0, 1], got shape '
                       f'{images.shape}.')
    out = [self.probabilities(self.preprocess(images[i:i + batch_size]), images.shape[1:3])
           for i in range(0, len(images), batch_size)]
    probs = np.concatenate(out) if out else np.zeros((0, *images.shape[1:3],
                                                      len(self.structures)), np.float32)
    return probs[0] if single else probs

  def masks(self, images: np.ndarray) -> np.ndarray:
    """Binary masks [N, H, W, S] (probability >= threshold)."""
    return self.segment(images) >= self.threshold

  def global_mask(self, images: np.ndarray) -> np.ndarray:
    """Paper 004's M_g [N, H, W]: lung and heart regions 1, the rest 0."""
    return segmentation_metrics.global_mask(self.segment(images), self.threshold)


def load_segmenter(workdir: str | epath.PathLike, stage: str | None = None) -> Segmenter:
  """The best checkpoint of a segmentation stage (default: the run's train_segmenter).

  Raises RunError naming the run when it has no segmentation stage, when `stage` is a
  classifier, or when the stage's preprocessing moves the frame (crop, flip ...).
  """
  workdir = epath.Path(workdir)
  if not workdir.is_dir():
    raise run_lib.RunError(f'{workdir}: no such run folder; expected the workdir of a '
                           'segmentation run (e.g. configs/lung_heart_unet.py).')
  if stage is None:
    from cxr_jax import layout
    present = layout.Run(workdir).trained_stages(SEGMENTER_STAGES)
    found = [s for s in present if is_segmenter(run_lib.read_model_info(workdir / s))]
    if not found:
      others = layout.Run(workdir).trained_stages()
      raise run_lib.RunError(
          f'{workdir}: no trained segmentation model (looked for {list(SEGMENTER_STAGES)}); '
          f'trained stages here: {others or "none"}'
          + (' (classifiers: pass a run of configs/lung_heart_unet.py)' if others else ''))
    stage = found[0]
  run_lib.check_stage(workdir, stage)
  info = run_lib.read_model_info(workdir / stage)
  if not is_segmenter(info):
    raise run_lib.RunError(
        f'{workdir / stage}: a classifier ({info.model_name}, classes {list(info.class_names)[:3]}'
        '...), not a segmentation model; pass the workdir of a segmentation run (e.g. '
        'configs/lung_heart_unet.py).')
  moving = [op for op in _FRAME_OPS if op in info.pp_eval]
  if moving:
    raise run_lib.RunError(
        f'{workdir / stage}: its evaluation preprocessing {info.pp_eval!r} moves the frame '
        f'({moving}); masks could not be mapped back to the image.')
  predictor = load_predictor(workdir, stage, task='segmentation')
  threshold = 0.5
  if predictor.config is not None and 'segment' in predictor.config:
    threshold = float(predictor.config.segment.threshold)
  return Segmenter(predictor, threshold)
