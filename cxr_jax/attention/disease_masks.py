"""Paper 002's disease masks (Kim, Jung, Lee, section 3.1): generation (eq. 1-3), the DM
attention head (eq. 4-5) and pseudo-disease masks drawn from regions (section 4.4).

Generation, per class c, from the class activation maps S_c(x) (eq. 1) of a trained classifier
on the (aligned) training images, in the order of eq. 3:
1. keep the images x with P_c(x) >= 0.8 (eq. 2; our reading: among the images labelled c);
2. L̄ = H(L) + L (horizontal flip added) unless c is asymmetric (cardiomegaly), else L̄ = L;
3. N(.): each L̄ min-max normalised to [0, 1];
4. the mean over the N_c kept images;
5. T(.): the threshold; `binarize` gives psi = [mean >= T], otherwise psi = mean * [mean >= T]
   (the soft mask keeps the "spatial probability of disease occurrence" above T).

DM attention (eq. 4-5), per class (eq. 4 has no class index; per class is our reading):
f'_c = psi_c * f + f, so class c's logit is GAP(f'_c) . w_c + b_c and its CAM is
S^_c = sum_k w_k^c f'_k = (1 + psi_c) S_c. psi_c is fixed (not trained), given at the feature
map's resolution (resized from P x P by area averaging, `area_resize`); a class without a mask
has psi_c = 0, i.e. f' = f.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw


# ------------------------------------------------------------------------------ eq. 3
def flip_sum(maps: np.ndarray) -> np.ndarray:
  """L̄ = H(L) + L for maps [..., H, W] (H: horizontal flip)."""
  return maps + maps[..., ::-1]


def normalize01(maps: np.ndarray) -> np.ndarray:
  """N(.): each map [N, H, W] min-max scaled to [0, 1]; a constant map becomes zeros."""
  maps = np.asarray(maps, np.float64)
  lo = maps.min(axis=(-2, -1), keepdims=True)
  span = maps.max(axis=(-2, -1), keepdims=True) - lo
  return np.where(span > 0, (maps - lo) / np.where(span > 0, span, 1.0), 0.0)


def prepare_maps(cams: np.ndarray, symmetric: bool) -> np.ndarray:
  """Steps 2-3 of eq. 3 for one class: cams [N, P, P] -> N(L̄) [N, P, P]."""
  cams = np.asarray(cams, np.float64)
  return normalize01(flip_sum(cams) if symmetric else cams)


def threshold_mask(mean: np.ndarray, threshold: float, binarize: bool) -> np.ndarray:
  """Step 5, T(.): [P, P] mean map -> psi in [0, 1]."""
  keep = mean >= threshold
  return keep.astype(np.float32) if binarize else (mean * keep).astype(np.float32)


def disease_mask(cams: np.ndarray, *, symmetric: bool, threshold: float, binarize: bool
                 ) -> np.ndarray:
  """Eq. 3 for one class: the CAMs [N_c, P, P] of its kept images -> psi_c [P, P]."""
  if len(cams) == 0:
    raise ValueError('disease_mask needs at least one activation map')
  return threshold_mask(prepare_maps(cams, symmetric).mean(axis=0), threshold, binarize)


class MaskAccumulator:
  """Running sums of N(L̄) per class over batches (eq. 3 without holding every map)."""

  def __init__(self, num_classes: int, size: tuple[int, int], symmetric: Sequence[bool]):
    self.sums = np.zeros((num_classes, *size), np.float64)
    self.counts = np.zeros((num_classes,), np.int64)
    self.symmetric = list(symmetric)

  def add(self, k: int, cams: np.ndarray) -> None:
    """cams [n, P, P] of kept images of class k."""
    if len(cams):
      self.sums[k] += prepare_maps(cams, self.symmetric[k]).sum(axis=0)
      self.counts[k] += len(cams)

  def masks(self, threshold: float, binarize: bool) -> np.ndarray:
    """psi [K, P, P]; zeros for a class without images."""
    out = np.zeros(self.sums.shape, np.float32)
    for k in np.flatnonzero(self.counts):
      out[k] = threshold_mask(self.sums[k] / self.counts[k], threshold, binarize)
    return out


# ------------------------------------------------------------------------------ resizing
def area_resize(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Masks [K, P, P] -> [K, p, p] by area averaging (each output cell is the mean of the
  input area it covers; PIL's BOX filter, exact block means when p divides P)."""
  out = []
  for m in np.asarray(masks, np.float32):
    img = Image.fromarray(m, mode='F').resize((size[1], size[0]), Image.Resampling.BOX)
    out.append(np.asarray(img, np.float32))
  return np.stack(out) if out else np.zeros((0, *size), np.float32)


# ------------------------------------------------------------------------------ pseudo masks
def render_shape(shape: Sequence[Any], size: tuple[int, int]) -> np.ndarray:
  """One region -> binary [H, W]. shape: ('rect', x0, y0, x1, y1) or ('polygon', x0, y0, x1,
  y1, ...) in normalised coordinates [0, 1] of the anchor (x right, y down)."""
  if not shape or shape[0] not in ('rect', 'polygon'):
    raise ValueError(f"a region is ('rect', x0, y0, x1, y1) or ('polygon', x0, y0, ...), got "
                     f'{shape!r}')
  h, w = size
  coords = [float(v) for v in shape[1:]]
  if len(coords) % 2 or (shape[0] == 'rect' and len(coords) != 4) or (
      shape[0] == 'polygon' and len(coords) < 6):
    raise ValueError(f'region {shape!r}: wrong number of coordinates')
  if any(not 0.0 <= v <= 1.0 for v in coords):
    raise ValueError(f'region {shape!r}: coordinates must be normalised to [0, 1]')
  canvas = Image.new('L', (w, h), 0)
  draw = ImageDraw.Draw(canvas)
  points = [(coords[i] * w, coords[i + 1] * h) for i in range(0, len(coords), 2)]
  if shape[0] == 'rect':
    draw.rectangle([points[0], (points[1][0] - 1, points[1][1] - 1)], fill=1)
  else:
    draw.polygon(points, fill=1)
  return np.asarray(canvas, np.float32)


def render_pseudo_masks(regions: Mapping[str, Sequence[str]],
                        shapes: Mapping[str, Sequence[Any]], classes: Sequence[str],
                        size: tuple[int, int]) -> np.ndarray:
  """Pseudo-disease masks [K, H, W] (1 inside a class's regions, 0 outside; paper 002 Fig.
  7): `regions` maps a class to names of `shapes`; classes not in it get zeros."""
  unknown = [c for c in regions if c not in classes]
  if unknown:
    raise ValueError(f'config.pdm.regions: classes {unknown} are not among the classes '
                     f'{list(classes)}')
  out = np.zeros((len(classes), *size), np.float32)
  for c, names in regions.items():
    for name in names:
      if name not in shapes:
        raise ValueError(f'config.pdm.regions.{c}: no shape {name!r} in config.pdm.shapes '
                         f'({sorted(shapes)})')
      out[classes.index(c)] = np.maximum(out[classes.index(c)], render_shape(shapes[name], size))
  return out


# ------------------------------------------------------------------------------ eq. 4-5
def check_masks(masks: Any, feature_shape: Sequence[int], num_classes: int) -> jax.Array:
  """The head's psi as an array [h, w, K] matching features [.., h, w, C]."""
  psi = jnp.asarray(np.asarray(masks, np.float32))
  want = (feature_shape[-3], feature_shape[-2], num_classes)
  if psi.shape != want:
    raise ValueError(f'disease masks of shape {psi.shape}, the head needs {want} ([h, w, K] at '
                     'the feature map; the train_dm stage resizes them)')
  return psi


def score_maps(features: jax.Array, psi: jax.Array, kernel: jax.Array, bias: jax.Array
               ) -> jax.Array:
  """Eq. 5 (+ bias): S^_c = (1 + psi_c) (f . w_c) + b_c, [B, h, w, C] -> [B, h, w, K]; their
  spatial mean is the logits of eq. 4's f'."""
  return (1.0 + psi.astype(features.dtype)) * (features @ kernel) + bias


class DiseaseMaskHead(nn.Module):
  """GAP + dense on f'_c = psi_c f + f, per class (eq. 4). Named like a dense layer's `fc`
  (kernel [C, K], bias [K], the same initialisers) so a classifier's weights load unchanged.

  Attributes:
    num_classes: K.
    masks: psi [h, w, K] at the feature map's resolution (nested sequences or an array).
    dtype: compute dtype.
  """

  num_classes: int
  masks: Any = ()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (features.shape[-1], self.num_classes))
    bias = self.param('bias', nn.initializers.zeros, (self.num_classes,))
    psi = check_masks(self.masks, features.shape, self.num_classes)
    maps = score_maps(features.astype(self.dtype), psi, kernel.astype(self.dtype),
                      bias.astype(self.dtype))
    return jnp.mean(maps, axis=(1, 2))


def head_fns(dtype: Any, variables: dict, masks: Any, head: str = 'fc'
             ) -> tuple[Callable[[jax.Array], jax.Array], Callable[[jax.Array], jax.Array]]:
  """(head_fn: features [N, h, w, C] -> logits [N, K], score_map_fn: -> S^ [N, h, w, K]) of
  a DM head, for Grad-CAM / PDA and CAM."""
  kernel = variables['params'][head]['kernel']
  bias = variables['params'][head]['bias']
  out_dtype = jnp.promote_types(dtype, jnp.float32)

  def score_map(features: jax.Array) -> jax.Array:
    psi = check_masks(masks, features.shape, kernel.shape[-1])
    return score_maps(features.astype(dtype), psi, kernel.astype(dtype),
                      bias.astype(dtype)).astype(out_dtype)

  return (lambda f: jnp.mean(score_map(f), axis=(1, 2))), score_map
