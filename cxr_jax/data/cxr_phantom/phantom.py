"""One phantom example: sampling its spec (labels, patient, anatomy, lesions, acquisition) and
rendering it at any size.

Sampling and rendering are separate so that the same spec renders at 64 or 512 px, and so that
tests can re-render an example with one lesion removed. All randomness comes from SeedSequences
derived from (seed, split, example index) and (seed, split, patient index), so any example can be
regenerated alone, bit-identically.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.ndimage

from cxr_jax.data.cxr_phantom import anatomy as A
from cxr_jax.data.cxr_phantom import findings as F
from cxr_jax.data.cxr_phantom import sampling as S

# Calibrated for the :demo baselines; see README.md ("Difficulty knob").
DEFAULT_LESION_CONTRAST = 3.0


@dataclasses.dataclass(frozen=True)
class PhantomParams:
  """What determines the content of the data set (a subset of the builder config)."""

  seed: int = 0
  split_sizes: tuple[int, int, int, int] = (16000, 2000, 4000, 1000)  # in sampling.SPLITS order
  lesion_contrast: float = DEFAULT_LESION_CONTRAST
  max_images_per_patient: int = 32


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
  """Everything needed to render one image; sizes in canonical units unless stated."""

  split: str
  index: int
  patient_id: int
  follow_up: int
  age: int
  sex: str
  view: str
  label_mask: int
  anatomy: A.Anatomy  # per image, before the geometric findings
  lesions: tuple[F.Lesion, ...]
  affine: np.ndarray  # [2, 3] canonical -> image coordinates in [-1, 1]
  window: tuple[float, float]  # densities mapped to black and white
  gamma: float
  blur: float  # Gaussian blur sigma, canonical units
  noise_256: float  # per-pixel noise std at 256 px (scales with size, see README)
  gradient: tuple[float, float]  # heel-effect brightness gradient along image x and y
  noise_seed: int

  @property
  def image_id(self) -> str:
    return f'phantom_{self.patient_id:08d}_{self.follow_up:03d}.png'


def _patient(params: PhantomParams, split: str, j: int) -> tuple[S.Demographics, A.Anatomy]:
  rng = np.random.default_rng(S.seed_sequence(params.seed, split, S._PATIENT_TAG, j))
  demo = S.sample_demographics(rng)
  return demo, A.sample_patient(rng, demo.sex, demo.first_age)


def sample_spec(
  params: PhantomParams, split: str, index: int, label_mask: int | None = None
) -> ExampleSpec:
  """The spec of example `index` of `split`; independent of every other example.

  label_mask overrides the sampled label set (for tests and figures); everything else is drawn
  from the same random stream as without it.
  """
  plan = S.split_plans(params.seed, tuple(params.split_sizes), params.max_images_per_patient)[split]
  j, follow_up = plan.locate(index)
  demo, patient_anat = _patient(params, split, j)
  rng = np.random.default_rng(S.seed_sequence(params.seed, split, S._IMAGE_TAG, index))
  mask = int(S.sample_label_masks(rng, 1, box_only=split == 'bbox')[0])
  if label_mask is not None:
    mask = int(label_mask)
  view = S.sample_view(rng, mask)
  anat = A.vary_for_image(rng, patient_anat, view)
  lesions = F.sample_lesions(rng, anat, mask, params.lesion_contrast)
  rot = np.deg2rad(rng.uniform(-6.0, 6.0))
  scale = rng.uniform(0.9, 1.06)
  aniso = rng.uniform(-0.03, 0.03)
  c, s = np.cos(rot), np.sin(rot)
  lin = scale * np.array([[c, -s], [s, c]]) @ np.diag([1.0 + aniso, 1.0 - aniso])
  shift = rng.uniform(-0.06, 0.06, size=2)
  affine = np.concatenate([lin, shift[:, None]], axis=1)
  return ExampleSpec(
    split=split,
    index=index,
    patient_id=plan.patient_id_offset + j,
    follow_up=follow_up,
    age=min(demo.first_age + int(follow_up * demo.years_per_follow_up), 100),
    sex=demo.sex,
    view=view,
    label_mask=mask,
    anatomy=anat,
    lesions=lesions,
    affine=affine,
    window=(rng.uniform(-0.04, 0.06), rng.uniform(0.72, 0.92)),
    gamma=rng.uniform(0.8, 1.25),
    blur=rng.uniform(0.003, 0.008),
    noise_256=rng.uniform(0.008, 0.02),
    gradient=(rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04)),
    noise_seed=int(rng.integers(2**63)),
  )


@dataclasses.dataclass
class RenderedExample:
  """image: [S, S, 1] uint8; masks: [S, S, 3] uint8 0/255 (left lung, right lung, heart);
  boxes: [n, 4] float32 pixel (x, y, w, h); box_labels: [n] int64 NIH class indices;
  box_lesions: [n] int64 index of each box's lesion in spec.lesions (a lesion that falls
  entirely outside the image after the affine has no box)."""

  image: np.ndarray
  masks: np.ndarray
  boxes: np.ndarray
  box_labels: np.ndarray
  box_lesions: np.ndarray


def _box(support: np.ndarray, pad: float, size: int) -> np.ndarray | None:
  """Pixel (x, y, w, h) of the support above 5% of its peak, padded by the blur."""
  peak = float(support.max()) if support.size else 0.0
  if peak <= 0:
    return None
  on = support > 0.05 * peak
  cols = np.flatnonzero(on.any(axis=0))
  rows = np.flatnonzero(on.any(axis=1))
  if len(cols) == 0:
    return None
  x0 = max(cols[0] - pad, 0.0)
  y0 = max(rows[0] - pad, 0.0)
  x1 = min(cols[-1] + 1 + pad, float(size))
  y1 = min(rows[-1] + 1 + pad, float(size))
  return np.array([x0, y0, x1 - x0, y1 - y0], np.float32)


def render(spec: ExampleSpec, size: int) -> RenderedExample:
  """Renders `spec` at size x size pixels."""
  g = A.make_grid(size, spec.affine)
  anat = F.apply_geometry(spec.anatomy, spec.lesions)
  base = A.render(g, anat)
  density = base.density
  keep = None
  boxes, labels, owners = [], [], []
  sigma_px = spec.blur / g.px
  pad = 2.0 * sigma_px
  for k, les in enumerate(spec.lesions):
    layer = F.render_lesion(les, g, anat, base)
    if layer.density is not None:
      density = density + layer.density
    if layer.keep_markings is not None:
      keep = layer.keep_markings if keep is None else keep * layer.keep_markings
    box = _box(layer.support, pad, size)
    if box is not None:
      boxes.append(box)
      labels.append(les.label)
      owners.append(k)
  markings = base.markings if keep is None else base.markings * keep
  density = density + markings
  lo, hi = spec.window
  img = np.clip((density - lo) / (hi - lo), 0.0, 1.0) ** spec.gamma
  if sigma_px > 0.25:
    img = scipy.ndimage.gaussian_filter(img, sigma_px, mode='nearest', truncate=3.0)
  c = (np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0
  img = img + (spec.gradient[0] * c[None, :] + spec.gradient[1] * c[:, None])
  noise_std = spec.noise_256 * size / 256.0
  noise = np.random.default_rng(spec.noise_seed).standard_normal((size, size), np.float32)
  img = img + noise_std * noise
  image = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)[..., None]
  masks = np.stack([base.lungs[1] > 0.5, base.lungs[0] > 0.5, base.heart > 0.5], axis=-1)
  return RenderedExample(
    image=image,
    masks=masks.astype(np.uint8) * 255,
    boxes=np.stack(boxes) if boxes else np.zeros((0, 4), np.float32),
    box_labels=np.array(labels, np.int64),
    box_lesions=np.array(owners, np.int64),
  )
