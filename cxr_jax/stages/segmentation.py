"""Paper 004's segmentation stages: `evaluate_segmentation` and `segment`.

- `evaluate_segmentation`: the best checkpoint of every segmentation training stage of the run
  (a stage whose config has data.target 'masks', e.g. `train_segmenter`) on every eval split:
  Dice and Jaccard per structure (left lung, right lung, heart), both lungs and the global mask
  M_g, mean and standard deviation over images (evaluate/<stage>/segmentation_<split>.json),
  one CSV row per image, and contour overlays of the first test images.
- `segment`: a trained U-Net (this run's `train_segmenter`, or another run: config.segment
  .source) applied to every image of the classification data set's splits; the masks go to the
  run's mask cache (segment/, cxr_jax/data/mask_cache.py), keyed by image id, shard by shard:
  an interrupted stage resumes at the first missing shard. A classifier stage that reads
  masks (config.data.mask_cache = 'segment') then joins them to its examples.
"""

import re
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from cxr_jax import config_lib, inference, io_utils, layout, parallel, reporting
from cxr_jax import segmentation_metrics as S
from cxr_jax.evaluators import EVALUATORS
from cxr_jax.explain import contours
from cxr_jax.stages.base import STAGES, is_chief
from cxr_jax.train_step import make_predict_fn

SEGMENT_STAGE = 'segment'
# Overlays of the first images of the test split drawn per segmentation stage.
NUM_OVERLAYS = 6


def segmentation_stages(config: ml_collections.ConfigDict) -> list[str]:
  """The run's training stages whose (stage) config trains a segmenter, in config order."""
  return [s for s in config.stages if s in layout.TRAIN_STAGES
          and config_lib.is_segmentation(config_lib.stage_config(config, s))]


@STAGES.register('evaluate_segmentation')
def evaluate_segmentation_stage(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """Dice / Jaccard of every segmentation stage's best checkpoint on every eval split."""
  run = layout.Run(workdir)
  mesh = parallel.make_mesh()
  stages = segmentation_stages(config)
  if not stages:
    raise ValueError(f'evaluate_segmentation: no segmentation training stage in config.stages '
                     f"{list(config.stages)} (one whose config.data.target is 'masks').")
  for stage in stages:
    cfg = config_lib.stage_config(config, stage)
    model, variables, info = inference.restore_model(run.stage_dir(stage))
    if info.task != 'segmentation':
      raise inference.RunError(f'{run.stage_dir(stage)}: a {info.task} model, not a segmenter.')
    variables = jax.device_put(variables, parallel.replicated(mesh))
    for name, split in cfg.data.eval_splits.items():
      evaluator = EVALUATORS.get(cfg.evaluator)(
          make_predict_fn(model), cfg.data, split, batch_size=cfg.eval_batch_size, mesh=mesh,
          class_names=info.class_names, threshold=cfg.segment.threshold,
          num_examples=NUM_OVERLAYS if name == 'test' else 0)
      metrics, preds = evaluator.run(variables)
      metrics['split'] = split
      logging.info('%s on %s (%s, %d images): Dice %s; Jaccard %s.', stage, name, split,
                   metrics['num_examples'], _scores(metrics, 'dice'), _scores(metrics, 'jaccard'))
      if is_chief():
        files: dict[Any, Any] = {
            run.segmentation_records_file(stage, name): _records_csv(preds, metrics),
            run.segmentation_file(stage, name): io_utils.json_text(metrics)}
        for ex in preds.examples:
          files[run.segmentation_overlays_dir(stage) / f'{_safe(ex["image_id"])}.png'] = \
              _overlay_producer(ex, info.class_names, stage, cfg.segment.threshold)
        io_utils.atomic_write_files(files)


def _scores(metrics: dict[str, Any], kind: str) -> str:
  return ', '.join(f'{s} {metrics[kind][s]:.4f} +- {metrics[kind + "_sd"][s]:.4f}'
                   for s in metrics['structures'])


def _safe(image_id: str) -> str:
  return re.sub(r'[^\w.-]', '_', image_id.rsplit('.', 1)[0])


def _records_csv(preds: Any, metrics: dict[str, Any]) -> str:
  names = metrics['structures']
  header = ['image_id', 'dice_loss', *(f'dice/{s}' for s in names),
            *(f'jaccard/{s}' for s in names)]
  rows = [[i, f'{loss:.6f}', *(f'{v:.6f}' for v in d), *(f'{v:.6f}' for v in j)]
          for i, loss, d, j in zip(preds.image_ids, preds.dice_loss, preds.dice, preds.jaccard,
                                   strict=True)]
  return reporting.csv_text(header, rows)


def _overlay_producer(ex: dict[str, Any], names: tuple[str, ...], stage: str,
                      threshold: float):
  def produce() -> bytes:
    pred = ex['probs'] >= threshold
    truth = ex['truth'] >= 0.5
    d, _ = S.dice_jaccard(pred[None], truth[None])
    fig = contours.contour_figure(
        ex['image'], pred, names, truth=truth, scores=dict(zip(names, d[0], strict=True)),
        title=f'{ex["image_id"]} ({stage})\nsolid: predicted, dashed: ground truth')
    return reporting.png(fig)
  return produce


# ---------------------------------------------------------------------------------- segment
def resolve_source(config: ml_collections.ConfigDict, workdir: epath.Path
                   ) -> tuple[epath.Path, str | None]:
  """(U-Net run, stage or None) of config.segment.source ('' = this run's train_segmenter)."""
  source = config.segment.source
  if not source:
    stages = segmentation_stages(config)
    if not stages:
      raise ValueError(
          "config.segment.source='' means this run's segmentation stage, but config.stages "
          f'{list(config.stages)} trains none: set config.segment.source to the workdir of a '
          'U-Net run (e.g. workdir/lung_heart_unet from configs/lung_heart_unet.py).')
    return epath.Path(workdir), stages[0]
  path, _, stage = str(source).partition(':')
  return epath.Path(path), stage or None


def default_splits(config: ml_collections.ConfigDict) -> list[str]:
  """config.segment.splits, or the named splits behind data.train_split and eval_splits
  ('train[:10%]' -> 'train'; 'train_holdout' -> the train split)."""
  from cxr_jax.data import pipeline
  if config.segment.splits:
    return list(config.segment.splits)
  out = []
  for split in (config.data.train_split, *config.data.eval_splits.values()):
    split = config.data.train_split if split == pipeline.HOLDOUT_SPLIT else split
    for part in split.split('+'):
      name = part.split('[')[0].strip()
      if name and name not in out:
        out.append(name)
  return out


def segment_data(segmenter: inference.Segmenter, data_cfg: ml_collections.ConfigDict,
                 splits: list[str], out_dir: epath.Path, *, batch_size: int, shard_size: int,
                 threshold: float, progress: bool = True) -> dict[str, Any]:
  """Writes (or completes) the mask cache of `splits` of `data_cfg` in `out_dir`.

  Resumable: shards already written are kept and skipped. Returns timing and counts.
  """
  from tqdm import tqdm

  from cxr_jax.data import mask_cache, pipeline
  info = segmenter.predictor.info
  h, w = segmenter.input_shape[:2]
  pp = f'decode|resize(({h}, {w}))|{info.pp_eval}'
  writer = None
  t0, images = time.time(), 0
  for split in splits:
    mask_cache.check_split_name(split)
    n, size, _ = pipeline.iterate_split(data_cfg, split, pp, batch_size=batch_size)
    if writer is None:
      writer = mask_cache.MaskCacheWriter(
          out_dir, segmenter.structures, size, shard_size=shard_size, meta={
              'threshold': threshold, 'pp': pp,
              'data': {'name': data_cfg.name, 'data_dir': data_cfg.get('data_dir')},
              'source': {'workdir': str(segmenter.workdir), 'stage': segmenter.stage}})
    elif tuple(size) != writer.image_size:
      raise ValueError(f'{data_cfg.name!r} split {split!r}: images of {size}, other splits '
                       f'{writer.image_size}.')
    todo = writer.missing_shards(split, n)
    left = sum(min(shard_size, n - k * shard_size) for k in todo)
    bar = tqdm(total=n, desc=f'segment {split}', unit='image', disable=not progress,
               initial=n - left)
    for shard in todo:
      start = shard * shard_size
      count = min(shard_size, n - start)
      _, _, batches = pipeline.iterate_split(data_cfg, split, pp, batch_size=batch_size,
                                             start=start)
      ids, masks = [], []
      for batch in batches:
        take = min(len(batch['image_id']), count - len(ids))
        probs = _probabilities(segmenter, batch['image'][:take], size, batch_size)
        ids += batch['image_id'][:take]
        masks.append(probs >= threshold)
        bar.update(take)
        if len(ids) >= count:
          break
      writer.write_shard(split, shard, n, ids, np.concatenate(masks))
      images += len(ids)
    bar.close()
    writer.finish_split(split, n)
  if writer is None:
    raise ValueError('config.segment.splits: no split to segment.')
  writer.finish()
  seconds = time.time() - t0
  return {'images': images, 'seconds': seconds,
          'images_per_second': images / seconds if seconds > 0 else None}


def _probabilities(segmenter: inference.Segmenter, x: np.ndarray, size: tuple[int, int],
                   batch_size: int) -> np.ndarray:
  """Pads the last batch to `batch_size` so one compiled program serves every batch."""
  n = len(x)
  if n < batch_size:
    x = np.concatenate([x, np.zeros((batch_size - n, *x.shape[1:]), x.dtype)])
  return segmenter.probabilities(x, size)[:n]


@STAGES.register(SEGMENT_STAGE)
def segment_stage(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """Masks of every image of config.segment.splits of config.data into the run's mask cache
  (segment/), by the U-Net of config.segment.source; process 0 alone, on its devices."""
  if is_chief():
    source, stage = resolve_source(config, workdir)
    segmenter = inference.load_segmenter(source, stage)
    splits = default_splits(config)
    out = layout.Run(workdir).mask_cache_dir
    cfg = config.segment
    result = segment_data(segmenter, config.data, splits, out, batch_size=cfg.batch_size,
                          shard_size=cfg.shard_size, threshold=cfg.threshold)
    logging.info('segment: %d images of %s (%s) in %.1fs (%.1f images/s) -> %s', result['images'],
                 config.data.name, ', '.join(splits), result['seconds'],
                 result['images_per_second'] or 0.0, out)
  if jax.process_count() > 1:  # later stages on every host read what the chief wrote
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices('segment')
