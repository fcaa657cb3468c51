"""Localisation metrics of predicted boxes against the experts' boxes, and the papers' tables.

Metrics (per ground-truth box, over the boxes predicted from that class's heat map):
- IoU, intersection over union; IoBB, intersection over the predicted box's area (Wang et
  al., ChestX-ray8). Each takes its best value over the predicted boxes (0 when there are none).
- Accuracy at T: the fraction of ground-truth boxes with IoU > T (strictly: "above a
  threshold", paper 002), likewise T(IoBB).
- Average false positives at T, AFP (Wang et al. 2017, ChestX-ray8, Table 3): a predicted box
  is a false positive at T when its IoU (`afp_iou`) or IoBB (`afp_iobb`) with every
  ground-truth box of its (image, class) is <= T (the complement of the accuracy's "> T").
  AFP = false-positive boxes / (image, class) groups, i.e. per heat map evaluated. Wang et al.
  count per image; within one class each image has one heat map, so the per-class values are
  theirs; the pooled value stays a per-heat-map rate instead of adding up the classes of an
  image (which would grow with the number of classes an image has boxes for). Accuracy alone
  rewards boxing everything (mode='all', low thresholds); AFP shows the price.
- Per class, then `mean`: the unweighted mean over the classes that have boxes (paper 002's
  Mean column, Table 1), and `pooled`: the mean over all boxes (paper 004's "average IoU" in
  Table 3 is this one: its 0.3014 is the box-count-weighted mean of its per-class values);
  the pooled AFP is over all (image, class) groups.

Records (one per ground-truth box, made by the `localize` stage):
  {'image_id': str, 'class': str, 'gt': Box, 'pred': [Box, ...], 'prob': float,
   'predicted': bool}
Boxes are (x, y, w, h) in one pixel frame (see `boxes` and `overlays`). The records of one
(image_id, class) share one heat map, hence the same 'pred' (and 'predicted'); a record
without 'image_id' is a group of its own.
"""

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


def _summary(ious: np.ndarray, iobbs: np.ndarray, thresholds: Sequence[float],
             fps: np.ndarray, num_pred: int) -> dict[str, Any]:
  """Summary of boxes with overlaps ious, iobbs [N] and groups with false positives
  fps [G, 2, T] (IoU, IoBB; at each threshold) holding num_pred counted predicted boxes."""
  afp = fps.sum(axis=0) / fps.shape[0]  # [2, T]
  return {
      'num_boxes': int(ious.size),
      'mean_iou': float(ious.mean()),
      'mean_iobb': float(iobbs.mean()),
      'acc_iou': {threshold_key(t): float((ious > t).mean()) for t in thresholds},
      'acc_iobb': {threshold_key(t): float((iobbs > t).mean()) for t in thresholds},
      'num_groups': int(fps.shape[0]),
      'num_pred_boxes': int(num_pred),
      'afp_iou': {threshold_key(t): float(v) for t, v in zip(thresholds, afp[0], strict=True)},
      'afp_iobb': {threshold_key(t): float(v) for t, v in zip(thresholds, afp[1], strict=True)},
  }


def false_positives(gts: Sequence[Box], preds: Sequence[Box], thresholds: Sequence[float]
                    ) -> np.ndarray:
  """False-positive counts [2, T] (rows IoU, IoBB) of the predicted boxes of one heat map.

  A box of preds [M] is a false positive at T when its overlap with every box of gts [N] (the
  experts' boxes of that image and class) is <= T; with no GT box every predicted box is one.
  """
  t = np.asarray(thresholds, np.float64).reshape(-1)
  if len(preds) == 0:
    return np.zeros((2, t.size), np.int64)
  gt_arr = np.asarray([g[:4] for g in gts], np.float64).reshape(-1, 4)
  pred_arr = np.asarray([p[:4] for p in preds], np.float64)
  counts = []
  for overlap in (pairwise_iou(gt_arr, pred_arr), pairwise_iobb(gt_arr, pred_arr)):
    best = overlap.max(axis=0) if len(gt_arr) else np.zeros(len(pred_arr))  # [M]
    counts.append((best[:, None] <= t[None]).sum(axis=0))
  return np.stack(counts).astype(np.int64)


def _box_key(boxes: Sequence[Sequence[float]]) -> tuple[tuple[float, ...], ...]:
  # Records read back from JSON hold lists; compare values, not containers.
  return tuple(tuple(float(v) for v in b[:4]) for b in boxes)


def localization_metrics(records: Iterable[Mapping[str, Any]], class_names: Sequence[str], *,
                         iou_thresholds: Sequence[float] = IOU_THRESHOLDS,
                         require_prediction: bool = False) -> dict[str, Any]:
  """Per-class and mean localisation metrics of `records` (see module doc); JSON-serialisable.

  Args:
    records: one per ground-truth box, with 'class', 'gt', 'pred', 'image_id' (and
      'predicted' when require_prediction).
    class_names: the model's classes; a record of another class raises ValueError.
    iou_thresholds: the T of the accuracies and AFPs (used for IoU and IoBB alike).
    require_prediction: count a box of a class the model did not predict for that image
      ('predicted' False) as a miss (IoU = IoBB = 0); it stays in the denominator, so every
      model is scored on the same boxes. Likewise the predicted boxes of such an (image,
      class) are no false positives (the model does not claim the class), and the group stays
      in the AFP's denominator.

  Returns:
    {'iou_thresholds', 'require_prediction', 'class_names' (those with >= 1 box, in
     class_names order), 'num_boxes', 'per_class': {class: summary}, 'mean': class-mean
     summary + 'num_boxes', 'pooled': summary over all boxes}; a summary is {'num_boxes',
    'mean_iou', 'mean_iobb', 'acc_iou': {'0.3': acc, ...}, 'acc_iobb': {...}, 'num_groups'
    ((image, class) groups = heat maps), 'num_pred_boxes' (predicted boxes counted for AFP),
    'afp_iou': {'0.3': false positives per group, ...}, 'afp_iobb': {...}}; in 'mean' the
    counts are totals and the rest class means. With no box at all, the mean and pooled
    values are None.

  Raises:
    ValueError: a record of an unknown class, without 'predicted' under require_prediction,
      or whose 'pred' / 'predicted' differ from those of its (image_id, class) group.
  """
  thresholds = [float(t) for t in iou_thresholds]
  known = list(class_names)
  overlaps: dict[str, list[tuple[float, float]]] = {c: [] for c in known}
  # (image_id, class) -> (its first record's index, pred, counted, [gt, ...]).
  groups: dict[tuple[Any, str], tuple[int, list[Box], bool, list[Box]]] = {}
  for i, rec in enumerate(records):
    cls = rec['class']
    if cls not in overlaps:
      raise ValueError(f'localisation record {i} ({rec.get("image_id", "?")}): class {cls!r} '
                       f'is not one of the model classes {known}')
    if require_prediction and 'predicted' not in rec:
      raise ValueError(f"localisation record {i}: require_prediction needs its 'predicted'")
    pred = list(rec.get('pred') or ())
    counted = not require_prediction or bool(rec['predicted'])
    if counted:
      overlaps[cls].append(best_overlap(rec['gt'], pred))
    else:
      overlaps[cls].append((0.0, 0.0))
    key = (rec['image_id'], cls) if 'image_id' in rec else (object(), cls)
    if key not in groups:
      groups[key] = (i, pred, counted, [rec['gt']])
      continue
    first, first_pred, first_counted, gts = groups[key]
    if _box_key(pred) != _box_key(first_pred) or counted != first_counted:
      what = "'pred'" if counted == first_counted else "'predicted'"
      raise ValueError(f'localisation records {first} and {i} ({key[0]!r}, {cls!r}): one image '
                       f'and class have one heat map, but their {what} differ')
    gts.append(rec['gt'])

  # False positives [G, 2, T] and counted predicted boxes, per class.
  fps: dict[str, list[np.ndarray]] = {c: [] for c in known}
  num_pred: dict[str, int] = dict.fromkeys(known, 0)
  for (_, cls), (_, pred, counted, gts) in groups.items():
    if counted:
      fps[cls].append(false_positives(gts, pred, thresholds))
      num_pred[cls] += len(pred)
    else:
      fps[cls].append(np.zeros((2, len(thresholds)), np.int64))

  with_boxes = [c for c in known if overlaps[c]]
  per_class = {}
  for c in with_boxes:
    arr = np.asarray(overlaps[c], np.float64)
    per_class[c] = _summary(arr[:, 0], arr[:, 1], thresholds, np.stack(fps[c]), num_pred[c])
  num_boxes = sum(len(overlaps[c]) for c in with_boxes)

  def class_mean(get) -> float | None:
    return float(np.mean([get(per_class[c]) for c in with_boxes])) if with_boxes else None

  mean: dict[str, Any] = {'num_boxes': num_boxes}
  for key in ('mean_iou', 'mean_iobb'):
    mean[key] = class_mean(lambda s, key=key: s[key])
  for key in ('acc_iou', 'acc_iobb'):
    mean[key] = {threshold_key(t): class_mean(lambda s, key=key, t=t: s[key][threshold_key(t)])
                 for t in thresholds}
  mean['num_groups'] = len(groups)
  mean['num_pred_boxes'] = sum(num_pred.values())
  for key in ('afp_iou', 'afp_iobb'):
    mean[key] = {threshold_key(t): class_mean(lambda s, key=key, t=t: s[key][threshold_key(t)])
                 for t in thresholds}
  if with_boxes:
    arr = np.concatenate([np.asarray(overlaps[c], np.float64) for c in with_boxes])
    all_fps = np.concatenate([np.stack(fps[c]) for c in with_boxes])
    pooled = _summary(arr[:, 0], arr[:, 1], thresholds, all_fps, mean['num_pred_boxes'])
  else:
    pooled = {'num_boxes': 0, 'mean_iou': None, 'mean_iobb': None,
              'acc_iou': {threshold_key(t): None for t in thresholds},
              'acc_iobb': {threshold_key(t): None for t in thresholds},
              'num_groups': 0, 'num_pred_boxes': 0,
              'afp_iou': {threshold_key(t): None for t in thresholds},
              'afp_iobb': {threshold_key(t): None for t in thresholds}}
  return {
      'iou_thresholds': thresholds,
      'require_prediction': bool(require_prediction),
      'class_names': with_boxes,
      'num_boxes': num_boxes,
      'per_class': per_class,
      'mean': mean,
      'pooled': pooled,
  }
