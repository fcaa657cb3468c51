"""The `localize` stage: weakly supervised localisation on a box split (papers 001, 002, 004).

For every model of `config.report_models` and every image of `config.localize.split`:
1. the model runs once (eval mode) on the image preprocessed by `config.localize.pp`;
2. a heat map per class comes from its last feature map (`config.localize.method`: 'cam' =
   the class score map of a linear head, which for paper 001's space attention head is the map
   "without the last average pooling"; 'grad_cam' for any head; cxr_jax/explain/cam.py), is
   upsampled to the model input and turned into boxes (cxr_jax/explain/boxes.py);
3. only then are the experts' boxes read and matched (IoU, IoBB; explain/localization.py).

`inference.predict_boxes` (steps 1-2) takes images only: the predicted boxes cannot depend on
ground truth (a test runs it with and without the boxes in the examples). Boxes are compared in
the frame of the model input: preprocessing moves the ground-truth boxes with the image (a
centre crop clips them; a box left with no area is skipped and counted in the output).

Writes per model (cxr_jax/layout.py): the metrics with their settings, one record per
ground-truth box (its predicted boxes, IoU, IoBB) and overlays of the first
`config.localize.num_overlays` images (ground truth red, prediction black).
"""

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging
from etils import epath

from cxr_jax import inference, layout
from cxr_jax.data import pipeline
from cxr_jax.explain import boxes as boxes_lib
from cxr_jax.explain import localization, overlays
from cxr_jax.stages.base import STAGES, is_chief


def _batches(examples: Iterable[dict[str, Any]], size: int) -> Iterable[list[dict[str, Any]]]:
  batch = []
  for ex in examples:
    batch.append(ex)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


def match_records(example: dict[str, Any], probs: np.ndarray,
                  found: Mapping[int, Sequence[boxes_lib.Box]], class_names: Sequence[str],
                  thresholds: np.ndarray) -> tuple[list[dict[str, Any]], int]:
  """One record per ground-truth box of `example` whose class the model has; (records,
  number of boxes skipped for having no area left after preprocessing)."""
  h, w = example['image'].shape[:2]
  records, skipped = [], 0
  for bbox, c in zip(example['boxes'], example['box_classes'], strict=True):
    if c not in class_names or class_names.index(c) not in found:  # not a scored class
      continue
    gt = localization.box_from_normalized(bbox, h, w)
    if gt[2] <= 0 or gt[3] <= 0:
      skipped += 1
      continue
    k = class_names.index(c)
    pred = [tuple(float(v) for v in b) for b in found[k]]
    iou, iobb = localization.best_overlap(gt, pred)
    records.append({'image_id': example['image_id'], 'class': c, 'gt': list(gt),
                    'pred': [list(b) for b in pred], 'prob': float(probs[k]),
                    'predicted': bool(probs[k] > thresholds[k]), 'iou': iou, 'iobb': iobb})
  return records, skipped


def localize_model(predictor: inference.Predictor, examples: Iterable[dict[str, Any]],
                   cfg: ml_collections.ConfigDict, run: layout.Run, label: str
                   ) -> dict[str, Any]:
  """Runs one model over the examples; writes its files (localize/<stage>/); returns the
  metrics."""
  settings = boxes_lib.BoxSettings.from_config(cfg.boxes)
  class_names = list(predictor.class_names)
  # config.localize.classes: score only these (paper 002's eight box classes); () = all.
  scored = [c for c in class_names if c in (cfg.get('classes') or class_names)]
  thresholds = predictor.thresholds
  records, skipped, shown, n_images = [], 0, 0, 0
  for batch in _batches(examples, cfg.batch_size):
    images = np.stack([ex['image'] for ex in batch])
    # Boxes only for the classes scored below: which classes are drawn depends on the ground
    # truth, the boxes of a class never do.
    wanted = [{class_names.index(c) for c in ex['box_classes'] if c in scored}
              for ex in batch]
    probs, maps, found = inference.predict_boxes(predictor, images, method=cfg.method,
                                                 settings=settings, classes=wanted)
    for i, ex in enumerate(batch):
      recs, s = match_records(ex, probs[i], found[i], class_names, thresholds)
      records += recs
      skipped += s
      n_images += 1
      if shown < cfg.num_overlays and recs:
        _overlay(ex, recs, maps[i], class_names, label, cfg.method,
                 run.localize_overlays_dir(predictor.stage))
        shown += 1
  if not records:
    raise ValueError(f'no ground-truth box of the classes {class_names} in the split '
                     f'{cfg.split!r}')
  metrics = localization.localization_metrics(
      records, scored, iou_thresholds=tuple(cfg.iou_thresholds),
      require_prediction=cfg.require_prediction)
  metrics.update(method=cfg.method, boxes=settings.to_dict(), split=cfg.split,
                 num_images=n_images, num_boxes_skipped=skipped)
  run.write_localization(predictor.stage, metrics, records)
  return metrics


def _overlay(ex: dict[str, Any], records: list[dict[str, Any]], maps: np.ndarray,
             class_names: Sequence[str], label: str, method: str, out_dir: epath.Path) -> None:
  image = ex['image'][..., 0]
  image = (image - image.min()) / max(float(np.ptp(image)), 1e-8)  # display only
  panels = []
  for c in dict.fromkeys(r['class'] for r in records):
    rs = [r for r in records if r['class'] == c]
    heat = overlays.upsample(maps[..., class_names.index(c)], image.shape)
    panels.append(overlays.Panel(
        heat, value_range=(float(heat.min()), float(heat.max())),
        title=f'{label}: {c} (p={rs[0]["prob"]:.2f}, IoU {max(r["iou"] for r in rs):.2f})',
        boxes=[tuple(r['gt']) for r in rs], pred_boxes=[tuple(b) for b in rs[0]['pred']],
        colorbar_label=f'{method} (class score)'))
  name = ex['image_id'].rsplit('.', 1)[0]
  overlays.overlay_grid(image, panels, ncols=min(len(panels), 4),
                        suptitle=f'{ex["image_id"]}: {method}; red = experts, black = predicted',
                        out_path=str(out_dir / f'{name}.png'))


@STAGES.register('localize')
def localize_stage(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """Localisation metrics and overlays of every `config.report_models` model: CAM / Grad-CAM
  boxes against the experts' boxes (papers 001, 002, 004), in localize/<stage>/.

  A small job (the NIH box split has 880 images) run by process 0 alone, on its local devices,
  so that only one host writes.
  """
  if not is_chief():
    return
  cfg = config.localize
  pp = cfg.pp or config.data.pp_eval
  run = layout.Run(workdir)
  for stage, label in config.report_models:
    predictor = inference.load_predictor(workdir, stage)
    examples = pipeline.iterate_box_split(config.data, cfg.split, pp)
    metrics = localize_model(predictor, examples, cfg, run, label)
    mean = metrics['mean']
    logging.info('localize %s (%s, %d boxes): mean IoU %.3f, accuracy at T(IoU)=0.3 %.3f, '
                 '0.5 %.3f.', stage, cfg.method, metrics['num_boxes'], mean['mean_iou'],
                 mean['acc_iou'].get('0.3', float('nan')),
                 mean['acc_iou'].get('0.5', float('nan')))
