"""Heat map -> predicted boxes, for the weakly supervised localisation of papers 001/002/004.

A class's heat map (CAM, Grad-CAM, attention, PDA) is normalised, binarised at a fixed
threshold, split into connected components, and boxes are drawn around them, as in Wang et
al. (ChestX-ray8) and paper 002 ("binarization of activation maps using the predefined
threshold"). Nothing here sees ground truth: `heatmap_to_boxes` takes the heat map and the
settings only, so the boxes cannot be tuned per image towards the experts' boxes.

Mode 'multi_threshold' is Wang et al. 2017 (ChestX-ray8, section 4.2, "B-Box generation"):
the heat map scaled to [0, 255] is binarised at two intensities, 60 and 180, and a box is drawn
around every connected region of each binary map, all kept. Here the map is normalised to
[0, 1], so the default `thresholds` are (60/255, 180/255). Each box is a candidate, and the
more boxes the higher the accuracy at T(IoU/IoBB) and the false positives alike: read its
accuracy next to the AFP of `localization`.

Box convention (as in `overlays.Box`): (x, y, w, h) in pixels of the heat map; pixel (row i,
col j) covers [j, j+1) x [i, i+1), so a component spanning columns c0..c1 and rows r0..r1 gives
(c0, r0, c1 - c0 + 1, r1 - r0 + 1). `scale_boxes` maps them to image pixels; with the
half-pixel upsampling of `overlays.upsample`, cell j of a [h, w] map covers image columns
[j W/w, (j+1) W/w), so scaling by (W/w, H/h) is exact.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

Box = tuple[float, float, float, float]  # x, y, w, h in pixels (the same as overlays.Box)

NORMALIZE_CHOICES = ('minmax', 'max', 'none')
MODE_CHOICES = ('largest', 'all', 'peak', 'multi_threshold')
WANG_THRESHOLDS: tuple[float, ...] = (60 / 255, 180 / 255)  # ChestX-ray8's 60 and 180 of 255
CONNECTIVITY_CHOICES = (4, 8)


@dataclasses.dataclass(frozen=True)
class BoxSettings:
  """How a heat map becomes boxes (config.localize.boxes).

  threshold: pixels with normalised value >= threshold are foreground (in [0, 1] unless
    normalize is 'none'); not used by mode 'multi_threshold'.
  normalize: 'minmax' (h - min) / (max - min); 'max' h / max after clipping negatives to 0
    (keeps 0 meaning "no evidence"); 'none' the raw values.
  mode: 'largest' one box around the largest connected component; 'all' one box per component
    of area >= min_area; 'peak' the component holding the arg-max; 'multi_threshold' (Wang et
    al. 2017, ChestX-ray8) 'all' at each of `thresholds`, lowest threshold first, exact
    duplicate boxes dropped (a region unchanged between two thresholds gives one box).
  min_area: fraction of the map's area (pixel count of a component); the components of 'all'
    and 'multi_threshold', and a floor under the one of 'largest' / 'peak' (smaller -> no box).
  connectivity: 4 (edges) or 8 (edges and corners) neighbours.
  thresholds: the binarisation thresholds of mode 'multi_threshold' only (each in [0, 1]
    unless normalize is 'none'); default Wang et al.'s 60 and 180 of 255. Any list or tuple
    is stored as a tuple of floats (the settings stay hashable).
  """
  threshold: float = 0.5
  normalize: str = 'minmax'
  mode: str = 'largest'
  min_area: float = 0.0
  connectivity: int = 8
  thresholds: tuple[float, ...] = WANG_THRESHOLDS

  def __post_init__(self):
    _check(self.to_dict(), 'BoxSettings.')
    # Store plain floats (a config may hold ints such as threshold=1) and a tuple (a config
    # may hold a list, which would make the frozen settings unhashable).
    object.__setattr__(self, 'threshold', float(self.threshold))
    object.__setattr__(self, 'min_area', float(self.min_area))
    object.__setattr__(self, 'thresholds', tuple(float(t) for t in self.thresholds))

  @classmethod
  def from_config(cls, mapping: Mapping[str, Any] | None) -> 'BoxSettings':
    """Settings from config.localize.boxes (a dict or ConfigDict; None: the defaults).

    Raises ValueError naming `config.localize.boxes.<key>` for unknown keys or bad values.
    """
    if mapping is None:
      return cls()
    values = dict(mapping.to_dict() if hasattr(mapping, 'to_dict') else mapping)
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in fields]
    if unknown:
      raise ValueError(f'config.localize.boxes.{unknown[0]}: unknown key; valid keys: '
                       f'{", ".join(fields)}')
    _check(values, 'config.localize.boxes.')
    return cls(**values)  # __post_init__ turns a list of thresholds into a tuple

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _check(values: Mapping[str, Any], where: str) -> None:
  """Raises ValueError naming `<where><key>` for the first bad value in `values`."""
  def real(key: str) -> float | None:
    v = values.get(key)
    if v is None:
      return None
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
      raise ValueError(f'{where}{key}={v!r}: must be a number')
    if not np.isfinite(v):
      raise ValueError(f'{where}{key}={v!r}: must be finite')
    return float(v)

  for key, choices in (('normalize', NORMALIZE_CHOICES), ('mode', MODE_CHOICES),
                       ('connectivity', CONNECTIVITY_CHOICES)):
    if key in values and (isinstance(values[key], bool) or values[key] not in choices):
      raise ValueError(f'{where}{key}={values[key]!r}; valid: '
                       f'{", ".join(repr(c) for c in choices)}')
  threshold = real('threshold')
  normalize = values.get('normalize', 'minmax')
  if threshold is not None and normalize != 'none' and not 0.0 <= threshold <= 1.0:
    raise ValueError(f'{where}threshold={threshold!r}: must be in [0, 1] for a normalised map '
                     f"(normalize={normalize!r}); use normalize='none' for raw values")
  thresholds = values.get('thresholds')
  if thresholds is not None:
    if not isinstance(thresholds, (list, tuple)) or not thresholds:
      raise ValueError(f'{where}thresholds={thresholds!r}: must be a non-empty list or tuple of '
                       f'numbers')
    for t in thresholds:
      if isinstance(t, bool) or not isinstance(t, (int, float, np.integer, np.floating)):
        raise ValueError(f'{where}thresholds={thresholds!r}: {t!r} is not a number')
      if not np.isfinite(t):
        raise ValueError(f'{where}thresholds={thresholds!r}: {t!r} is not finite')
      if normalize != 'none' and not 0.0 <= t <= 1.0:
        raise ValueError(f'{where}thresholds={thresholds!r}: {t!r} must be in [0, 1] for a '
                         f"normalised map (normalize={normalize!r}); Wang et al.'s 60 and 180 "
                         f'of 255 are (60/255, 180/255)')
  min_area = real('min_area')
  if min_area is not None and not 0.0 <= min_area <= 1.0:
    raise ValueError(f'{where}min_area={min_area!r}: a fraction of the map, must be in [0, 1]')


def normalize_heatmap(heat: np.ndarray, how: str = 'minmax') -> np.ndarray:
  """heat [H, W] -> [H, W] float64, in [0, 1] for 'minmax' and 'max' (see BoxSettings).

  A constant map (minmax) or one without positive values (max) gives all zeros. 'none' returns
  the values unchanged. NaN or inf -> ValueError (a broken map must not turn into a box).
  """
  heat = np.asarray(heat, np.float64)
  if heat.ndim != 2:
    raise ValueError(f'heat map must be [H, W], got shape {heat.shape}')
  if not np.isfinite(heat).all():
    raise ValueError('heat map holds NaN or inf')
  if how not in NORMALIZE_CHOICES:
    raise ValueError(f'normalize={how!r}; valid: {", ".join(map(repr, NORMALIZE_CHOICES))}')
  if how == 'none' or heat.size == 0:
    return heat.copy()
  if how == 'max':
    heat = np.clip(heat, 0.0, None)
    hi = heat.max()
    return heat / hi if hi > 0 else np.zeros_like(heat)
  lo, hi = heat.min(), heat.max()
  return (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)


def heatmap_to_boxes(heat: np.ndarray, settings: BoxSettings | None = None) -> list[Box]:
  """Boxes (x, y, w, h) in heat-map pixels around the thresholded components of heat [H, W].

  Order: largest component (pixel count) first, ties by the top-left corner (y, then x); for
  'multi_threshold' that order within each threshold, the thresholds from low to high, each
  box once. Empty when nothing reaches the threshold, and for a flat map (after
  normalisation), which points nowhere.
  """
  settings = settings or BoxSettings()
  norm = normalize_heatmap(heat, settings.normalize)
  if norm.size == 0 or norm.min() == norm.max():
    return []
  min_pixels = settings.min_area * norm.size
  if settings.mode == 'multi_threshold':
    found: dict[Box, None] = {}  # insertion-ordered set: first occurrence wins
    for t in sorted(settings.thresholds):
      found.update(dict.fromkeys(_component_boxes(norm, t, settings, min_pixels, 'all')))
    return list(found)
  return _component_boxes(norm, settings.threshold, settings, min_pixels, settings.mode)


def _component_boxes(norm: np.ndarray, threshold: float, settings: BoxSettings,
                     min_pixels: float, mode: str) -> list[Box]:
  """Boxes of mode 'all' / 'largest' / 'peak' around the components of norm [H, W] >= threshold,
  in `heatmap_to_boxes` order."""
  mask = norm >= threshold
  structure = ndimage.generate_binary_structure(2, 1 if settings.connectivity == 4 else 2)
  labels, n = ndimage.label(mask, structure=structure)
  if n == 0:
    return []
  areas = np.bincount(labels.ravel(), minlength=n + 1)  # areas[0]: background
  slices = ndimage.find_objects(labels)

  def box(label: int) -> Box:
    rows, cols = slices[label - 1]
    return (float(cols.start), float(rows.start), float(cols.stop - cols.start),
            float(rows.stop - rows.start))

  def order(label: int) -> tuple[int, int, int]:
    rows, cols = slices[label - 1]
    return (-int(areas[label]), rows.start, cols.start)

  ranked = sorted(range(1, n + 1), key=order)
  if mode == 'all':
    chosen = [lab for lab in ranked if areas[lab] >= min_pixels]
  elif mode == 'largest':
    chosen = ranked[:1]
  else:  # 'peak': the first arg-max in row-major order, so ties resolve the same every time.
    peak = int(labels.flat[int(np.argmax(norm))])
    chosen = [peak] if peak else []
  return [box(lab) for lab in chosen if areas[lab] >= min_pixels]


def scale_boxes(boxes: Sequence[Box], sx: float, sy: float) -> list[Box]:
  """Boxes scaled by sx along x/w and sy along y/h (heat-map pixels -> image pixels)."""
  return [(float(x) * sx, float(y) * sy, float(w) * sx, float(h) * sy)
          for x, y, w, h in (tuple(b[:4]) for b in boxes)]
