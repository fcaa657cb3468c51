"""Heat maps of a `Predictor`: CAM / Grad-CAM with the boxes they give, attention, PDA.

The math lives in cxr_jax/explain/ (cam.py, boxes.py, prediction_difference.py); this module
wires it to a trained model: which function of the model each method re-evaluates, how a map
reaches the model input's pixels, and where PDA's sampler gets its reference data. `predict`,
the `localize` and `explain` stages and the viewer all go through it.
"""

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from cxr_jax.explain import boxes as boxes_lib
from cxr_jax.explain import cam, overlays
from cxr_jax.explain import prediction_difference as pda
from cxr_jax.inference.predictor import Intermediates, Predictor
from cxr_jax.inference.run import RunError

# PDA's Laplace correction when the training split's size is unknown (an imported model).
FALLBACK_LAPLACE_N = 10_000


# ------------------------------------------------------------------------------ CAM, Grad-CAM
def class_heatmaps(predictor: Predictor, inter: Intermediates, method: str) -> np.ndarray:
  """Heat maps [N, h, w, K] of every class on the feature maps sown in `inter` ('cam' or
  'grad_cam'; cxr_jax/explain/cam.py)."""
  if method not in cam.METHODS:
    raise RunError(f'heat map method {method!r}; valid: {", ".join(cam.METHODS)}')
  head = predictor.head_fn() if method == 'grad_cam' else None
  score_map = predictor.score_map_fn() if method == 'cam' else None
  return np.asarray(cam.class_maps(method, predictor.feature_maps(inter), head_fn=head,
                                   score_map_fn=score_map))


def heatmap_boxes(maps: np.ndarray, classes: Iterable[int], size: tuple[int, int],
                  settings: boxes_lib.BoxSettings
                  ) -> dict[int, tuple[np.ndarray, list[boxes_lib.Box]]]:
  """One image's maps [h, w, K] -> {k: (heat map upsampled to `size` (H, W), its boxes in
  those pixels)} for the class indices `classes`. No ground truth enters."""
  out = {}
  for k in classes:
    heat = overlays.upsample(maps[..., k], size)
    out[k] = (heat, boxes_lib.heatmap_to_boxes(heat, settings))
  return out


def box_settings(predictor: Predictor) -> boxes_lib.BoxSettings:
  """The run's config.localize.boxes (defaults without a config)."""
  return boxes_lib.BoxSettings.from_config(predictor.config_section('localize').get('boxes'))


def predict_boxes(predictor: Predictor, images: np.ndarray, *, method: str,
                  settings: boxes_lib.BoxSettings,
                  classes: Sequence[Iterable[int]] | None = None
                  ) -> tuple[np.ndarray, np.ndarray, list[dict[int, list[boxes_lib.Box]]]]:
  """Model outputs for a batch of preprocessed images; no ground truth goes in.

  Args:
    predictor: a trained stage.
    images: [N, H, W, C] preprocessed model inputs.
    method: 'cam' or 'grad_cam'.
    settings: heat map -> boxes settings.
    classes: per image, the class indices to draw boxes for (default: every class).

  Returns:
    (probs [N, K], heat maps [N, h, w, K] at the feature map's resolution, boxes[n][k] = list
    of (x, y, w, h) boxes in input pixels of the maps upsampled to the input).
  """
  logits, inter = predictor.forward(images)
  probs = predictor.probabilities(logits)
  maps = class_heatmaps(predictor, inter, method)
  n, h, w = images.shape[:3]
  every = range(maps.shape[-1])
  found = [{k: b for k, (_, b) in heatmap_boxes(
      maps[i], every if classes is None else classes[i], (h, w), settings).items()}
      for i in range(n)]
  return probs, maps, found


def class_activation_boxes(predictor: Predictor, inter: Intermediates, method: str,
                           chosen: Sequence[str], image_hw: tuple[int, int],
                           settings: boxes_lib.BoxSettings | None = None
                           ) -> list[tuple[str, np.ndarray, list[boxes_lib.Box]]]:
  """(class, heat map [H', W'] at the model input, boxes in pixels of an image of size
  `image_hw`) per chosen class, for the one image whose intermediates are `inter`."""
  settings = settings or box_settings(predictor)
  maps = class_heatmaps(predictor, inter, method)[0]
  hh, ww = predictor.image_shape[:2]
  ks = [predictor.class_names.index(c) for c in chosen]
  found = heatmap_boxes(maps, ks, (hh, ww), settings)
  return [(c, found[k][0], boxes_lib.scale_boxes(found[k][1], image_hw[1] / ww,
                                                 image_hw[0] / hh))
          for c, k in zip(chosen, ks, strict=True)]


# ------------------------------------------------------------------------------ PDA
@dataclasses.dataclass
class PDASettings:
  """PDA settings; read from the run's config.explain where it has them.

  level 'features' (paper 000: windows over the last feature map, head re-evaluated) or
  'pixels' (windows over the preprocessed input, whole network re-evaluated). laplace_n: N of
  Laplace's correction; 0 = the size of the model's training split (`ModelInfo.num_train_examples`).
  """

  level: str = 'features'
  sampler: str = 'marginal'
  window: int = 2
  stride: int = 1
  padding: int = 1
  num_samples: int = 10
  chunk_size: int = 256
  num_reference: int = 64
  laplace_n: int = 0
  seed: int = 0

  @classmethod
  def from_config(cls, explain_cfg: Mapping[str, Any] | None) -> 'PDASettings':
    fields = {f.name for f in dataclasses.fields(cls)}
    settings = cls(**{k: v for k, v in (explain_cfg or {}).items() if k in fields})
    if settings.level not in ('features', 'pixels'):
      raise RunError(f"config.explain.level={settings.level!r}; valid: 'features', 'pixels'")
    if settings.laplace_n < 0:
      raise RunError(f'config.explain.laplace_n={settings.laplace_n}: expected >= 0 (0 = the '
                     'training split size).')
    return settings


def laplace_n(predictor: Predictor, settings: PDASettings) -> int:
  """N of PDA's Laplace correction: the configured one, else the training split's size."""
  if settings.laplace_n > 0:
    return int(settings.laplace_n)
  n = predictor.info.num_train_examples
  return int(n) if n else FALLBACK_LAPLACE_N


def fit_pda_sampler(settings: PDASettings, reference: np.ndarray) -> Any:
  """The PDA sampler fitted on reference maps [M, h, w, C'] (features or images)."""
  try:
    return pda.make_sampler(settings.sampler, reference, window=settings.window,
                            padding=settings.padding)
  except ValueError as e:
    raise RunError(f'config.explain: {e}') from e


def pda_heatmaps(predictor: Predictor, x: np.ndarray, sampler: Any, settings: PDASettings,
                 key: jax.Array, wrap: Callable[[Callable], Callable] | None = None
                 ) -> np.ndarray:
  """PDA relevance [K, h, w] (weight of evidence, log2 odds) of one preprocessed image x
  [H, W, C], over its feature map or its pixels (settings.level).

  wrap: applied to the function PDA re-evaluates (head or whole network), e.g. to report
  progress from inside the compiled loop; return the same object for the same input, or every
  call compiles anew.
  """
  wrap = wrap or (lambda fn: fn)
  padding = settings.padding if settings.sampler == 'conditional' else None
  kwargs = dict(window=settings.window, stride=settings.stride, padding=padding,
                num_samples=settings.num_samples, key=key, chunk_size=settings.chunk_size,
                laplace_n=laplace_n(predictor, settings))
  try:
    if settings.level == 'features':
      features = predictor.feature_maps(predictor.forward(x[None])[1])[0]
      return np.asarray(pda.pda_features(wrap(predictor.head_fn()), features, sampler,
                                         **kwargs), np.float32)
    return np.asarray(pda.pda_pixels(wrap(predictor.logits_fn()), x, sampler, **kwargs),
                      np.float32)
  except ValueError as e:
    raise RunError(f'config.explain ({settings.level} level): {e}') from e


def reference_maps(predictor: Predictor, settings: PDASettings,
                   images: Iterable[np.ndarray]) -> np.ndarray:
  """What the PDA sampler draws from [M, h, w, C']: feature maps (or the preprocessed images
  themselves at pixel level) of up to settings.num_reference preprocessed images [H, W, C]."""
  out = []
  for x in images:
    if len(out) >= settings.num_reference:
      break
    if settings.level == 'features':
      x = predictor.feature_maps(predictor.forward(x[None])[1])[0]
    out.append(np.asarray(x, np.float32))
  if len(out) < 2:
    raise RunError(f'PDA needs at least 2 reference images for its sampler, got {len(out)}.')
  return np.stack(out)


def training_images(predictor: Predictor, limit: int, split: str | None = None
                    ) -> Iterable[np.ndarray]:
  """The first `limit` images of the run's training split (or of `split`, e.g. its validation
  split), preprocessed as the stage's eval data ([H, W, C]); RunError when the run's data is
  not on this machine."""
  if predictor.config is None:
    raise RunError(f'{predictor.workdir}: no saved config, so its training data is unknown; '
                   'pass reference images (--pda_reference=FOLDER).')
  from cxr_jax.data import pipeline
  data_cfg = predictor.config.data
  with data_cfg.unlocked():
    data_cfg.pp_eval = predictor.info.pp_eval
  try:
    batches = pipeline.make_eval_iter(data_cfg, split or data_cfg.train_split,
                                      global_batch_size=8)
  except FileNotFoundError as e:
    raise RunError(f'PDA needs reference images for its sampler and the run\'s training data '
                   f'is not here ({e}); pass --pda_reference=FOLDER.') from e
  count = 0
  for batch in batches:
    for x, m in zip(batch['image'], batch['mask'], strict=True):
      if m > 0 and count < limit:
        count += 1
        yield x
    if count >= limit:
      return
