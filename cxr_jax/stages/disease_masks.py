"""Paper 002's disease-mask stages: `disease_masks` (eq. 1-3), `pseudo_disease_masks` (Table 2)
and the config of `train_dm` (eq. 4-5; the stage itself is in training.py, next to the loop).

- disease_masks: CAMs of `config.disease_masks.source_stage` (the aligned classifier) on the
  training images, upsampled to the input size P (eq. 1); per class of
  `config.disease_masks.classes`, the images labelled c with P_c >= `min_prob` (eq. 2, the
  model's probability) enter psi_c by eq. 3 (cxr_jax/attention/disease_masks.py). A class that
  no image qualifies for is logged with its number of positives and highest P_c and gets the
  `empty` fallback: 'zeros' (psi_c = 0, i.e. no attention, f' = f; default), 'positives' (the
  mask of all images labelled c, whatever P_c) or 'error' (stop).
- pseudo_disease_masks: `config.pdm.regions` (class -> names of `config.pdm.shapes`, polygons
  or rectangles in normalised coordinates of the anchor) rendered at P x P, 1 inside, 0 outside.
- Both write the same artefact (`layout.Run.disease_masks_file`): masks [K, P, P] over
  config.data.classes, the images per class, a Fig. 3 / Fig. 7-like PNG over the anchor.
- train_dm reads the artefact of `config.disease_masks.attention_from`, checks its class list
  against the run's (an error names both lists), area-resizes psi to the feature map and
  writes it into the model config (the stage's model description then holds it: the model is
  rebuilt without the artefact).
"""

import copy
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from cxr_jax import config_lib, inference, layout, reporting, xla_options
from cxr_jax.attention import disease_masks as dm
from cxr_jax.data import pipeline
from cxr_jax.models import build_model
from cxr_jax.stages.base import STAGES, is_chief

EMPTY_FALLBACKS = ('zeros', 'positives', 'error')


def _background(run: layout.Run) -> np.ndarray | None:
  return run.read_anchor()['anchor'] if run.anchor_file.exists() else None


def _padded(images: np.ndarray, size: int) -> np.ndarray:
  if len(images) == size:
    return images
  pad = np.zeros((size - len(images), *images.shape[1:]), images.dtype)
  return np.concatenate([images, pad])


@STAGES.register('disease_masks')
def disease_masks_stage(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """psi_c of eq. 3 from the CAMs of the source classifier on the training images."""
  if not is_chief():
    return
  cfg = config.disease_masks
  if cfg.empty not in EMPTY_FALLBACKS:
    raise ValueError(f'config.disease_masks.empty={cfg.empty!r}; valid: {EMPTY_FALLBACKS}')
  run = layout.Run(workdir)
  predictor = inference.load_predictor(workdir, cfg.source_stage)
  classes = list(predictor.class_names)
  masked = [c for c in cfg.classes if c in classes]
  missing = [c for c in cfg.classes if c not in classes]
  if missing:
    raise ValueError(f'config.disease_masks.classes {missing} are not classes of the model '
                     f'{classes}')
  h, w = predictor.image_shape[:2]
  k_of = {c: classes.index(c) for c in masked}
  symmetric = [c not in cfg.asymmetric for c in classes]
  kept, everyone = dm.MaskAccumulator(len(classes), (h, w), symmetric), None
  if cfg.empty == 'positives':
    everyone = dm.MaskAccumulator(len(classes), (h, w), symmetric)
  positives = np.zeros(len(classes), np.int64)
  best = np.full(len(classes), np.nan)
  bs = config.eval_batch_size
  upsample = xla_options.jit(
      lambda m: jax.image.resize(m, (m.shape[0], h, w, m.shape[-1]), 'bilinear'))
  n_images = 0
  for batch in pipeline.iterate_images(config.data, cfg.split or config.data.train_split,
                                       predictor.info.pp_eval, batch_size=bs):
    n = len(batch['image'])
    logits, inter = predictor.forward(_padded(batch['image'], bs))
    probs = np.asarray(jax.nn.sigmoid(np.asarray(logits, np.float32)))[:n]
    # Eq. 1: S_c at the feature map, upsampled to P x P (the bias, a constant, is removed by
    # the min-max normalisation of eq. 3).
    maps = np.asarray(upsample(jnp.asarray(inference.class_heatmaps(predictor, inter, 'cam'))))
    maps = maps[:n]
    labels = batch['labels']
    n_images += n
    for k in k_of.values():
      pos = labels[:, k] > 0.5
      positives[k] += int(pos.sum())
      if pos.any():
        best[k] = np.nanmax([best[k], probs[pos, k].max()])
      sel = (pos if cfg.positives_only else np.ones(n, bool)) & (probs[:, k] >= cfg.min_prob)
      kept.add(k, maps[sel, ..., k])
      if everyone is not None:
        everyone.add(k, maps[pos, ..., k])
  masks = kept.masks(cfg.threshold, cfg.binarize)
  per_class: dict[str, dict[str, Any]] = {}
  for c, k in k_of.items():
    entry = {'positives': int(positives[k]), 'images': int(kept.counts[k]),
             'max_prob': None if np.isnan(best[k]) else float(best[k])}
    if kept.counts[k] == 0:
      why = (f'disease_masks: no training image of class {c!r} has P_c >= {cfg.min_prob} '
             f'({positives[k]} images labelled {c}, highest P_c '
             f'{"n/a" if np.isnan(best[k]) else f"{best[k]:.3f}"})')
      if cfg.empty == 'error':
        raise ValueError(f'{why}; config.disease_masks.empty=\'error\'.')
      if cfg.empty == 'positives' and everyone.counts[k] > 0:
        masks[k] = everyone.masks(cfg.threshold, cfg.binarize)[k]
        entry.update(images=int(everyone.counts[k]),
                     note=f'fallback: all {everyone.counts[k]} positives (none >= {cfg.min_prob})')
      else:
        entry['note'] = 'fallback: no mask (psi = 0, f\' = f)'
      logging.warning('%s; %s.', why, entry['note'])
    entry.update(mask_mean=float(masks[k].mean()), mask_area=float((masks[k] > 0).mean()))
    per_class[c] = entry
  counts = np.full(len(classes), -1, np.int64)
  for c, k in k_of.items():
    counts[k] = per_class[c]['images']
  summary = {'kind': 'cam', 'source_stage': cfg.source_stage, 'num_images': n_images,
             'min_prob': cfg.min_prob, 'positives_only': cfg.positives_only,
             'asymmetric': list(cfg.asymmetric), 'threshold': cfg.threshold,
             'binarize': cfg.binarize, 'empty': cfg.empty, 'per_class': per_class}
  _write(run, 'disease_masks', masks, classes, counts, summary,
         f'Disease masks (eq. 3) from {cfg.source_stage}: T={cfg.threshold}'
         f'{" binarised" if cfg.binarize else ""}; n = images with P_c >= {cfg.min_prob}')
  logging.info('disease_masks: images per mask %s (of %d training images).',
               {c: e['images'] for c, e in per_class.items()}, n_images)


def _write(run: layout.Run, stage: str, masks: np.ndarray, classes: list[str],
           counts: np.ndarray, summary: dict[str, Any], title: str) -> None:
  figure = reporting.disease_masks_figure(
      masks, classes, [None if n < 0 else int(n) for n in counts], _background(run), title)
  arrays = {'masks': masks.astype(np.float32), 'classes': np.asarray(classes),
            'counts': counts, 'kind': np.asarray(summary['kind'])}
  run.write_disease_masks(stage, arrays, summary, reporting.png(figure))


@STAGES.register('pseudo_disease_masks')
def pseudo_disease_masks_stage(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """Pseudo-disease masks (paper 002, 4.4): regions of config.pdm drawn at the input size."""
  if not is_chief():
    return
  run = layout.Run(workdir)
  info = inference.read_model_info(run.stage_dir(config.disease_masks.source_stage))
  classes = list(config.data.classes)
  size = tuple(info.image_shape[:2])
  regions = {c: tuple(v) for c, v in config.pdm.regions.items()}
  shapes = {n: tuple(v) for n, v in config.pdm.shapes.items()}
  masks = dm.render_pseudo_masks(regions, shapes, classes, size)
  counts = np.full(len(classes), -1, np.int64)
  per_class = {c: {'regions': list(regions[c]), 'mask_mean': float(masks[classes.index(c)].mean()),
                   'mask_area': float((masks[classes.index(c)] > 0).mean())} for c in regions}
  summary = {'kind': 'pseudo', 'per_class': per_class, 'size': list(size)}
  _write(run, 'pseudo_disease_masks', masks, classes, counts, summary,
         'Pseudo-disease masks (regions of config.pdm, 1 inside, 0 outside)')
  logging.info('pseudo_disease_masks: %s', {c: round(v['mask_area'], 3)
                                            for c, v in per_class.items()})


def feature_size(model_cfg: ml_collections.ConfigDict, image_shape: tuple[int, ...],
                 num_classes: int) -> tuple[int, int]:
  """(h, w) of the last feature map of `model_cfg` for inputs `image_shape`; nothing runs."""
  cfg = copy.deepcopy(model_cfg)
  with cfg.unlocked():
    cfg.head = 'gap_dense'
    cfg.disease_masks = ()
  model = build_model(cfg, num_classes=num_classes)
  x = jnp.zeros((1, *image_shape))
  out = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x,
                                                      return_features=True)[0])
  return tuple(int(d) for d in out[1].shape[1:3])


def dm_train_config(config: ml_collections.ConfigDict, workdir: epath.Path
                    ) -> ml_collections.ConfigDict:
  """The effective config of train_dm: stage_overrides.train_dm plus psi in the model."""
  cfg = copy.deepcopy(config_lib.stage_config(config, 'train_dm'))
  run = layout.Run(workdir)
  source = config.disease_masks.attention_from
  found = run.read_disease_masks(source)
  classes = list(cfg.data.classes)
  if found['classes'] != classes:
    raise ValueError(
        f'{run.disease_masks_file(source)}: the disease masks are for the classes '
        f'{found["classes"]}, but this run classifies {classes} (config.data.classes); '
        'regenerate the masks for these classes.')
  init_stage = cfg.init_from.stage
  if not init_stage:
    raise ValueError("config.stage_overrides.train_dm.init_from.stage is empty: DM attention "
                     "retrains a classifier (paper 002: 'train_classifier').")
  info = inference.read_model_info(run.stage_dir(init_stage))
  h, w = feature_size(cfg.model, info.image_shape, len(classes))
  psi = dm.area_resize(found['masks'], (h, w)).transpose(1, 2, 0)
  with cfg.unlocked():
    cfg.model.head = 'disease_masks'
    cfg.model.disease_masks = tuple(tuple(tuple(float(v) for v in row_k) for row_k in row)
                                    for row in psi)
  logging.info('train_dm: disease masks of %s (%s) resized to the %d x %d feature map.',
               source, str(found['kind']), h, w)
  return cfg


def report_section(config: ml_collections.ConfigDict, run: layout.Run,
                   results: dict[str, dict[str, Any]], files: dict[epath.Path, Any]) -> str:
  """Paper 002's part of the report: Table 4 (AUROC on the box classes), the anchor, the
  alignment (error before/after, Fig. 4) and the disease masks (images per class, Fig. 3/7).
  Empty for runs of other papers."""
  if 'disease_masks' not in config and 'align' not in config:
    return ''
  from cxr_jax.labels import BOX_CLASSES
  lines = ['', '## Table 4: AUROC on the eight classes with boxes (paper 002)', '',
           reporting.box_class_auroc_markdown(results, BOX_CLASSES), '']
  if run.anchor_file.exists():
    anchor = run.read_anchor()
    files[run.report_file('anchor')] = run.anchor_png.read_bytes()
    used, asked = len(anchor['image_ids']), anchor['requested']
    lines += ['## Anchor image', '',
              f'The mean of {used} randomly drawn "No Finding" training images'
              + (f' (asked for {asked}: the split has no more)' if used < asked else '') + '.',
              '', f'![anchor]({run.report_file("anchor").name})', '']
  summary = run.read_align_summary()
  if summary is not None:
    files[run.report_file('alignment')] = run.align_file('align', 'figure').read_bytes()
    loss = summary['loss_network']
    lines += ['## Alignment module', '', f'Perceptual loss network: `{loss["source"]}` '
              f'({loss["kind"]}).', '', reporting.alignment_markdown(summary),
              f'![Fig. 4: original (a) and aligned (b) images; red: the anchor\'s edges]'
              f'({run.report_file("alignment").name})', '']
  for stage in ('disease_masks', 'pseudo_disease_masks'):
    found = run.read_disease_masks_summary(stage)
    if found is None:
      continue
    name = f'{stage}.png'
    files[run.report_file('disease_masks') / name] = run.disease_masks_file(stage, 'png') \
        .read_bytes()
    what = ('Disease masks (eq. 3; N_c = images with P_c >= '
            f'{found.get("min_prob")} among the images labelled c)' if found['kind'] == 'cam'
            else 'Pseudo-disease masks (regions of config.pdm)')
    lines += [f'## {what}', '']
    if found['kind'] == 'cam':
      lines += [reporting.disease_masks_markdown(found)]
    lines += [f'![{stage}]({run.report_file("disease_masks").name}/{name})', '']
  return '\n'.join(lines)
