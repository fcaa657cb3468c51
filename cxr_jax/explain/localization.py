"""Localisation metrics of predicted boxes against the experts' boxes, and the papers' tables.

Metrics (per ground-truth box, over the boxes predicted from that class's heat map):
- IoU, intersection over union; IoBB, intersection over the predicted box's area (Wang et
  al., ChestX-ray8). Each takes its best value over the predicted boxes (0 when there are none).
- Accuracy at T: the fraction of ground-truth boxes with IoU > T (strictly: "above a
  threshold", paper 002), likewise T(IoBB).
- Per class, then `mean`: the unweighted mean over the classes that have boxes (paper 002's
  Mean column, Table 1), and `pooled`: the mean over all boxes (paper 004's "average IoU" in
  Table 3 is this one: its 0.3014 is the box-count-weighted mean of its per-class values).

Records (one per ground-truth box, made by the `localize` stage):
  {'image_id': str, 'class': str, 'gt': Box, 'pred': [Box, ...], 'prob': float,
   'predicted': bool}
Boxes are (x, y, w, h) in one pixel frame (see `boxes` and `overlays`).
"""

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

Box = tuple[float, float, float, float]  # x, y, w, h (the same as overlays.Box, boxes.Box)

IOU_THRESHOLDS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)

# Paper 002's column heads for the eight NIH classes with boxes.
ABBREVIATIONS: dict[str, str] = {
    'Atelectasis': 'Ate.',
    'Cardiomegaly': 'Car.',
    'Effusion': 'Eff.',
    'Infiltration': 'Inf.',
    'Infiltrate': 'Inf.',  # BBox_List_2017.csv's spelling
    'Mass': 'Mas.',
    'Nodule': 'Nod.',
    'Pneumonia': 'Pn1.',
    'Pneumothorax': 'Pn2.',
}


# ------------------------------------------------------------------------------ overlaps
def _area(w: float, h: float) -> float:
  return max(float(w), 0.0) * max(float(h), 0.0)


def _intersection(a: Sequence[float], b: Sequence[float]) -> float:
  ax, ay, aw, ah = (float(v) for v in a[:4])
  bx, by, bw, bh = (float(v) for v in b[:4])
  iw = min(ax + max(aw, 0.0), bx + max(bw, 0.0)) - max(ax, bx)
  ih = min(ay + max(ah, 0.0), by + max(bh, 0.0)) - max(ay, by)
  return max(iw, 0.0) * max(ih, 0.0)


def iou(a: Box, b: Box) -> float:
  """Intersection over union of two (x, y, w, h) boxes; 0 when the union is empty."""
  inter = _intersection(a, b)
  union = _area(a[2], a[3]) + _area(b[2], b[3]) - inter
  return inter / union if union > 0 else 0.0


def iobb(gt: Box, pred: Box) -> float:
  """Intersection over the predicted box's area (IoBB, Wang et al.); 0 for an empty box."""
  area = _area(pred[2], pred[3])
  return _intersection(gt, pred) / area if area > 0 else 0.0


def _pairwise(gts: np.ndarray, preds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Intersections [N, M] and areas [N], [M] of boxes gts [N, 4] and preds [M, 4]."""
  gts = np.asarray(gts, np.float64).reshape(-1, 4)
  preds = np.asarray(preds, np.float64).reshape(-1, 4)
  gw, gh = np.clip(gts[:, 2], 0, None), np.clip(gts[:, 3], 0, None)
  pw, ph = np.clip(preds[:, 2], 0, None), np.clip(preds[:, 3], 0, None)
  gx0, gy0, px0, py0 = gts[:, 0], gts[:, 1], preds[:, 0], preds[:, 1]
  iw = np.minimum((gx0 + gw)[:, None], (px0 + pw)[None]) - np.maximum(gx0[:, None], px0[None])
  ih = np.minimum((gy0 + gh)[:, None], (py0 + ph)[None]) - np.maximum(gy0[:, None], py0[None])
  inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
  return inter, gw * gh, pw * ph


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def pairwise_iou(gts: np.ndarray, preds: np.ndarray) -> np.ndarray:
  """IoU [N, M] of every box of gts [N, 4] with every box of preds [M, 4] (x, y, w, h)."""
  inter, ga, pa = _pairwise(gts, preds)
  return _safe_divide(inter, ga[:, None] + pa[None] - inter)


def pairwise_iobb(gts: np.ndarray, preds: np.ndarray) -> np.ndarray:
  """IoBB [N, M]: intersection over the area of preds[m], for gts [N, 4], preds [M, 4]."""
  inter, _, pa = _pairwise(gts, preds)
  return _safe_divide(inter, np.broadcast_to(pa[None], inter.shape))


def best_overlap(gt: Box, preds: Sequence[Box]) -> tuple[float, float]:
  """(IoU, IoBB) of `gt`, each the best over `preds` (a GT box counts as found when any
  predicted box overlaps it enough); (0, 0) with no predicted box."""
  if len(preds) == 0:
    return 0.0, 0.0
  gt_arr = np.asarray([gt[:4]], np.float64)
  pred_arr = np.asarray([p[:4] for p in preds], np.float64)
  return float(pairwise_iou(gt_arr, pred_arr).max()), float(pairwise_iobb(gt_arr, pred_arr).max())


def box_from_normalized(bbox: Sequence[float], height: int, width: int) -> Box:
  """TFDS objects/bbox (ymin, xmin, ymax, xmax) in [0, 1] -> (x, y, w, h) in pixels of an
  image [height, width]."""
  ymin, xmin, ymax, xmax = (float(v) for v in bbox)
  return (xmin * width, ymin * height, (xmax - xmin) * width, (ymax - ymin) * height)


# ------------------------------------------------------------------------------ metrics
def threshold_key(t: float) -> str:
  """JSON key of a threshold: 0.3 -> '0.3'."""
  return f'{float(t):g}'


def _summary(ious: np.ndarray, iobbs: np.ndarray, thresholds: Sequence[float]) -> dict[str, Any]:
  return {
      'num_boxes': int(ious.size),
      'mean_iou': float(ious.mean()),
      'mean_iobb': float(iobbs.mean()),
      'acc_iou': {threshold_key(t): float((ious > t).mean()) for t in thresholds},
      'acc_iobb': {threshold_key(t): float((iobbs > t).mean()) for t in thresholds},
  }


def localization_metrics(records: Iterable[Mapping[str, Any]], class_names: Sequence[str], *,
                         iou_thresholds: Sequence[float] = IOU_THRESHOLDS,
                         require_prediction: bool = False) -> dict[str, Any]:
  """Per-class and mean localisation metrics of `records` (see module doc); JSON-serialisable.

  Args:
    records: one per ground-truth box, with 'class', 'gt', 'pred' (and 'predicted' when
      require_prediction).
    class_names: the model's classes; a record of another class raises ValueError.
    iou_thresholds: the T of the accuracies (used for IoU and IoBB alike).
    require_prediction: count a box of a class the model did not predict for that image
      ('predicted' False) as a miss (IoU = IoBB = 0); it stays in the denominator, so every
      model is scored on the same boxes.

  Returns:
    {'iou_thresholds', 'require_prediction', 'class_names' (those with >= 1 box, in
     class_names order), 'num_boxes', 'per_class': {class: summary}, 'mean': class-mean
     summary + 'num_boxes', 'pooled': summary over all boxes}; a summary is {'num_boxes',
    'mean_iou', 'mean_iobb', 'acc_iou': {'0.3': acc, ...}, 'acc_iobb': {...}}. With no box
    at all, the mean and pooled values are None.
  """
  thresholds = [float(t) for t in iou_thresholds]
  known = list(class_names)
  overlaps: dict[str, list[tuple[float, float]]] = {c: [] for c in known}
  for i, rec in enumerate(records):
    cls = rec['class']
    if cls not in overlaps:
      raise ValueError(f'localisation record {i} ({rec.get("image_id", "?")}): class {cls!r} '
                       f'is not one of the model classes {known}')
    if require_prediction and 'predicted' not in rec:
      raise ValueError(f"localisation record {i}: require_prediction needs its 'predicted'")
    if require_prediction and not rec['predicted']:
      overlaps[cls].append((0.0, 0.0))
    else:
      overlaps[cls].append(best_overlap(rec['gt'], rec.get('pred') or ()))

  with_boxes = [c for c in known if overlaps[c]]
  per_class = {}
  for c in with_boxes:
    arr = np.asarray(overlaps[c], np.float64)
    per_class[c] = _summary(arr[:, 0], arr[:, 1], thresholds)
  num_boxes = sum(len(overlaps[c]) for c in with_boxes)

  def class_mean(get) -> float | None:
    return float(np.mean([get(per_class[c]) for c in with_boxes])) if with_boxes else None

  mean: dict[str, Any] = {'num_boxes': num_boxes}
  for key in ('mean_iou', 'mean_iobb'):
    mean[key] = class_mean(lambda s, key=key: s[key])
  for key in ('acc_iou', 'acc_iobb'):
    mean[key] = {threshold_key(t): class_mean(lambda s, key=key, t=t: s[key][threshold_key(t)])
                 for t in thresholds}
  if with_boxes:
    arr = np.concatenate([np.asarray(overlaps[c], np.float64) for c in with_boxes])
    pooled = _summary(arr[:, 0], arr[:, 1], thresholds)
  else:
    pooled = {'num_boxes': 0, 'mean_iou': None, 'mean_iobb': None,
              'acc_iou': {threshold_key(t): None for t in thresholds},
              'acc_iobb': {threshold_key(t): None for t in thresholds}}
  return {
      'iou_thresholds': thresholds,
      'require_prediction': bool(require_prediction),
      'class_names': with_boxes,
      'num_boxes': num_boxes,
      'per_class': per_class,
      'mean': mean,
      'pooled': pooled,
  }


# ------------------------------------------------------------------------------ tables
def _fmt(x: float | None, digits: int) -> str:
  return 'n/a' if x is None else f'{x:.{digits}f}'


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
  """A GitHub markdown table; the first `left` columns left-aligned, numbers right-aligned."""
  rule = ['---'] * left + ['---:'] * (len(header) - left)
  return '\n'.join('| ' + ' | '.join(line) + ' |' for line in (header, rule, *rows))


def _columns(results: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[str], str]:
  """Classes with boxes in any model (first-seen order), their column heads, and a note on
  the abbreviations ('' when full names are used)."""
  classes: list[str] = []
  for m in results.values():
    classes += [c for c in m['class_names'] if c not in classes]
  if classes and all(c in ABBREVIATIONS for c in classes):
    note = 'Abbreviations: ' + ', '.join(f'{ABBREVIATIONS[c]} = {c}' for c in classes) + '.'
    return classes, [ABBREVIATIONS[c] for c in classes], note
  return classes, list(classes), ''


def _boxes_note(results: Mapping[str, Mapping[str, Any]]) -> str:
  parts = []
  for name, m in results.items():
    scope = ', a box of a class the model did not predict counts as a miss' if m.get(
        'require_prediction') else ''
    parts.append(f'{name}: {m["num_boxes"]} boxes{scope}')
  return '; '.join(parts) + '.'


def _accuracy_table(results: Mapping[str, Mapping[str, Any]], thresholds: Sequence[float],
                    metric: str) -> str:
  classes, heads, note = _columns(results)
  label = 'IoU' if metric == 'acc_iou' else 'IoBB'
  rows = []
  for t in thresholds:
    key = threshold_key(t)
    for i, (name, m) in enumerate(results.items()):
      values = [m['per_class'][c][metric].get(key) if c in m['per_class'] else None
                for c in classes]
      mean = m['mean'][metric].get(key)
      rows.append([key if i == 0 else '', name, *(_fmt(v, 2) for v in values), _fmt(mean, 2)])
  lines = [_md_table([f'T({label})', 'Model', *heads, 'Mean'], rows, left=2), '']
  lines.append(f'A ground-truth box counts as localised when its best {label} with a predicted '
               f'box is > T; Mean is the mean over classes. {note}'.rstrip())
  lines.append(_boxes_note(results))
  return '\n'.join(lines)


def _mean_iou_table(results: Mapping[str, Mapping[str, Any]]) -> str:
  classes, heads, note = _columns(results)
  rows = []
  for name, m in results.items():
    values = [m['per_class'][c]['mean_iou'] if c in m['per_class'] else None for c in classes]
    rows.append([name, *(_fmt(v, 4) for v in values), _fmt(m['mean']['mean_iou'], 4),
                 _fmt(m.get('pooled', {}).get('mean_iou'), 4)])
  lines = [_md_table(['Model', *heads, 'Mean', 'All boxes'], rows), '']
  lines.append('Mean IoU of each ground-truth box with its best predicted box (0 when none). '
               'Mean: over classes; All boxes: over all boxes (paper 004\'s "average IoU"). '
               f'{note}'.rstrip())
  lines.append(_boxes_note(results))
  return '\n'.join(lines)


def markdown_tables(results: Mapping[str, Mapping[str, Any]], *,
                    thresholds: Sequence[float] = (0.3, 0.5, 0.7)) -> str:
  """Localisation tables for several models side by side, in the papers' layouts.

  results: {model label: `localization_metrics` dict}, in display order. Gives accuracy at
  T(IoU) (paper 002 Table 1), mean IoU per class (paper 004 Table 3), and accuracy at T(IoBB)
  (Wang et al.), each under a '##' heading.
  """
  if not results:
    raise ValueError('markdown_tables needs at least one model')
  parts = ['## Localisation accuracy, T(IoU) (paper 002, Table 1)', '',
           _accuracy_table(results, thresholds, 'acc_iou'), '',
           '## Mean IoU per class (paper 004, Table 3)', '', _mean_iou_table(results), '',
           '## Localisation accuracy, T(IoBB) (Wang et al.)', '',
           _accuracy_table(results, thresholds, 'acc_iobb')]
  return '\n'.join(parts) + '\n'


def csv_table(results: Mapping[str, Mapping[str, Any]]) -> str:
  """All numbers of `results` ({model: localization_metrics dict}) as long-format CSV rows
  model,class,metric,threshold,value; class 'Mean' is the mean over classes, 'All boxes' the
  pooled one; threshold is empty for num_boxes / mean_iou / mean_iobb, value empty for None."""
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator='\n')
  writer.writerow(['model', 'class', 'metric', 'threshold', 'value'])
  for name, m in results.items():
    groups = [*((c, m['per_class'][c]) for c in m['class_names']), ('Mean', m['mean'])]
    if 'pooled' in m:
      groups.append(('All boxes', m['pooled']))
    for cls, summary in groups:
      for key in ('num_boxes', 'mean_iou', 'mean_iobb'):
        writer.writerow([name, cls, key, '', _csv_value(summary[key])])
      for key in ('acc_iou', 'acc_iobb'):
        for t, v in summary[key].items():
          writer.writerow([name, cls, key, t, _csv_value(v)])
  return buf.getvalue()


def _csv_value(v: Any) -> str:
  return '' if v is None else repr(v) if isinstance(v, float) else str(v)
