"""Paper 002's alignment module (Kim, Jung, Lee, section 3.2): affine warp, smoothing, losses.

A ResNet-18 regresses five parameters (s_x, s_y, t_x, t_y, theta) per image; eq. 6 turns them
into the 2 x 3 matrix

  [[s_x cos(theta), -s_y sin(theta), t_x],
   [s_x sin(theta),  s_y cos(theta), t_y]]

which, as in spatial transformer networks (and torch's `F.affine_grid`), maps each OUTPUT
location in normalised coordinates [-1, 1] (x to the right, y down; pixel centres at
(2j + 1) / W - 1, i.e. `align_corners=False`) to the SOURCE location it samples. The warp
samples bilinearly with zero padding (`F.grid_sample(..., padding_mode='zeros',
align_corners=False)`), written here in JAX and differentiable in the matrix.

phi(I) = B(G(warp(I))) (eq. 6): G averages 16 x 16 cells (a 32 x 32 grid at 512 px), B restores
the size bilinearly. Our reading: the smoothing serves the alignment LOSS only (it makes the
warped image resemble the blurred anchor); the classifier sees the sharp warp.

Losses against the anchor A (the mean of N normal images), per image:
- eq. 8, Euclidean: sum over pixels of the per-pixel L2 norm over channels, ||A_ij - phi_ij||_2
  (not a mean of squares);
- eq. 7, perceptual: per layer s of a frozen network, ||F_s(A) - F_s(phi)||_2 / (C_s H_s W_s),
  summed over the layers (paper: conv2_x ... conv5_x of a ResNet-50).

The regressor starts at the identity transform (`identity_head`: zero kernel, bias
(1, 1, 0, 0, 0)); identity initialisation is our choice, the paper does not say.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PARAM_NAMES: tuple[str, ...] = ('s_x', 's_y', 't_x', 't_y', 'theta')
IDENTITY: tuple[float, ...] = (1.0, 1.0, 0.0, 0.0, 0.0)
# sqrt(x + EPS) in eq. 8: a finite gradient where a pixel matches the anchor exactly.
EPS = 1e-12


def affine_matrix(params: jax.Array) -> jax.Array:
  """Eq. 6: (s_x, s_y, t_x, t_y, theta) [..., 5] -> sampling matrices [..., 2, 3]."""
  sx, sy, tx, ty, th = (params[..., i] for i in range(5))
  c, s = jnp.cos(th), jnp.sin(th)
  row0 = jnp.stack([sx * c, -sy * s, tx], axis=-1)
  row1 = jnp.stack([sx * s, sy * c, ty], axis=-1)
  return jnp.stack([row0, row1], axis=-2)


def affine_matrix_np(params: np.ndarray) -> np.ndarray:
  """`affine_matrix` in numpy (host code: transforms tables, the input pipeline)."""
  p = np.asarray(params, np.float64)
  sx, sy, tx, ty, th = (p[..., i] for i in range(5))
  c, s = np.cos(th), np.sin(th)
  return np.stack([np.stack([sx * c, -sy * s, tx], -1), np.stack([sx * s, sy * c, ty], -1)], -2)


def invert_affine(matrix: np.ndarray) -> np.ndarray:
  """Inverse [..., 2, 3] of affine maps [..., 2, 3] (x' = M x + t  ->  x = M^-1 x' - M^-1 t)."""
  m = np.asarray(matrix, np.float64)
  lin_inv = np.linalg.inv(m[..., :2])
  return np.concatenate([lin_inv, -lin_inv @ m[..., 2:]], axis=-1)


def normalized_grid(height: int, width: int) -> jax.Array:
  """Output pixel centres in normalised coordinates [H, W, 3] as (x, y, 1)
  (`align_corners=False`: x_j = (2j + 1) / W - 1)."""
  xs = (2 * jnp.arange(width, dtype=jnp.float32) + 1) / width - 1
  ys = (2 * jnp.arange(height, dtype=jnp.float32) + 1) / height - 1
  gx, gy = jnp.meshgrid(xs, ys)
  return jnp.stack([gx, gy, jnp.ones_like(gx)], axis=-1)


def affine_grid(matrix: jax.Array, height: int, width: int) -> jax.Array:
  """Source locations [B, H, W, 2] (x, y normalised) that each output pixel samples, as
  `F.affine_grid(matrix, (B, C, H, W), align_corners=False)`."""
  grid = normalized_grid(height, width)
  return jnp.einsum('hwk,bjk->bhwj', grid, matrix.astype(jnp.float32))


def _sample_one(image: jax.Array, grid: jax.Array) -> jax.Array:
  """Bilinear sampling of image [H, W, C] at grid [H', W', 2] (x, y normalised), zeros
  outside."""
  h, w = image.shape[:2]
  # Normalised -> pixel index (align_corners=False): u = ((x + 1) W - 1) / 2.
  u = ((grid[..., 0] + 1) * w - 1) / 2
  v = ((grid[..., 1] + 1) * h - 1) / 2
  u0, v0 = jnp.floor(u), jnp.floor(v)
  fu, fv = u - u0, v - v0
  u0, v0 = u0.astype(jnp.int32), v0.astype(jnp.int32)
  out = 0.0
  for dv, wv in ((0, 1 - fv), (1, fv)):
    for du, wu in ((0, 1 - fu), (1, fu)):
      uu, vv = u0 + du, v0 + dv
      inside = (uu >= 0) & (uu < w) & (vv >= 0) & (vv < h)
      pixel = image[jnp.clip(vv, 0, h - 1), jnp.clip(uu, 0, w - 1)]
      out = out + (wu * wv * inside)[..., None] * pixel
  return out


def grid_sample(images: jax.Array, grid: jax.Array) -> jax.Array:
  """images [B, H, W, C] sampled at grid [B, H', W', 2] -> [B, H', W', C] (bilinear, zero
  padding, `align_corners=False`; torch's `F.grid_sample` defaults)."""
  return jax.vmap(_sample_one)(images, grid).astype(images.dtype)


def warp(images: jax.Array, matrix: jax.Array, fill: float = 0.0) -> jax.Array:
  """Affine warp of images [B, H, W, C] by sampling matrices [B, 2, 3] (eq. 6 without B(G(.))).

  `fill` is the value outside the source image: 0 for raw intensities, -1 for images in
  [-1, 1] (black), so that warping commutes with the intensity normalisation.
  """
  _, h, w, _ = images.shape
  shifted = images - fill
  return grid_sample(shifted, affine_grid(matrix, h, w)) + fill


def grid_pool(images: jax.Array, kernel: int) -> jax.Array:
  """G of eq. 6: average pooling with kernel = stride = `kernel`: [B, H, W, C] -> [B, H/k,
  W/k, C]."""
  b, h, w, c = images.shape
  if h % kernel or w % kernel:
    raise ValueError(f'alignment smoothing kernel {kernel} does not divide the image size '
                     f'{h} x {w} (config.align.smooth_kernel)')
  return images.reshape(b, h // kernel, kernel, w // kernel, kernel, c).mean(axis=(2, 4))


def bilinear_restore(images: jax.Array, height: int, width: int) -> jax.Array:
  """B of eq. 6: bilinear resize back to [B, height, width, C] (half-pixel centres, edges
  clamped: torch's `F.interpolate(mode='bilinear', align_corners=False)` when upsampling)."""
  b, _, _, c = images.shape
  return jax.image.resize(images, (b, height, width, c), method='bilinear', antialias=False)


def smooth(images: jax.Array, kernel: int) -> jax.Array:
  """B(G(images)): the blur that makes a warped image comparable with the blurred anchor.
  kernel <= 1 is the identity."""
  if kernel <= 1:
    return images
  _, h, w, _ = images.shape
  return bilinear_restore(grid_pool(images, kernel), h, w)


def euclidean_loss(anchor: jax.Array, images: jax.Array, reduction: str = 'sum') -> jax.Array:
  """Eq. 8 per image: sum over pixels of ||A_ij - phi_ij||_2 (L2 over channels).

  anchor [H, W, C] (or [B, H, W, C]), images [B, H, W, C] -> [B]. reduction 'mean' divides by
  the number of pixels (the same minimiser, a learning-rate-sized difference).
  """
  diff = images.astype(jnp.float32) - anchor.astype(jnp.float32)
  per_pixel = jnp.sqrt(jnp.sum(diff * diff, axis=-1) + EPS)
  total = jnp.sum(per_pixel, axis=(1, 2))
  if reduction == 'mean':
    return total / (images.shape[1] * images.shape[2])
  if reduction != 'sum':
    raise ValueError(f"euclidean reduction {reduction!r}; valid: 'sum', 'mean'")
  return total


def perceptual_loss(anchor_features: Sequence[jax.Array], features: Sequence[jax.Array]
                    ) -> jax.Array:
  """Eq. 7 per image: sum over layers s of ||F_s(A) - F_s(phi)||_2 / (C_s H_s W_s).

  anchor_features: per layer [1, h, w, c] (or [B, ...]); features: per layer [B, h, w, c].
  Returns [B].
  """
  total = 0.0
  for fa, fx in zip(anchor_features, features, strict=True):
    diff = (fx.astype(jnp.float32) - fa.astype(jnp.float32)).reshape(fx.shape[0], -1)
    total = total + jnp.sqrt(jnp.sum(diff * diff, axis=-1) + EPS) / diff.shape[-1]
  return total


def layer_features(intermediates: Mapping[str, Any], layers: Sequence[str]) -> list[jax.Array]:
  """The maps sown under `layers` (e.g. 'conv2_x' ... 'conv5_x') by a ResNet's apply."""
  out = []
  for name in layers:
    if name not in intermediates:
      raise ValueError(f'the perceptual loss network sowed no {name!r}; it has '
                       f'{sorted(intermediates)} (config.align.perceptual_layers)')
    out.append(intermediates[name][0])
  return out


def identity_head(params: dict[str, Any], head: str = 'fc') -> dict[str, Any]:
  """`params` with the regressor's last dense layer set to output the identity transform for
  every input: kernel 0, bias (1, 1, 0, 0, 0)."""
  fc = params[head]
  if fc['bias'].shape != (len(PARAM_NAMES),):
    raise ValueError(f'the alignment regressor must output {len(PARAM_NAMES)} values '
                     f'{PARAM_NAMES}, its {head!r} outputs {fc["bias"].shape}')
  new_fc = {'kernel': jnp.zeros_like(fc['kernel']),
            'bias': jnp.asarray(IDENTITY, fc['bias'].dtype)}
  return {**params, head: new_fc}


def degenerate(params: np.ndarray, min_scale: float, max_scale: float) -> str | None:
  """Why a batch of transform parameters [B, 5] is degenerate (a non-finite value, |s| below
  `min_scale` or above `max_scale`), or None."""
  p = np.asarray(params, np.float64)
  if not np.all(np.isfinite(p)):
    return 'non-finite transform parameters (NaN or inf)'
  scales = np.abs(p[:, :2])
  if scales.min() < min_scale:
    return f'scale {scales.min():.3g} < config.align.min_scale={min_scale} (collapsing image)'
  if scales.max() > max_scale:
    return f'scale {scales.max():.3g} > config.align.max_scale={max_scale}'
  return None
