"""Lung and heart contours over the X-ray (paper 004's segmentation, in reports and the viewer).

One panel per image: the grey X-ray, the predicted mask of every structure as a solid contour
in the structure's colour and, when known, the ground truth as a dashed contour of the same
colour, with the image's Dice per structure in the legend. Figures use
`matplotlib.figure.Figure` on the Agg canvas (no pyplot state).
"""

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

# Structure -> colour; others cycle through the fallback list.
COLORS = {'left_lung': '#1f77b4', 'right_lung': '#2ca02c', 'heart': '#d62728',
          'lungs': '#9467bd', 'left_clavicle': '#ff7f0e', 'right_clavicle': '#8c564b'}
_FALLBACK = ('#17becf', '#bcbd22', '#e377c2', '#7f7f7f')


def color(name: str, i: int = 0) -> str:
  return COLORS.get(name, _FALLBACK[i % len(_FALLBACK)])


def contour_figure(image: np.ndarray, pred: np.ndarray, names: Sequence[str], *,
                   truth: np.ndarray | None = None, title: str = '',
                   scores: Mapping[str, float] | None = None, size_inches: float = 4.0
                   ) -> Figure:
  """The X-ray [H, W] with contours of pred [H, W, K] (solid) and truth [H, W, K] (dashed).

  Args:
    image: grey [H, W] (any range; shown min-max scaled).
    pred, truth: masks or probabilities (contoured at 0.5), K channels named by `names`.
    title: panel title.
    scores: {structure: Dice} for the legend.
  """
  image = np.asarray(image, np.float32)
  pred = np.asarray(pred, np.float32)
  truth = None if truth is None else np.asarray(truth, np.float32)
  if pred.shape[:2] != image.shape or pred.shape[-1] != len(names):
    raise ValueError(f'masks {pred.shape} do not fit the image {image.shape} and the '
                     f'{len(names)} structures {list(names)}.')
  fig = Figure(figsize=(size_inches, size_inches * image.shape[0] / image.shape[1] + 0.5),
               layout='constrained')
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  lo, hi = float(image.min()), float(image.max())
  ax.imshow((image - lo) / max(hi - lo, 1e-8), cmap='gray', vmin=0, vmax=1)
  handles = []
  for i, name in enumerate(names):
    c = color(name, i)
    # Contouring a constant map warns and draws nothing; skip empty / full channels.
    if pred[..., i].min() < 0.5 <= pred[..., i].max():
      ax.contour(pred[..., i], levels=[0.5], colors=[c], linewidths=1.2)
    if truth is not None and np.ptp(truth[..., i]) > 0:
      ax.contour(truth[..., i], levels=[0.5], colors=[c],
                 linewidths=1.0, linestyles='dashed')
    score = '' if scores is None or name not in scores else f' (Dice {scores[name]:.3f})'
    handles.append(Line2D([], [], color=c, label=f'{name}{score}'))
  if truth is not None:
    handles.append(Line2D([], [], color='white', ls='dashed', label='dashed: ground truth'))
  ax.legend(handles=handles, loc='lower center', fontsize=6, framealpha=0.6)
  ax.set_title(title, fontsize=8)
  ax.axis('off')
  return fig
