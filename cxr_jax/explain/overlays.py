"""Heat maps over the X-ray, drawn as in paper 000's Fig. 2/3.

The grey X-ray, a jet colour map with transparency over it, a colour bar ("contribution to the
decision"), the findings the network detected written on top, the experts' boxes in red
when they are known and the boxes predicted from the heat map in black (paper 002's Fig. 6);
one panel per class (`overlay_heatmap`) or a grid of panels for several classes or both models
(`overlay_grid`).

Heat maps of another size than the image (feature-level PDA [h, w], attention [h, w]) are
upsampled bilinearly with pixel centres aligned (each heat-map cell covers a block of the
image), so a feature cell's value sits over the image block it summarises.

Colour scale: a map holding both signs (PDA weight of evidence: for / against a class) is
drawn on a range symmetric about zero, so zero is the same colour (jet's green) in every
panel; a non-negative map (attention weights) on [0, max]. Figures are built with
`matplotlib.figure.Figure` on the Agg canvas (no pyplot, no global state, thread-safe) and
written atomically.
"""

import dataclasses
import io
import os
from collections.abc import Sequence

import numpy as np
from matplotlib import patches
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import ndimage

from cxr_jax.io_utils import atomic_write_bytes

Box = tuple[float, float, float, float]  # x, y, w, h in pixels of the image drawn
Finding = tuple[str, float]  # class name, probability

COLORBAR_LABEL = 'contribution to the decision'


@dataclasses.dataclass(frozen=True)
class Panel:
  """One heat map of a grid. `image` overrides the grid's image (e.g. for several X-rays)."""
  heat: np.ndarray  # [h, w]
  title: str = ''
  findings: Sequence[Finding] | None = None
  boxes: Sequence[Box] = ()  # ground truth, red
  image: np.ndarray | None = None  # [H, W] in [0, 1]
  value_range: tuple[float, float] | None = None
  colorbar_label: str = COLORBAR_LABEL
  pred_boxes: Sequence[Box] = ()  # predicted from the heat map, black


def upsample(heat: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of heat [h, w] to `shape` (H, W), pixel centres aligned, edges clamped.

  Output pixel i samples the input at (i + 0.5) * h / H - 0.5 (the half-pixel convention of
  jax.image.resize / TF's `half_pixel_centers`), so upsampling by an integer factor f
  reproduces each cell's value over the centre of its f x f block.
  """
  heat = np.asarray(heat, np.float64)
  if heat.ndim != 2:
    raise ValueError(f'heat map must be [h, w], got shape {heat.shape}')
  if heat.shape == tuple(shape):
    return heat
  (h, w), (out_h, out_w) = heat.shape, shape
  ys = (np.arange(out_h) + 0.5) * (h / out_h) - 0.5
  xs = (np.arange(out_w) + 0.5) * (w / out_w) - 0.5
  yy, xx = np.meshgrid(ys, xs, indexing='ij')
  return ndimage.map_coordinates(heat, [yy, xx], order=1, mode='nearest')


def value_range(heat: np.ndarray) -> tuple[float, float]:
  """Colour range: symmetric about 0 for signed maps, [0, max] for non-negative ones."""
  heat = np.asarray(heat, np.float64)
  finite = heat[np.isfinite(heat)]
  if finite.size == 0:
    return 0.0, 1.0
  lo, hi = float(finite.min()), float(finite.max())
  if lo < 0:
    m = max(abs(lo), abs(hi)) or 1.0
    return -m, m
  return 0.0, hi if hi > 0 else 1.0


def findings_text(findings: Sequence[Finding] | None) -> str:
  """'Detected: Mass (0.81), Nodule (0.62)' or 'Detected: no finding'; '' when unknown."""
  if findings is None:
    return ''
  if not findings:
    return 'Detected: no finding'
  return 'Detected: ' + ', '.join(f'{name} ({prob:.2f})' for name, prob in findings)


def draw_panel(fig: Figure, ax, image: np.ndarray, heat: np.ndarray, *, title: str = '',
               findings: Sequence[Finding] | None = None, boxes: Sequence[Box] = (),
               colorbar: bool = True, alpha: float = 0.45,
               vrange: tuple[float, float] | None = None,
               colorbar_label: str = COLORBAR_LABEL,
               pred_boxes: Sequence[Box] = ()) -> None:
  """Draws image [H, W] in [0, 1] with heat [h, w] over it on `ax` (see module doc).

  boxes (ground truth, red) and pred_boxes (black) are (x, y, w, h) in image pixels.
  """
  image = np.asarray(image, np.float32)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim != 2:
    raise ValueError(f'image must be [H, W] grey, got shape {image.shape}')
  up = upsample(heat, image.shape)
  lo, hi = vrange if vrange is not None else value_range(up)
  ax.imshow(image, cmap='gray', vmin=0.0, vmax=1.0, interpolation='antialiased')
  mappable = ax.imshow(up, cmap='jet', alpha=alpha, vmin=lo, vmax=hi,
                       interpolation='antialiased')
  for box_list, color in ((boxes, 'red'), (pred_boxes, 'black')):
    for box in box_list:
      x, y, w, h = (float(v) for v in box[:4])
      ax.add_patch(patches.Rectangle((x, y), w, h, fill=False, edgecolor=color, linewidth=2))
  text = findings_text(findings)
  if text:
    ax.text(0.5, 0.985, text, transform=ax.transAxes, ha='center', va='top', fontsize=8,
            color='white', wrap=True,
            bbox={'facecolor': 'black', 'alpha': 0.6, 'edgecolor': 'none', 'pad': 2})
  if title:
    ax.set_title(title, fontsize=10)
  ax.set_axis_off()
  if colorbar:
    cbar = fig.colorbar(mappable, ax=ax, fraction=0.046, pad=0.02)
    # The bar shows the colours at full strength; the overlay blends them with the X-ray.
    cbar.solids.set_alpha(1.0)
    cbar.set_label(colorbar_label, fontsize=8)
    cbar.ax.tick_params(labelsize=7)


def overlay_heatmap(image: np.ndarray, heat: np.ndarray, *, title: str = '',
                    findings: Sequence[Finding] | None = None, boxes: Sequence[Box] = (),
                    colorbar: bool = True, out_path: str | os.PathLike | None = None,
                    alpha: float = 0.45, vrange: tuple[float, float] | None = None,
                    colorbar_label: str = COLORBAR_LABEL, size_inches: float = 5.0,
                    dpi: int = 120, pred_boxes: Sequence[Box] = ()) -> Figure:
  """One heat map over one X-ray; writes a PNG to `out_path` (atomically) when given.

  image: [H, W] grey in [0, 1]; heat: [h, w] (upsampled to [H, W]); findings: the detected
  classes as (name, probability), written on top (None: no text); boxes: (x, y, w, h) in
  image pixels, drawn in red; pred_boxes: boxes predicted from the heat map, the same frame,
  drawn in black; vrange: colour range (default: see `value_range`).
  """
  fig = _figure(1, 1, image.shape, size_inches, dpi, colorbar)
  ax = fig.add_subplot(1, 1, 1)
  draw_panel(fig, ax, image, heat, title=title, findings=findings, boxes=boxes,
             colorbar=colorbar, alpha=alpha, vrange=vrange, colorbar_label=colorbar_label,
             pred_boxes=pred_boxes)
  if out_path is not None:
    save_png(fig, out_path)
  return fig


def overlay_grid(image: np.ndarray | None, panels: Sequence[Panel], *, ncols: int = 4,
                 suptitle: str = '', out_path: str | os.PathLike | None = None,
                 alpha: float = 0.45, shared_range: bool = False, size_inches: float = 3.6,
                 dpi: int = 110) -> Figure:
  """A grid of panels (several classes, steps or models; rows filled left to right).

  image: [H, W] used by every panel without its own `image`. shared_range: one colour range
  for all panels (compare magnitudes across classes/models) instead of one per panel.
  """
  if not panels:
    raise ValueError('overlay_grid needs at least one panel')
  images = [p.image if p.image is not None else image for p in panels]
  if any(im is None for im in images):
    raise ValueError('every panel needs an image: pass `image` or set Panel.image')
  ncols = max(1, min(ncols, len(panels)))
  nrows = -(-len(panels) // ncols)
  common = None
  if shared_range:
    common = value_range(np.concatenate([np.ravel(p.heat) for p in panels]))
  fig = _figure(nrows, ncols, np.shape(images[0])[:2], size_inches, dpi, True)
  for i, (panel, im) in enumerate(zip(panels, images, strict=True)):
    ax = fig.add_subplot(nrows, ncols, i + 1)
    draw_panel(fig, ax, im, panel.heat, title=panel.title, findings=panel.findings,
               boxes=panel.boxes, alpha=alpha, vrange=panel.value_range or common,
               colorbar_label=panel.colorbar_label, pred_boxes=panel.pred_boxes)
  if suptitle:
    fig.suptitle(suptitle, fontsize=11)
  if out_path is not None:
    save_png(fig, out_path)
  return fig


def _figure(nrows: int, ncols: int, image_shape: Sequence[int], size_inches: float, dpi: int,
            colorbar: bool) -> Figure:
  h, w = image_shape[:2]
  panel_w = size_inches * (1.25 if colorbar else 1.0)
  panel_h = size_inches * h / w + 0.5  # room for the title
  fig = Figure(figsize=(panel_w * ncols, panel_h * nrows), dpi=dpi, layout='constrained')
  FigureCanvasAgg(fig)
  return fig


def png_bytes(fig: Figure) -> bytes:
  buf = io.BytesIO()
  fig.savefig(buf, format='png')
  return buf.getvalue()


def save_png(fig: Figure, path: str | os.PathLike) -> None:
  """Renders `fig` to PNG and writes it atomically (cxr_jax.io_utils)."""
  atomic_write_bytes(path, png_bytes(fig))
