"""Paper 003's visualisations: learned filters, class visualisation by activation maximisation,
activation grids and the strongest channel's heat map over the X-ray.

The paper (built in Matlab R2017a) shows
- Fig. 2: the filters of conv1 (custom CNN, AlexNet) / conv1_2 (VGG16/19) and of conv3 /
  conv3_3 / conv3_4 as image grids, and a class visualisation of the last FC layer (FC3);
- Fig. 3: the post-ReLU activations of the last convolution (conv5 / conv5_3 / conv5_4), each
  channel scaled to [0, 1], as a grid, and the channel with the strongest activation on the
  abnormality;
- Fig. 4: that channel upsampled to the X-ray, in the 'jet' colour map on [0, 1] with discrete
  colour steps and a threshold above which it is saturated red, its zero pixels fully
  transparent, over the X-ray.

Readings (the paper gives no parameters):
- Filters whose input has 1 or 3 channels (conv1 of the custom CNN and AlexNet) are shown as
  their weights (RGB, each filter min-max scaled). Deeper filters cannot be shown as weights;
  Matlab's way, `deepDreamImage`, synthesises an image that maximises the channel's mean
  activation, and so does `maximize_activation` here (gradient ascent from a grey image with a
  little noise, the gradient normalised by its mean absolute value as deepDreamImage does, a
  light blur every few steps to keep high frequencies down; single scale at the model's input
  size). The FC3 class visualisation maximises each class's logit the same way.
- The strongest channel: the largest mean activation over the map, or inside a region (the
  lung ROI) when one is given; `strongest_channel` (the paper picks it by eye on the
  abnormality; a user can choose the channel).
- Heat map: the channel min-max scaled to [0, 1], bilinear upsampling, `steps`
  discrete jet colours on [0, threshold], values >= threshold the top (red) colour, exact zeros
  transparent, others drawn with `alpha` over the grey X-ray. Defaults: threshold 0.6, 8 steps,
  alpha 0.6 (ours).

Pure numpy / JAX / matplotlib: models are passed in as functions; cxr_jax/inference/ wires
trained runs to these.
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from cxr_jax import xla_options

DEFAULT_THRESHOLD = 0.6
DEFAULT_STEPS = 8
DEFAULT_ALPHA = 0.6


def scale01(x: np.ndarray, axis: tuple[int, ...] | None = None) -> np.ndarray:
  """Min-max scaling to [0, 1] over `axis` (None: all); constant inputs give 0."""
  x = np.asarray(x, np.float32)
  lo, hi = x.min(axis=axis, keepdims=True), x.max(axis=axis, keepdims=True)
  return np.where(hi > lo, (x - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0).astype(np.float32)


def tile(images: np.ndarray, ncols: int | None = None, pad: int = 1, fill: float = 1.0
         ) -> np.ndarray:
  """[N, h, w] or [N, h, w, 3] -> one grid image [rows*(h+pad)-pad, cols*(w+pad)-pad(, 3)],
  row-major, gaps filled with `fill` (white)."""
  images = np.asarray(images, np.float32)
  n, h, w = images.shape[:3]
  ncols = ncols or int(np.ceil(np.sqrt(n)))
  nrows = int(np.ceil(n / ncols))
  grid = np.full((nrows * (h + pad) - pad, ncols * (w + pad) - pad, *images.shape[3:]), fill,
                 np.float32)
  for i in range(n):
    r, c = divmod(i, ncols)
    grid[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = images[i]
  return grid


def filter_images(kernel: np.ndarray) -> np.ndarray:
  """Conv kernel [kh, kw, C_in, C_out] (C_in 1 or 3) -> [C_out, kh, kw(, 3)], each filter
  min-max scaled to [0, 1]."""
  kernel = np.asarray(kernel, np.float32)
  if kernel.ndim != 4 or kernel.shape[2] not in (1, 3):
    raise ValueError(f'filters are shown as images only for 1 or 3 input channels; kernel '
                     f'shape {kernel.shape}')
  images = np.moveaxis(kernel, 3, 0)  # [C_out, kh, kw, C_in]
  images = scale01(images, axis=(1, 2, 3))
  return images[..., 0] if images.shape[-1] == 1 else images


def activation_grid(acts: np.ndarray, channels: Sequence[int] | None = None,
                    ncols: int | None = None) -> np.ndarray:
  """Post-ReLU activations [h, w, C] -> grid of the `channels` (default all), each scaled to
  [0, 1] on its own (Fig. 3)."""
  acts = np.asarray(acts, np.float32)
  if acts.ndim != 3:
    raise ValueError(f'activations must be [h, w, C], got {acts.shape}')
  chosen = list(range(acts.shape[-1])) if channels is None else list(channels)
  maps = np.moveaxis(acts[..., chosen], -1, 0)
  return tile(scale01(maps, axis=(1, 2)), ncols=ncols)


def strongest_channel(acts: np.ndarray, roi: np.ndarray | None = None) -> int:
  """Index of the channel of [h, w, C] with the largest mean activation, inside `roi` (bool
  [H, W] at any resolution, resized to [h, w] by nearest neighbour) when given."""
  acts = np.asarray(acts, np.float32)
  if roi is None:
    return int(np.argmax(acts.mean(axis=(0, 1))))
  roi = np.asarray(roi, bool)
  h, w = acts.shape[:2]
  rows = (np.arange(h) * roi.shape[0] // h)
  cols = (np.arange(w) * roi.shape[1] // w)
  small = roi[rows][:, cols]
  if not small.any():
    raise ValueError('the region of interest is empty at the activation map resolution')
  return int(np.argmax(acts[small].mean(axis=0)))


def upsample(act: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """[h, w] -> [H, W] bilinear (align_corners=False, as image resizers)."""
  out = jax.image.resize(jnp.asarray(act, jnp.float32), shape, method='bilinear')
  return np.maximum(np.asarray(out), 0.0)


def jet_rgba(act: np.ndarray, shape: tuple[int, int], *, threshold: float = DEFAULT_THRESHOLD,
             steps: int = DEFAULT_STEPS, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
  """One channel [h, w] (post-ReLU) -> RGBA [H, W, 4] float in [0, 1] (Fig. 4's heat map).

  Scaled to [0, 1] (min-max, as Fig. 3's maps), upsampled, quantised to `steps` jet colours
  on [0, threshold) with everything >= threshold the top (red) colour; pixels whose value is
  0 (black in the grey map) get alpha 0 (transparent), the others `alpha`.
  """
  if not 0.0 < threshold <= 1.0:
    raise ValueError(f'threshold must be in (0, 1], got {threshold}')
  if steps < 2:
    raise ValueError(f'steps must be >= 2, got {steps}')
  unit = scale01(np.maximum(np.asarray(act, np.float32), 0.0))
  big = upsample(unit, shape)
  level = np.minimum(np.floor(big / threshold * (steps - 1) + 1e-6), steps - 1)
  colours = colormaps['jet'](np.linspace(0.0, 1.0, steps))  # [steps, 4]
  rgba = colours[level.astype(np.int64)].astype(np.float32)
  rgba[..., 3] = np.where(big > 1e-6, alpha, 0.0)
  return rgba


def overlay(image: np.ndarray, act: np.ndarray, **kwargs) -> np.ndarray:
  """Grey X-ray [H, W] in [0, 1] and one channel [h, w] -> RGB [H, W, 3] with the heat map
  (`jet_rgba`) alpha-blended over it."""
  image = np.asarray(image, np.float32)
  rgba = jet_rgba(act, image.shape[:2], **kwargs)
  grey = np.repeat(np.clip(image, 0.0, 1.0)[..., None], 3, axis=-1)
  a = rgba[..., 3:]
  return grey * (1.0 - a) + rgba[..., :3] * a


def _blur(x: jax.Array) -> jax.Array:
  """3 x 3 binomial blur of [N, H, W, C] per channel (edge padding)."""
  k = jnp.array([1.0, 2.0, 1.0]) / 4.0
  kernel = (k[:, None] * k[None, :])[:, :, None, None]
  c = x.shape[-1]
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='edge')
  return jax.lax.conv_general_dilated(
      padded, jnp.tile(kernel, (1, 1, 1, c)), (1, 1), 'VALID',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=c)


def maximize_activation(fn: Callable[[jax.Array], jax.Array], channels: Sequence[int],
                        image_shape: Sequence[int], *, steps: int = 30, step_size: float = 0.1,
                        blur_every: int = 4, noise: float = 0.1, key: jax.Array | None = None
                        ) -> np.ndarray:
  """Images [len(channels), H, W, C] that maximise each channel's mean activation.

  fn: images [N, H, W, C] -> activations [N, h, w, K] or [N, K] (a layer, or the logits for a
  class visualisation); image n maximises channel channels[n]. Gradient ascent from grey + a
  little Gaussian noise, each step x += step_size * g / mean|g| (Matlab's deepDreamImage
  normalisation), a 3 x 3 blur every `blur_every` steps, values kept in [-3, 3] (a few stds of
  a normalised input). All channels run in one batch.
  """
  channels = np.asarray(list(channels), np.int32)
  n = len(channels)
  key = jax.random.key(0) if key is None else key
  x = noise * jax.random.normal(key, (n, *image_shape), jnp.float32)

  def objective(x):
    act = fn(x)
    picked = jnp.take_along_axis(act.reshape(n, -1, act.shape[-1]),
                                 jnp.asarray(channels)[:, None, None], axis=-1)
    return jnp.sum(jnp.mean(picked, axis=(1, 2)))

  @xla_options.jit
  def step(x, i):
    g = jax.grad(objective)(x)
    g = g / (jnp.mean(jnp.abs(g), axis=(1, 2, 3), keepdims=True) + 1e-8)
    x = jnp.clip(x + step_size * g, -3.0, 3.0)
    return jnp.where((i + 1) % blur_every == 0, _blur(x), x)

  for i in range(steps):
    x = step(x, i)
  return np.asarray(x)


def synthesized_images(x: np.ndarray) -> np.ndarray:
  """Activation-maximisation results [N, H, W, C] -> displayable [N, H, W(, 3)] in [0, 1]."""
  x = scale01(np.asarray(x, np.float32), axis=(1, 2, 3))
  return x[..., 0] if x.shape[-1] == 1 else x


# ------------------------------------------------------------------------------ figures
Panel = tuple[str, np.ndarray]  # (title, image [H, W] grey or [H, W, 3] RGB, values in [0, 1])


def figure(rows: Sequence[Sequence[Panel]], *, row_labels: Sequence[str] = (),
           suptitle: str = '', panel_inches: float = 2.6, dpi: int = 110) -> Figure:
  """A grid of image panels: one row per model (as the paper's figures), one column per
  panel; grey panels drawn with the 'gray' colour map on [0, 1]."""
  nrows = len(rows)
  ncols = max(len(r) for r in rows)
  fig = Figure(figsize=(panel_inches * ncols, panel_inches * nrows + (0.4 if suptitle else 0)),
               dpi=dpi)
  axes = fig.subplots(nrows, ncols, squeeze=False)
  for r, row in enumerate(rows):
    for c in range(ncols):
      ax = axes[r][c]
      ax.axis('off')
      if c >= len(row):
        continue
      title, img = row[c]
      ax.imshow(img, cmap='gray' if img.ndim == 2 else None, vmin=0.0, vmax=1.0,
                interpolation='nearest')
      ax.set_title(title, fontsize=8)
    if r < len(row_labels):
      axes[r][0].text(-0.08, 0.5, row_labels[r], transform=axes[r][0].transAxes, rotation=90,
                      va='center', ha='right', fontsize=9)
  if suptitle:
    fig.suptitle(suptitle, fontsize=10)
  fig.tight_layout()
  return fig


def png_bytes(fig: Figure) -> bytes:
  import io
  buf = io.BytesIO()
  fig.savefig(buf, format='png')
  return buf.getvalue()
