"""The 14 NIH findings of the phantom: one sampler and one renderer per finding.

A finding is drawn as one or more `Lesion`s (one per separate opacity or per side), each with
its parameters in canonical units (see anatomy.py). Renderers return an additive density layer,
an optional factor on the vessel markings (a pneumothorax has none) and the lesion's support,
from which the builder derives the lesion's box after the global affine. Cardiomegaly, emphysema
and the volume loss of atelectasis change the anatomy itself (`apply_geometry`).

Every opacity/lucency amplitude is multiplied by `contrast` (the builder's `lesion_contrast`), and
so are the geometric changes (heart enlargement beyond CTR 0.5, diaphragm flattening, volume loss).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from cxr_jax.data.cxr_phantom import anatomy as A
from cxr_jax.labels import NIH_CLASSES

_IDX = {name: i for i, name in enumerate(NIH_CLASSES)}


@dataclasses.dataclass(frozen=True)
class Lesion:
  """One drawn instance of a finding; params are canonical units / density units."""

  label: int  # index into NIH_CLASSES
  side: int | None  # 0 = patient right (image left), 1 = patient left, None = both / midline
  params: tuple[tuple[str, float], ...]

  @property
  def name(self) -> str:
    return NIH_CLASSES[self.label]

  def p(self, key: str) -> float:
    return dict(self.params)[key]


@dataclasses.dataclass
class Layer:
  """A lesion on the grid: density [S, S] to add, markings factor [S, S] or None, support [S, S]."""

  density: np.ndarray | None
  keep_markings: np.ndarray | None
  support: np.ndarray


def _lesion(name: str, side: int | None, **params: float) -> Lesion:
  return Lesion(_IDX[name], side, tuple((k, float(v)) for k, v in sorted(params.items())))


def _side(rng: np.random.Generator) -> int:
  return int(rng.integers(2))


def _waves(g: A.Grid, seed: float, k_lo: float, k_hi: float, n: int = 3) -> np.ndarray:
  """Sum of n plane waves with pseudo-random direction/frequency derived from `seed`; in [-1, 1]."""
  rng = np.random.default_rng(int(seed * 1e6) & 0xFFFFFFFF)
  out = np.zeros_like(g.x)
  for _ in range(n):
    ang = rng.uniform(0, np.pi)
    k = rng.uniform(k_lo, k_hi)
    # Waves finer than ~3 px would alias into noise; keep them at the pixel limit instead.
    k = min(k, np.pi / (1.5 * g.px))
    out += np.cos(k * (float(np.cos(ang)) * g.x + float(np.sin(ang)) * g.y) + rng.uniform(0, 6.3))
  return out / n


def _sphere(g: A.Grid, cx: float, cy: float, r: float, amp: float) -> tuple[np.ndarray, float]:
  """Projected density profile of a ball (chord length), keeping its integral when sub-pixel."""
  r_eff = max(r, 0.9 * g.px)
  amp_eff = amp * (r / r_eff) ** 2
  dx, dy = g.x - cx, g.y - cy
  return np.sqrt(np.clip(1.0 - (dx * dx + dy * dy) / (r_eff * r_eff), 0.0, 1.0)), amp_eff


# ---------------------------------------------------------------------------------------------
# Samplers: (rng, anatomy, contrast) -> list of Lesion. Locations are drawn in canonical space.


def sample_atelectasis(rng, anat: A.Anatomy, c: float) -> list[Lesion]:
  side = _side(rng)
  # Placed above the level the elevated hemidiaphragm will reach.
  x, y = A.random_point_in_lung(rng, anat, side, (0.45, 0.78), margin=0.05)
  return [
    _lesion(
      'Atelectasis',
      side,
      x=x,
      y=y,
      length=rng.uniform(0.14, 0.3),
      thick=rng.uniform(0.025, 0.05),
      angle=np.deg2rad(rng.uniform(-25, 25)),
      amp=0.24 * c * rng.uniform(0.8, 1.2),
      elevation=rng.uniform(0.02, 0.05) * min(c, 2.0),
    )
  ]


def sample_cardiomegaly(rng, anat: A.Anatomy, c: float) -> list[Lesion]:
  ctr = anat.cardiothoracic_ratio()
  target = 0.51 + max(c, 0.0) * rng.uniform(0.03, 0.15)
  return [_lesion('Cardiomegaly', None, scale=max(target / ctr, 1.0))]


def sample_effusion(rng, anat: A.Anatomy, c: float) -> list[Lesion]:
  sides = [0, 1] if rng.random() < 0.3 else [_side(rng)]
  out = []
  for side in sides:
    out.append(
      _lesion(
        'Effusion',
        side,
        level=rng.uniform(0.04, 0.28),
        meniscus=rng.uniform(0.06, 0.16),
        amp=anat.lung_air[side] * min(c, 1.3) * rng.uniform(0.7, 1.0),
      )
    )
  return out


def sample_infiltration(rng, anat: A.Anatomy, c: float) -> list[Lesion]:
  out = []
  for _ in range(1 if rng.random() < 0.6 else 2):
    side = _side(rng)
    x, y = A.random_point_in_lung(rng, anat, side, (0.15, 0.95))
    out.append(
      _lesion(
        'Infiltration',
        side,
        x=x,
        y=y,
        rx=rng.uniform(0.09, 0.2),
        ry=rng.uniform(0.09, 0.2),
        amp=0.14 * c * rng.uniform(0.8, 1.2),
        tex=rng.random(),
      )
    )
  return out


def _round_lesions(rng, anat, c, name, count, r_range, y_range, lobulation) -> list[Lesion]:
  out = []
  for _ in range(count):
    side = _side(rng)
    r = rng.uniform(*r_range)
    x, y = A.random_point_in_lung(rng, anat, side, y_range, margin=0.6 * r)
    out.append(
      _lesion(
        name,
        side,
        x=x,
        y=y,
        r=r,
        amp=c * (0.12 + 1.0 * r) * rng.uniform(0.85, 1.15),
        lob=rng.uniform(0.0, lobulation),
        lob_k=float(rng.integers(3, 6)),
        lob_phase=rng.uniform(0, 2 * np.pi),
      )
    )
  return out


def sample_mass(rng, anat: A.Anatomy, c: float) -> list[Lesion]:
  # Masses are >= 3 cm: radius 0.085-0.17 canonical units (~3.2-6.5 cm diameter).
  n = 1 if rng.random() < 0.85 else 2
  return _round_lesions(rng, anat, c, 'Mass', n, (0.085, 0.17), (0.1, 0.85), 0.15)


def sample_nodule(rng, anat: A.Anatomy, c: float) -> list[Lesion]:
  # Nodules are < 3 cm: radius 0.02-0.065 canonical units (~0.8-2.5 cm diameter).
  u = rng.random()
  n = 1 if u < 0.75 else (2 if u < 0.9 else int(rng.integers(3, 5)))
  return _round_lesions(rng, anat, c, 'Nodule', n, (0.02, 0.065), (0.05, 0.9), 0.05)


def sample_pneumonia(rng, anat: A.Anatomy, c: float) -> list[Lesion]:
  sides = [0, 1] if rng.random() < 0.2 else [_side(rng)]
  out = []
  for side in sides:
    y_range = (0.4, 0.92) if rng.random() < 0.7 else (0.1, 0.6)
    x, y = A.random_point_in_lung(rng, anat, side, y_range)
    out.append(
      _lesion(
        'Pneumonia',
        side,
        x=x,
        y=y,
        r=rng.uniform(0.14, 0.26),
        amp=0.2 * c * rng.uniform(0.8, 1.2),
        tex=rng.random(),
      )
    )
  return out


def sample_pneumothorax(rng, anat: A.Anatomy, c: float) -> list[Lesion]:
  return [
    _lesion(
      'Pneumothorax',
      _side(rng),
      collapse=rng.uniform(0.12, 0.35),
      amp=0.08 * c * rng.uniform(0.8, 1.2),
      line=0.12 * c * rng.uniform(0.8, 1.2),
    )
  ]


def sample_consolidation(rng, anat: A.Anatomy, c: float) -> list[Lesion]:
  side = _side(rng)
  upper = rng.random() < 0.4
  y_range = (0.12, 0.45) if upper else (0.55, 0.9)
  x, y = A.random_point_in_lung(rng, anat, side, y_range)
  return [
    _lesion(
      'Consolidation',
      side,
      x=x,
      y=y,
      r=rng.uniform(0.16, 0.3),
      upper=float(upper),
      fissure=anat.hilum_y + rng.uniform(-0.06, 0.04),
      slope=rng.uniform(-0.3, 0.5),
      amp=0.3 * c * rng.uniform(0.85, 1.15),
      bronchograms=float(rng.random() < 0.6),
      br_n=float(rng.integers(14, 22)),
      br_phase=rng.uniform(0, 2 * np.pi),
    )
  ]


def sample_edema(rng, anat: A.Anatomy, c: float) -> list[Lesion]:
  amp = 0.13 * c * rng.uniform(0.8, 1.2)
  sx, sy = rng.uniform(0.22, 0.32), rng.uniform(0.28, 0.4)
  return [_lesion('Edema', side, amp=amp, sx=sx, sy=sy) for side in (0, 1)]


def sample_emphysema(rng, anat: A.Anatomy, c: float) -> list[Lesion]:
  k = min(max(c, 0.0), 1.5)
  return [
    _lesion(
      'Emphysema',
      None,
      lower=0.06 * k * rng.uniform(0.7, 1.3),
      flatten=min(0.6 * k * rng.uniform(0.8, 1.2), 0.9),
      lucency=0.07 * c * rng.uniform(0.8, 1.2),
      fewer_markings=min(0.35 * k, 0.8),
    )
  ]


def sample_fibrosis(rng, anat: A.Anatomy, c: float) -> list[Lesion]:
  sides = [0, 1] if rng.random() < 0.65 else [_side(rng)]
  spacing = rng.uniform(0.035, 0.055)
  ang = rng.uniform(0, np.pi)
  amp = 0.12 * c * rng.uniform(0.8, 1.2)
  return [_lesion('Fibrosis', s, spacing=spacing, angle=ang, amp=amp) for s in sides]


def sample_pleural_thickening(rng, anat: A.Anatomy, c: float) -> list[Lesion]:
  return [
    _lesion(
      'Pleural_Thickening',
      _side(rng),
      apical=float(rng.random() < 0.5),
      thick=rng.uniform(0.018, 0.045),
      y0=rng.uniform(0.25, 0.45),
      y1=rng.uniform(0.65, 0.9),
      amp=0.24 * c * rng.uniform(0.8, 1.2),
    )
  ]


def sample_hernia(rng, anat: A.Anatomy, c: float) -> list[Lesion]:
  r = rng.uniform(0.06, 0.12)
  x = rng.uniform(-0.02, 0.12)
  top = float(A.diaphragm_y(anat, 1, max(abs(x), 0.05)))
  return [
    _lesion(
      'Hernia',
      None,
      x=x,
      y=top - r * rng.uniform(0.5, 0.9),
      r=r,
      level=rng.uniform(-0.3, 0.3),
      gas=0.22 * c * rng.uniform(0.8, 1.2),
      fluid=0.08 * c * rng.uniform(0.8, 1.2),
    )
  ]


SAMPLERS: dict[str, Callable[[np.random.Generator, A.Anatomy, float], list[Lesion]]] = {
  'Atelectasis': sample_atelectasis,
  'Cardiomegaly': sample_cardiomegaly,
  'Effusion': sample_effusion,
  'Infiltration': sample_infiltration,
  'Mass': sample_mass,
  'Nodule': sample_nodule,
  'Pneumonia': sample_pneumonia,
  'Pneumothorax': sample_pneumothorax,
  'Consolidation': sample_consolidation,
  'Edema': sample_edema,
  'Emphysema': sample_emphysema,
  'Fibrosis': sample_fibrosis,
  'Pleural_Thickening': sample_pleural_thickening,
  'Hernia': sample_hernia,
}
assert tuple(SAMPLERS) == NIH_CLASSES

# Geometric findings first, so that later lesions are placed in the changed anatomy.
_GEOMETRY_ORDER = ('Emphysema', 'Cardiomegaly', 'Atelectasis')


def sample_lesions(
  rng: np.random.Generator, anat: A.Anatomy, mask: int, contrast: float
) -> tuple[Lesion, ...]:
  """All lesions of an image whose label set is `mask` (bit i = NIH_CLASSES[i])."""
  names = [n for n in NIH_CLASSES if (mask >> _IDX[n]) & 1]
  order = [n for n in _GEOMETRY_ORDER if n in names] + [
    n for n in names if n not in _GEOMETRY_ORDER
  ]
  lesions: list[Lesion] = []
  for name in order:
    new = SAMPLERS[name](rng, apply_geometry(anat, lesions), contrast)
    lesions.extend(new)
  return tuple(sorted(lesions, key=lambda les: les.label))


def apply_geometry(anat: A.Anatomy, lesions: list[Lesion] | tuple[Lesion, ...]) -> A.Anatomy:
  """Anatomy changed by cardiomegaly, emphysema and atelectatic volume loss."""
  for les in lesions:
    if les.name == 'Cardiomegaly':
      f = les.p('scale')
      # Enlarge about a point inside the heart, right of its centre (image left), so the
      # silhouette grows mostly to the image right and down as in left-ventricular enlargement.
      fx = anat.heart_cx - 0.4 * anat.heart_half_width()
      fy = anat.heart_cy - 0.3 * anat.heart_b
      anat = dataclasses.replace(
        anat,
        heart_cx=fx + f * (anat.heart_cx - fx),
        heart_cy=fy + f * (anat.heart_cy - fy),
        heart_a=anat.heart_a * f,
        heart_b=anat.heart_b * f,
      )
    elif les.name == 'Emphysema':
      anat = dataclasses.replace(
        anat,
        dia_y=tuple(d + les.p('lower') for d in anat.dia_y),
        lung_base=anat.lung_base + les.p('lower'),
        dome_h=tuple(h * (1.0 - les.p('flatten')) for h in anat.dome_h),
        lung_air=tuple(a + les.p('lucency') for a in anat.lung_air),
        marking_gain=anat.marking_gain * (1.0 - les.p('fewer_markings')),
      )
    elif les.name == 'Atelectasis':
      dia = list(anat.dia_y)
      dia[les.side] -= les.p('elevation')
      anat = dataclasses.replace(anat, dia_y=tuple(dia))
  return anat


# ---------------------------------------------------------------------------------------------
# Renderers: (lesion, grid, anatomy incl. geometry, rendered anatomy) -> Layer.


def _render_atelectasis(les, g, anat, base) -> Layer:
  a = 0.5 * les.p('length')
  b = max(0.5 * les.p('thick'), 0.75 * g.px)
  amp = les.p('amp') * 0.5 * les.p('thick') / b
  d = A.ellipse_dist(g.x, g.y, les.p('x'), les.p('y'), a, b, les.p('angle'))
  band = np.sqrt(np.clip(d / b, 0.0, 1.0)) * base.lungs[les.side]
  # Volume loss: the strip between the normal and the elevated hemidiaphragm.
  normal = dataclasses.replace(
    anat,
    dia_y=tuple(
      v + (les.p('elevation') if i == les.side else 0.0) for i, v in enumerate(anat.dia_y)
    ),
  )
  strip = np.abs(g.ramp(A.lung_dist(normal, les.side, g.x, g.y)) - base.lungs[les.side])
  return Layer(amp * band, None, np.maximum(band, strip))


def _render_cardiomegaly(les, g, anat, base) -> Layer:
  return Layer(None, None, base.heart)


def _render_effusion(les, g, anat, base) -> Layer:
  sign = A.SIDE_SIGN[les.side]
  t = np.clip((sign * g.x - anat.lung_cx + anat.lung_rx) / (2 * anat.lung_rx), 0.0, 1.0)
  meniscus = anat.dia_y[les.side] - les.p('level') - les.p('meniscus') * t * t
  fluid = g.ramp(g.y - meniscus, max(2.0, 0.025 / g.px)) * base.lungs[les.side]
  return Layer(les.p('amp') * fluid, None, fluid)


def _render_infiltration(les, g, anat, base) -> Layer:
  dx = (g.x - les.p('x')) / les.p('rx')
  dy = (g.y - les.p('y')) / les.p('ry')
  env = np.exp(-(dx * dx + dy * dy)) * base.lungs[les.side]
  patch = np.clip(0.5 + 0.9 * _waves(g, les.p('tex'), 25.0, 45.0), 0.0, 1.0)
  return Layer(les.p('amp') * env * patch, None, env)


def _render_round(les, g, anat, base) -> Layer:
  r = les.p('r')
  if les.p('lob') > 0:
    # Lobulated outline: the radius varies with the angle around the centre.
    theta = np.arctan2(g.y - les.p('y'), g.x - les.p('x'))
    r_theta = r * (1.0 + les.p('lob') * np.cos(les.p('lob_k') * theta + les.p('lob_phase')))
    r_eff = np.maximum(r_theta, 0.9 * g.px)
    dx, dy = g.x - les.p('x'), g.y - les.p('y')
    prof = np.sqrt(np.clip(1.0 - (dx * dx + dy * dy) / (r_eff * r_eff), 0.0, 1.0))
    amp = les.p('amp')
  else:
    prof, amp = _sphere(g, les.p('x'), les.p('y'), r, les.p('amp'))
  return Layer(amp * prof, None, prof)


def _render_pneumonia(les, g, anat, base) -> Layer:
  dx, dy = g.x - les.p('x'), g.y - les.p('y')
  rho2 = (dx * dx + dy * dy) / les.p('r') ** 2
  env = np.clip(1.3 - rho2 + 0.35 * _waves(g, les.p('tex'), 12.0, 22.0), 0.0, 1.0)
  env *= base.lungs[les.side]
  inhom = 0.8 + 0.2 * _waves(g, les.p('tex') + 0.5, 30.0, 50.0)
  return Layer(les.p('amp') * env * inhom, None, env)


def _render_pneumothorax(les, g, anat, base) -> Layer:
  side, f = les.side, les.p('collapse')
  sign = A.SIDE_SIGN[side]
  rx, ry = anat.lung_rx, anat.lung_ry(side)
  rx2, ry2 = rx * (1 - f), ry * (1 - 0.7 * f)
  # The collapsed lung keeps its medial and basal edges, so the air gap is apical and lateral.
  cx2 = sign * (anat.lung_cx - rx * f)
  cy2 = anat.lung_cy(side) + (ry - ry2)
  dcol = A.superellipse_dist(g.x, g.y, cx2, cy2, rx2, ry2, anat.lung_p)
  lung = base.lungs[side]
  gap = lung * (1.0 - g.ramp(dcol))
  w = max(0.006, 0.6 * g.px)
  line = np.exp(-((dcol / w) ** 2)) * lung
  density = les.p('line') * line - les.p('amp') * gap
  return Layer(density, 1.0 - gap, np.maximum(gap, line))


def _render_consolidation(les, g, anat, base) -> Layer:
  sign = A.SIDE_SIGN[les.side]
  fissure = les.p('fissure') + les.p('slope') * (sign * g.x - anat.lung_cx)
  # A sharp border at the fissure, soft elsewhere.
  lobe = g.ramp(fissure - g.y) if les.p('upper') else g.ramp(g.y - fissure)
  dx, dy = g.x - les.p('x'), g.y - les.p('y')
  env = np.clip(1.5 * (1.0 - (dx * dx + dy * dy) / les.p('r') ** 2), 0.0, 1.0)
  region = base.lungs[les.side] * lobe * env
  dens = region
  if les.p('bronchograms'):
    r, th = base.r_hilum, base.theta_hilum
    br = (0.5 + 0.5 * np.cos(les.p('br_n') * th + les.p('br_phase'))) ** 16
    br *= np.clip((r - 0.06) / 0.05, 0.0, 1.0) * np.exp(-r / 0.35)
    dens = region * (1.0 - 0.45 * br)
  return Layer(les.p('amp') * dens, None, region)


def _render_edema(les, g, anat, base) -> Layer:
  sign = A.SIDE_SIGN[les.side]
  dx = (g.x - sign * anat.hilum_x) / les.p('sx')
  dy = (g.y - anat.hilum_y) / les.p('sy')
  haze = np.exp(-(dx * dx + dy * dy)) * base.lungs[les.side]
  return Layer(les.p('amp') * haze, None, haze)


def _render_emphysema(les, g, anat, base) -> Layer:
  return Layer(None, None, np.maximum(base.lungs[0], base.lungs[1]))


def _render_fibrosis(les, g, anat, base) -> Layer:
  side = les.side
  frac = (g.y - anat.apex_y) / (anat.dia_y[side] - anat.apex_y)
  upper = np.clip(1.0 - frac / 0.65, 0.0, 1.0)
  sign = A.SIDE_SIGN[side]
  periph = np.clip((sign * g.x - anat.lung_cx + 0.5 * anat.lung_rx) / anat.lung_rx, 0.0, 1.0)
  env = np.sqrt(upper * periph) * base.lungs[side]
  spacing = les.p('spacing')
  if spacing < 3.0 * g.px:
    net = 0.35  # the reticulation is finer than the pixels: only its mean density survives
  else:
    k = 2 * np.pi / spacing
    c, s = float(np.cos(les.p('angle'))), float(np.sin(les.p('angle')))
    u = c * g.x + s * g.y
    v = -s * g.x + c * g.y
    warp = 0.8 * np.sin(0.35 * k * v)
    lu = np.clip(1.0 - np.abs(np.sin(k * u + warp)) / 0.35, 0.0, 1.0)
    lv = np.clip(1.0 - np.abs(np.sin(k * v - warp)) / 0.35, 0.0, 1.0)
    net = np.maximum(lu, lv)
  return Layer(les.p('amp') * env * (0.3 + net), None, env)


def _render_pleural_thickening(les, g, anat, base) -> Layer:
  side = les.side
  sign = A.SIDE_SIGN[side]
  t = les.p('thick')
  inner = A.superellipse_dist(
    g.x,
    g.y,
    sign * anat.lung_cx,
    anat.lung_cy(side),
    anat.lung_rx - t,
    anat.lung_ry(side) - t,
    anat.lung_p,
  )
  band = base.lungs[side] * (1.0 - g.ramp(inner))
  frac = (g.y - anat.apex_y) / (anat.dia_y[side] - anat.apex_y)
  if les.p('apical'):
    gate = np.clip((0.25 - frac) / 0.05, 0.0, 1.0)
  else:
    lateral = np.clip((sign * g.x - anat.lung_cx) / 0.05, 0.0, 1.0)
    y_in = np.clip((frac - les.p('y0')) / 0.05, 0, 1) * np.clip((les.p('y1') - frac) / 0.05, 0, 1)
    gate = lateral * y_in
  band = band * gate
  return Layer(les.p('amp') * band, None, band)


def _render_hernia(les, g, anat, base) -> Layer:
  prof, scale = _sphere(g, les.p('x'), les.p('y'), les.p('r'), 1.0)
  level = les.p('y') + les.p('level') * les.p('r')
  above = g.ramp(level - g.y)
  # Gas above the air-fluid level (lucent), fluid/soft tissue below (dense).
  density = scale * prof * (les.p('fluid') * (1.0 - above) - les.p('gas') * above)
  return Layer(density, None, prof)


RENDERERS: dict[str, Callable[..., Layer]] = {
  'Atelectasis': _render_atelectasis,
  'Cardiomegaly': _render_cardiomegaly,
  'Effusion': _render_effusion,
  'Infiltration': _render_infiltration,
  'Mass': _render_round,
  'Nodule': _render_round,
  'Pneumonia': _render_pneumonia,
  'Pneumothorax': _render_pneumothorax,
  'Consolidation': _render_consolidation,
  'Edema': _render_edema,
  'Emphysema': _render_emphysema,
  'Fibrosis': _render_fibrosis,
  'Pleural_Thickening': _render_pleural_thickening,
  'Hernia': _render_hernia,
}
assert tuple(RENDERERS) == NIH_CLASSES


def render_lesion(les: Lesion, g: A.Grid, anat: A.Anatomy, base: A.Rendered) -> Layer:
  """Layer of one lesion; `anat` must already include apply_geometry of all lesions."""
  return RENDERERS[les.name](les, g, anat, base)
