"""Label sets, demographics and patient plans of the phantom, drawn from embedded NIH statistics.

Nothing here renders pixels, so tests can draw tens of thousands of label sets in milliseconds.
A label set is a 14-bit integer mask: bit i is NIH_CLASSES[i], mask 0 is 'No Finding'.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from cxr_jax.data.cxr_phantom import label_stats
from cxr_jax.labels import BOX_CLASSES, NIH_CLASSES

NUM_CLASSES = len(NIH_CLASSES)
BOX_BITS = sum(1 << NIH_CLASSES.index(c) for c in BOX_CLASSES)

# Splits in the order their patient ids are handed out; the code seeds each split's stream.
SPLITS: tuple[str, ...] = ('train', 'validation', 'test', 'bbox')
_PLAN_TAG = 0x504C414E  # 'PLAN'
_PATIENT_TAG = 0x50415449  # 'PATI'
_IMAGE_TAG = 0x494D4147  # 'IMAG'

_COMBO_MASKS = np.array([m for m, _ in label_stats.LABEL_SET_COUNTS], np.int64)
_COMBO_COUNTS = np.array([c for _, c in label_stats.LABEL_SET_COUNTS], np.float64)
_COMBO_P = _COMBO_COUNTS / _COMBO_COUNTS.sum()
_BOX_ROWS = (_COMBO_MASKS & BOX_BITS) != 0
_COMBO_P_BOX = np.where(_BOX_ROWS, _COMBO_COUNTS, 0.0) / _COMBO_COUNTS[_BOX_ROWS].sum()
_AGES = np.array([a for a, _ in label_stats.FIRST_AGE_COUNTS], np.int64)
_AGE_P = np.array([c for _, c in label_stats.FIRST_AGE_COUNTS], np.float64)
_AGE_P /= _AGE_P.sum()
_P_FEMALE = dict(label_stats.SEX_COUNTS)['F'] / sum(c for _, c in label_stats.SEX_COUNTS)
_VIEW_NF = dict(label_stats.VIEW_COUNTS_NO_FINDING)
_VIEW_AF = dict(label_stats.VIEW_COUNTS_ANY_FINDING)
P_AP_NO_FINDING = _VIEW_NF['AP'] / (_VIEW_NF['AP'] + _VIEW_NF['PA'])
P_AP_ANY_FINDING = _VIEW_AF['AP'] / (_VIEW_AF['AP'] + _VIEW_AF['PA'])


def masks_to_multihot(masks: np.ndarray) -> np.ndarray:
  """Integer label masks [...] -> float32 multi-hot [..., 14] in NIH_CLASSES order."""
  masks = np.asarray(masks, np.int64)
  return ((masks[..., None] >> np.arange(NUM_CLASSES)) & 1).astype(np.float32)


def nih_prevalence() -> np.ndarray:
  """Per-class image prevalence [14] of the embedded NIH label distribution."""
  return (masks_to_multihot(_COMBO_MASKS) * _COMBO_P[:, None]).sum(0)


def nih_pair_frequency(i: int, j: int, box_only: bool = False) -> float:
  """Fraction of images carrying both class i and class j in the embedded distribution."""
  both = ((_COMBO_MASKS >> i) & 1) & ((_COMBO_MASKS >> j) & 1)
  return float((both * (_COMBO_P_BOX if box_only else _COMBO_P)).sum())


def sample_label_masks(rng: np.random.Generator, n: int, box_only: bool = False) -> np.ndarray:
  """Draws n label masks [n] int64 from the empirical NIH joint distribution of label sets.

  box_only conditions on at least one of the 8 BOX_CLASSES being present (the `bbox` split).
  """
  p = _COMBO_P_BOX if box_only else _COMBO_P
  return _COMBO_MASKS[rng.choice(len(p), size=n, p=p)]


def _images_per_patient_p(max_images: int) -> tuple[np.ndarray, np.ndarray]:
  sizes = np.array([k for k, _ in label_stats.IMAGES_PER_PATIENT_COUNTS], np.int64)
  counts = np.array([c for _, c in label_stats.IMAGES_PER_PATIENT_COUNTS], np.float64)
  keep = sizes <= max_images
  return sizes[keep], counts[keep] / counts[keep].sum()


@dataclasses.dataclass(frozen=True)
class SplitPlan:
  """Which patient and follow-up each example index of a split belongs to.

  patient_start: [P + 1] int64, examples patient_start[j]:patient_start[j+1] are patient j's.
  patient_id_offset: patient j of this split has patient_id = patient_id_offset + j.
  """

  split: str
  num_examples: int
  patient_start: np.ndarray
  patient_id_offset: int

  @property
  def num_patients(self) -> int:
    return len(self.patient_start) - 1

  def locate(self, index: int) -> tuple[int, int]:
    """Example index -> (patient index within the split, follow_up)."""
    if not 0 <= index < self.num_examples:
      raise IndexError(f'example {index} outside split {self.split!r} of {self.num_examples}')
    j = int(np.searchsorted(self.patient_start, index, side='right')) - 1
    return j, index - int(self.patient_start[j])


def seed_sequence(seed: int, split: str, tag: int, index: int) -> np.random.SeedSequence:
  """The SeedSequence of one (split, stream, index): examples and patients draw independently."""
  return np.random.SeedSequence([seed, SPLITS.index(split), tag, index])


def _patient_sizes(seed: int, split: str, num_examples: int, max_images: int) -> np.ndarray:
  rng = np.random.default_rng(seed_sequence(seed, split, _PLAN_TAG, 0))
  sizes, p = _images_per_patient_p(max_images)
  # Every patient has >= 1 image, so num_examples draws always cover the split.
  draws = sizes[rng.choice(len(sizes), size=max(num_examples, 1), p=p)]
  ends = np.cumsum(draws)
  n_patients = int(np.searchsorted(ends, num_examples, side='left')) + 1
  draws = draws[:n_patients].copy()
  draws[-1] -= ends[n_patients - 1] - num_examples  # the last patient is cut at the split size
  return draws if num_examples > 0 else draws[:0]


@functools.lru_cache(maxsize=64)
def split_plans(seed: int, num_examples: tuple[int, ...], max_images: int) -> dict[str, SplitPlan]:
  """Plans of all SPLITS (sizes given in SPLITS order); patient ids are disjoint across splits."""
  plans = {}
  offset = 1
  for split, n in zip(SPLITS, num_examples, strict=True):
    sizes = _patient_sizes(seed, split, n, max_images)
    start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    plans[split] = SplitPlan(split, n, start, offset)
    offset += len(sizes)
  return plans


@dataclasses.dataclass(frozen=True)
class Demographics:
  sex: str  # 'M' or 'F'
  first_age: int
  years_per_follow_up: float


def sample_demographics(rng: np.random.Generator) -> Demographics:
  """Sex and age at the first image from the NIH patient distributions."""
  sex = 'F' if rng.random() < _P_FEMALE else 'M'
  age = int(_AGES[rng.choice(len(_AGES), p=_AGE_P)])
  # NIH follow-ups span months to a few years; ages rise slowly along a patient's series.
  return Demographics(sex, age, float(rng.uniform(0.05, 0.6)))


def sample_view(rng: np.random.Generator, mask: int) -> str:
  """'AP' or 'PA' with NIH's view frequency given whether the image has any finding."""
  p_ap = P_AP_ANY_FINDING if mask else P_AP_NO_FINDING
  return 'AP' if rng.random() < p_ap else 'PA'
