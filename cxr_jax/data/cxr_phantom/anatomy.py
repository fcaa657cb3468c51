"""Normal chest anatomy of the phantom: parameters and analytic rendering on a coordinate grid.

Canonical (patient) coordinates: x points to the image right, y points down, and the image
spans [-1, 1]^2 when the global affine is the identity. The view is PA, so the patient's left
(heart, left lung, aortic knob, gastric bubble) is on the image right (x > 0). One canonical unit
is about 19 cm (the inner rib-cage width, ~1.5 units, is ~28 cm in an adult).

Every structure is an analytic shape evaluated on the grid of pixel centres mapped back through
the per-image affine, so boxes and masks follow the affine by construction and the cost scales
with the number of pixels. Soft edges are linear ramps about one pixel wide (cheap anti-aliasing).
Side index 0 is the patient's RIGHT lung (image left, sign -1), side 1 the LEFT lung (sign +1).
"""

from __future__ import annotations

import dataclasses

import numpy as np

SIDE_SIGN = (-1.0, 1.0)


@dataclasses.dataclass(frozen=True)
class Anatomy:
  """Geometry and densities of one image's normal chest (canonical units, density units).

  Per-patient values are drawn once per patient; `vary_for_image` jitters a few of them.
  Tuples of two are per side (0 = patient right / image left, 1 = patient left / image right).
  """

  body_w: float  # torso half-width
  thorax_w: float  # rib cage inner half-width (CTR denominator is 2 * thorax_w)
  apex_y: float  # top of the lung apices
  lung_cx: float  # |x| of each lung's centre
  lung_rx: float  # lung half-width
  lung_p: float  # superellipse exponent of the lung outline (2 = ellipse, larger = boxier)
  dia_y: tuple[float, float]  # hemidiaphragm height at the costophrenic angles
  lung_base: float  # bottom of the lung outline before the diaphragm cuts it (below both dia_y)
  dome_h: tuple[float, float]  # hemidiaphragm dome height above dia_y
  med_w: float  # upper mediastinum half-width
  knob_y: float  # aortic knob height (image right)
  heart_cx: float
  heart_cy: float
  heart_a: float  # semi-axis along the heart's long axis
  heart_b: float
  heart_angle: float  # long axis angle from the x axis, radians (apex points down to image right)
  hilum_x: float  # |x| of the hila
  hilum_y: float
  rib_y0: float
  rib_spacing: float
  rib_thick: float  # fraction of the spacing covered by a rib
  clav_y: float  # medial end of the clavicles
  clav_rise: float  # how much higher the lateral end is
  vessel_n: tuple[float, float]  # angular frequencies of the two vessel-marking families
  vessel_phase: tuple[float, float]
  lung_air: tuple[float, float]  # density removed by aerated lung (higher = more lucent)
  marking_gain: float
  breast: float  # 0 for men, size of the breast shadows for women
  gastric_bubble: float  # density of the gastric gas bubble under the left hemidiaphragm

  @property
  def lung_top(self) -> float:
    return self.apex_y

  def lung_ry(self, side: int) -> float:
    del side  # both outlines share one height; the hemidiaphragms cut them at different levels
    return 0.5 * (self.lung_base - self.apex_y)

  def lung_cy(self, side: int) -> float:
    return self.apex_y + self.lung_ry(side)

  def heart_half_width(self) -> float:
    """Horizontal half-extent of the (rotated elliptical) heart."""
    c, s = np.cos(self.heart_angle), np.sin(self.heart_angle)
    return float(np.sqrt((self.heart_a * c) ** 2 + (self.heart_b * s) ** 2))

  def cardiothoracic_ratio(self) -> float:
    return self.heart_half_width() / self.thorax_w


def sample_patient(rng: np.random.Generator, sex: str, age: int) -> Anatomy:
  """Per-patient anatomy: body size, heart size, lung shape, rib layout, vessel pattern."""
  female = sex == 'F'
  u = rng.uniform
  body_w = u(0.80, 0.94) * (0.96 if female else 1.0)
  thorax_w = body_w - u(0.07, 0.13)
  apex_y = u(-0.72, -0.60)
  dia = u(0.30, 0.42)
  dia_left = dia + u(0.02, 0.06)  # the right hemidiaphragm sits higher (liver)
  lung_cx = thorax_w * u(0.50, 0.56)
  lung_rx = thorax_w - lung_cx - 0.015
  ctr = u(0.37, 0.47)
  half_w = ctr * thorax_w
  angle = np.deg2rad(u(20.0, 38.0))
  aspect = u(1.15, 1.4)  # heart long axis / short axis
  c, s = np.cos(angle), np.sin(angle)
  heart_b = half_w / np.sqrt((aspect * c) ** 2 + s**2)
  heart_a = aspect * heart_b
  # About a third of the cardiac silhouette lies right of the midline (image left).
  heart_cx = half_w * (1.0 - 2.0 * u(0.25, 0.36))
  heart_cy = dia - u(0.12, 0.2)
  rib_spacing = (dia - apex_y) / u(7.0, 8.0)
  return Anatomy(
    body_w=body_w,
    thorax_w=thorax_w,
    apex_y=apex_y,
    lung_cx=lung_cx,
    lung_rx=lung_rx,
    lung_p=u(2.2, 3.0),
    dia_y=(dia, dia_left),
    lung_base=dia_left + 0.06,
    dome_h=(u(0.08, 0.14), u(0.07, 0.12)),
    med_w=u(0.07, 0.10),
    knob_y=apex_y + u(0.28, 0.36),
    heart_cx=float(heart_cx),
    heart_cy=float(heart_cy),
    heart_a=float(heart_a),
    heart_b=float(heart_b),
    heart_angle=float(angle),
    hilum_x=u(0.15, 0.2),
    hilum_y=apex_y + u(0.55, 0.65),
    rib_y0=apex_y - u(0.0, 0.05),
    rib_spacing=rib_spacing,
    rib_thick=u(0.38, 0.5),
    clav_y=apex_y + u(0.0, 0.06),
    clav_rise=u(0.06, 0.14),
    vessel_n=(float(rng.integers(16, 24)), float(rng.integers(27, 37))),
    vessel_phase=(u(0, 2 * np.pi), u(0, 2 * np.pi)),
    lung_air=(u(0.34, 0.42),) * 2,
    marking_gain=u(0.8, 1.2) * (1.1 if age > 60 else 1.0),
    breast=u(0.5, 1.0) if female and age >= 16 else 0.0,
    gastric_bubble=0.0,
  )


def vary_for_image(rng: np.random.Generator, anat: Anatomy, view: str) -> Anatomy:
  """Small per-image changes: inspiration depth, heart jitter, gas bubble; AP projection effects."""
  insp = rng.uniform(-0.03, 0.03)
  heart_scale = rng.uniform(0.98, 1.02)
  clav_y = anat.clav_y
  if view == 'AP':
    # Supine/portable AP: shallower inspiration, magnified heart, clavicles projected higher.
    insp -= rng.uniform(0.02, 0.05)
    heart_scale *= rng.uniform(1.03, 1.06)
    clav_y -= rng.uniform(0.03, 0.07)
  # Projection effects alone never make a normal heart cross CTR 0.5 (cardiomegaly's threshold).
  heart_scale = min(heart_scale, 0.495 / anat.cardiothoracic_ratio())
  return dataclasses.replace(
    anat,
    dia_y=(anat.dia_y[0] + insp, anat.dia_y[1] + insp),
    lung_base=anat.lung_base + insp,
    heart_cy=anat.heart_cy + 0.6 * insp,
    heart_a=anat.heart_a * heart_scale,
    heart_b=anat.heart_b * heart_scale,
    clav_y=clav_y,
    gastric_bubble=rng.uniform(0.06, 0.16) if rng.random() < 0.7 else 0.0,
  )


@dataclasses.dataclass
class Grid:
  """Canonical coordinates of the pixel centres of one S x S image.

  x, y: [S, S] float32 canonical coordinates; px: canonical length of one pixel.
  """

  x: np.ndarray
  y: np.ndarray
  px: float

  @property
  def size(self) -> int:
    return self.x.shape[0]

  def ramp(self, d: np.ndarray, width: float = 1.0) -> np.ndarray:
    """Soft inside-indicator of a signed distance d (> 0 inside), `width` pixels wide."""
    return np.clip(0.5 + d / (width * self.px), 0.0, 1.0)


def make_grid(size: int, affine: np.ndarray) -> Grid:
  """Grid for an image of `size` px; affine [2, 3] maps canonical -> image coords in [-1, 1]."""
  lin = affine[:, :2].astype(np.float64)
  inv = np.linalg.inv(lin)
  c = (np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0
  u = c[None, :] - np.float32(affine[0, 2])
  v = c[:, None] - np.float32(affine[1, 2])
  x = np.float32(inv[0, 0]) * u + np.float32(inv[0, 1]) * v
  y = np.float32(inv[1, 0]) * u + np.float32(inv[1, 1]) * v
  px = 2.0 / size / np.sqrt(abs(np.linalg.det(lin)))
  return Grid(x=x, y=y, px=float(px))


def superellipse_dist(x, y, cx, cy, rx, ry, p):
  """Approximate signed distance to a superellipse outline (> 0 inside); arrays or scalars."""
  f = np.abs((x - cx) / rx) ** p + np.abs((y - cy) / ry) ** p
  return (1.0 - f ** (1.0 / p)) * min(rx, ry)


def ellipse_dist(x, y, cx, cy, a, b, angle):
  """Approximate signed distance to a rotated ellipse (> 0 inside)."""
  c, s = np.cos(angle), np.sin(angle)
  dx, dy = x - cx, y - cy
  u = (dx * c + dy * s) / a
  v = (-dx * s + dy * c) / b
  return (1.0 - np.sqrt(u * u + v * v)) * min(a, b)


def diaphragm_y(anat: Anatomy, side: int, x):
  """Height of one hemidiaphragm at x (domed: highest over the lung centre)."""
  t = (np.abs(x) - anat.lung_cx) / anat.lung_rx
  return anat.dia_y[side] - anat.dome_h[side] * np.clip(1.0 - t * t, 0.0, 1.0)


def heart_dist(anat: Anatomy, x, y):
  return ellipse_dist(
    x, y, anat.heart_cx, anat.heart_cy, anat.heart_a, anat.heart_b, anat.heart_angle
  )


def lung_dist(anat: Anatomy, side: int, x, y, with_heart: bool = True):
  """Approximate signed distance to one lung field (> 0 inside); arrays or scalars.

  The lung is a superellipse cut by the hemidiaphragm (which makes the sharp costophrenic
  angle), by the mediastinum (wider at the aortic knob on the patient's left) and by the heart.
  """
  sign = SIDE_SIGN[side]
  d = superellipse_dist(
    x, y, sign * anat.lung_cx, anat.lung_cy(side), anat.lung_rx, anat.lung_ry(side), anat.lung_p
  )
  d = np.minimum(d, diaphragm_y(anat, side, x) - y)
  med = anat.med_w + (0.05 * np.exp(-(((y - anat.knob_y) / 0.07) ** 2)) if side == 1 else 0.015)
  d = np.minimum(d, sign * x - med)
  if with_heart:
    d = np.minimum(d, -heart_dist(anat, x, y))
  return d


def body_dist(anat: Anatomy, x, y):
  """Torso with sloping shoulders and a neck; the image background outside is air."""
  torso = superellipse_dist(x, y, 0.0, 0.25, anat.body_w, 1.3, 4.0)
  shoulder = y - (anat.apex_y - 0.22 + 0.22 * (x / anat.body_w) ** 2)
  neck = 0.2 - np.abs(x)
  return np.minimum(torso, np.maximum(shoulder, neck))


@dataclasses.dataclass
class Rendered:
  """Normal anatomy rendered on a grid (all [S, S] float32).

  density: attenuation without lung markings; markings: vessel markings to add (findings may
  suppress them); lungs: soft masks per side; heart: soft heart mask; r_hilum/theta_hilum: polar
  coordinates about the nearer hilum (mirrored), reused by findings.
  """

  density: np.ndarray
  markings: np.ndarray
  lungs: tuple[np.ndarray, np.ndarray]
  heart: np.ndarray
  r_hilum: np.ndarray
  theta_hilum: np.ndarray


def _ribs(g: Grid, anat: Anatomy, ax: np.ndarray) -> np.ndarray:
  """Posterior ribs (arched, dense) and anterior ribs (oblique, fainter), all via one phase map."""
  t = np.clip((ax - 0.06) / (anat.thorax_w - 0.06), 0.0, 1.1)
  rel = g.y - anat.rib_y0
  post = (rel - (-0.14 * t + 0.32 * t * t)) / anat.rib_spacing
  ant = (rel - 0.5 * anat.rib_spacing - (0.28 * (1.0 - t) + 0.04)) / anat.rib_spacing
  th = anat.rib_thick

  def bands(phase: np.ndarray, n: float) -> np.ndarray:
    frac = phase - np.floor(phase)
    # Flat-topped band with brighter cortical edges is approximated by a sqrt profile.
    band = np.sqrt(np.clip(1.0 - np.abs(frac - 0.5 * th) / (0.5 * th), 0.0, 1.0))
    return band * ((phase >= 0) & (phase < n))

  cage = g.ramp(anat.thorax_w + 0.03 - ax, 2.0) * g.ramp(ax - 0.05, 2.0)
  # Only the lowest ribs project over the upper abdomen, and they fade there.
  cage *= np.clip((anat.lung_base + 0.12 - g.y) / 0.2, 0.0, 1.0)
  ant_fade = np.clip((t - 0.3) * 3.0, 0.0, 1.0)
  return cage * (0.085 * bands(post, 10.0) + 0.04 * ant_fade * bands(ant, 7.0))


def _clavicles(g: Grid, anat: Anatomy, ax: np.ndarray) -> np.ndarray:
  x0, y0 = 0.06, anat.clav_y
  dx, dy = 0.5, -anat.clav_rise
  t = np.clip(((ax - x0) * dx + (g.y - y0) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
  ex = ax - (x0 + t * dx)
  ey = g.y - (y0 + t * dy) - 0.015 * np.sin(np.pi * t * 2.0)  # gentle S curve
  d = 0.022 - np.sqrt(ex * ex + ey * ey)
  return 0.16 * g.ramp(d, 1.5)


def render(g: Grid, anat: Anatomy) -> Rendered:
  """Normal chest on grid g. Densities: soft tissue ~0.5, bone +0.1..0.2, aerated lung -0.4."""
  x, y = g.x, g.y
  ax = np.abs(x)
  body = g.ramp(body_dist(anat, x, y), 2.0)
  # Thicker tissue in the middle of the torso transmits less (brighter centre).
  density = body * (0.42 + 0.1 * np.clip(1.0 - (x / anat.body_w) ** 2, 0.0, 1.0))
  lungs = (g.ramp(lung_dist(anat, 0, x, y)), g.ramp(lung_dist(anat, 1, x, y)))
  lung_any = lungs[0] + lungs[1]
  density -= anat.lung_air[0] * lungs[0] + anat.lung_air[1] * lungs[1]
  heart = g.ramp(heart_dist(anat, x, y))
  density += 0.04 * heart
  # Spine with vertebral bodies, and the air-filled trachea above the carina.
  spine = g.ramp(0.06 - ax, 1.5) * body
  density += spine * (0.12 + 0.05 * np.cos((y - anat.apex_y) * (2 * np.pi / 0.095)) ** 2)
  trachea = g.ramp(0.028 + 0.01 * (y - anat.apex_y) - ax, 1.5) * g.ramp(anat.hilum_y - 0.1 - y, 2)
  density -= 0.13 * trachea
  density += _ribs(g, anat, ax) * body
  density += _clavicles(g, anat, ax) * body
  if anat.breast > 0:
    bx, by = anat.lung_cx + 0.08, anat.lung_base - 0.12
    breast = g.ramp(superellipse_dist(ax, y, bx, by, 0.32, 0.22, 2.0), 3.0)
    density += 0.09 * anat.breast * breast
  if anat.gastric_bubble > 0:
    bubble = g.ramp(ellipse_dist(x, y, anat.lung_cx, anat.lung_base + 0.02, 0.08, 0.05, 0.0))
    density -= anat.gastric_bubble * bubble
  # Vessel markings radiate from the hila and fade towards the periphery.
  dx, dy = ax - anat.hilum_x, y - anat.hilum_y
  r = np.sqrt(dx * dx + dy * dy)
  theta = np.arctan2(dy, dx)
  n1, n2 = anat.vessel_n
  p1, p2 = anat.vessel_phase
  v1 = (0.5 + 0.5 * np.cos(n1 * theta + p1 + 7.0 * r)) ** 6
  v2 = (0.5 + 0.5 * np.cos(n2 * theta + p2 - 11.0 * r)) ** 8
  markings = (0.055 * (v1 + v2) * np.exp(-r / 0.4) + 0.1 * np.exp(-((r / 0.09) ** 2))) * lung_any
  markings *= anat.marking_gain
  return Rendered(
    density=density.astype(np.float32),
    markings=markings.astype(np.float32),
    lungs=lungs,
    heart=heart,
    r_hilum=r,
    theta_hilum=theta,
  )


def random_point_in_lung(
  rng: np.random.Generator,
  anat: Anatomy,
  side: int,
  y_range: tuple[float, float] = (0.0, 1.0),
  margin: float = 0.02,
  peripheral: float = 0.0,
) -> tuple[float, float]:
  """A point inside one lung (canonical), y_range as fractions from apex (0) to base (1).

  peripheral in [0, 1) keeps points in the outer part of the lung's width.
  """
  sign = SIDE_SIGN[side]
  top, base = anat.apex_y, anat.dia_y[side]
  for _ in range(8):
    ys = top + (base - top) * rng.uniform(*y_range, size=64)
    ts = rng.uniform(-1.0 + 2.0 * peripheral, 1.0, size=64)
    xs = sign * (anat.lung_cx + anat.lung_rx * ts)
    ok = lung_dist(anat, side, xs, ys) > margin
    if ok.any():
      i = int(np.argmax(ok))
      return float(xs[i]), float(ys[i])
  # Fallback: the lung centre (only reached for pathological parameter draws).
  return sign * anat.lung_cx, float(anat.lung_cy(side))
