"""Paper 002's alignment stages: `anchor` (the mean normal chest) and `align` (the module).

- anchor: the mean of N (config.align.anchor_images, paper: 2,000) randomly drawn 'No Finding'
  training images, preprocessed by config.align.pp (the alignment network's input, P x P x C),
  written as an array and a PNG. With fewer normal images than N it uses all of them and says
  so (log and report); with none it stops.
- align: trains the regressor (cxr_jax/alignment_train.py) against the anchor with the frozen
  loss network of config.align.loss_network, then runs it over every split the run reads
  (train, the eval splits, the localisation split) and writes one transform per image id
  (`layout.Run.align_transforms_file`). Later stages read aligned data through the `align`
  preprocessing op (cxr_jax/data/align_ops.py) in their pp strings. It also writes the
  anchor-to-image error before/after on the validation split and a Fig. 4-like figure.

The loss network (config.align.loss_network): a training stage of this run (default
'train_loss_network', the ResNet-50 trained first on the unaligned data: "pretrained on the
ChestX-ray14 dataset"), the folder of a training stage of another run, or an imported-weights
folder (`python -m cxr_jax.tools.import_weights`, e.g. ImageNet: a labelled deviation, logged
and written to alignment.json).
"""

import copy
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from cxr_jax import alignment_train, inference, layout, reporting, xla_options
from cxr_jax.attention import alignment as al
from cxr_jax.data import pipeline
from cxr_jax.stages.base import STAGES, is_chief


def _data_with_pp(config: ml_collections.ConfigDict, pp: str) -> ml_collections.ConfigDict:
  data = copy.deepcopy(config.data)
  with data.unlocked():
    data.pp_eval = pp
    data.pp_train = pp
  return data


@STAGES.register('anchor')
def anchor_stage(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """The anchor image A: the mean of N random 'No Finding' training images (paper 002, 3.2)."""
  if not is_chief():
    return
  cfg = config.align
  data = _data_with_pp(config, cfg.pp)
  normal = pipeline.split_image_ids(data, config.data.train_split, no_finding_only=True)
  if not normal:
    raise ValueError(f'anchor: no "No Finding" image in {config.data.name!r} split '
                     f'{config.data.train_split!r}; the anchor needs normal images.')
  n = int(cfg.anchor_images)
  if len(normal) < n:
    logging.warning('anchor: config.align.anchor_images=%d but the split %r has only %d '
                    '"No Finding" images; the anchor is the mean of all %d.', n,
                    config.data.train_split, len(normal), len(normal))
  rng = np.random.default_rng(cfg.anchor_seed)
  chosen = sorted(rng.choice(len(normal), size=min(n, len(normal)), replace=False).tolist())
  ids = [normal[i] for i in chosen]
  total, count = None, 0
  for batch in pipeline.iterate_images(data, config.data.train_split, cfg.pp, ids,
                                       batch_size=config.eval_batch_size):
    s = batch['image'].astype(np.float64).sum(axis=0)
    total = s if total is None else total + s
    count += len(batch['image'])
  anchor = (total / count).astype(np.float32)
  png = reporting.png(reporting.anchor_figure(anchor, count, n))
  layout.Run(workdir).write_anchor(anchor, ids, n, png)
  logging.info('anchor: mean of %d "No Finding" images (asked for %d), shape %s.', count, n,
               anchor.shape)


def loss_network(config: ml_collections.ConfigDict, workdir: epath.Path
                 ) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
  """(model, variables, description) of the frozen network of the perceptual loss."""
  source = config.align.loss_network
  run = layout.Run(workdir)
  if not source:
    raise ValueError('config.align.loss_network is empty: name a training stage of this run, '
                     "another run's stage folder or an imported-weights folder.")
  if source in config.stages or run.stage(source).has_model():
    path = run.stage_dir(source)
  else:
    path = epath.Path(source)
  if layout.imported_weights_ready(path):
    from cxr_jax import pretrained
    model, variables = pretrained.load_checkpoint(path)
    logging.warning('align: the perceptual loss uses imported weights %s, not a network '
                    'trained on the data (a deviation from paper 002).', path)
    return model, variables, {'source': str(path), 'kind': 'imported weights (deviation)'}
  if not layout.StageDir(path).has_model():
    raise FileNotFoundError(
        f'config.align.loss_network={source!r}: {path} holds neither a trained stage '
        '(a model description) nor imported weights; train the loss network first '
        "(stage 'train_loss_network') or point to one.")
  model, variables, info = inference.restore_model(path)
  return model, variables, {'source': str(path), 'kind': 'trained on the data',
                            'model': info.model_name}


def _regress(model: nn.Module, variables: dict[str, Any], batch_size: int):
  @xla_options.jit
  def fn(x):
    return model.apply(variables, x, train=False)
  return lambda x: np.asarray(fn(jnp.asarray(x)), np.float64)


def _splits(config: ml_collections.ConfigDict, data: ml_collections.ConfigDict) -> list[str]:
  wanted = [config.data.train_split, *config.data.eval_splits.values()]
  if 'localize' in config.stages:
    wanted.append(config.localize.split)
  builder = pipeline.get_builder(data.name, data.get('data_dir'))
  return [s for s in dict.fromkeys(wanted) if s in builder.info.splits]


@STAGES.register('align')
def align_stage(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """Trains the alignment module, then writes every image's transform, the error before/after
  and Fig. 4."""
  cfg = config.align
  run = layout.Run(workdir)
  stage_dir = run.stage_dir('align')
  anchor = run.read_anchor()['anchor']
  loss_model, loss_vars, loss_info = loss_network(config, workdir)
  timing = alignment_train.train_alignment(config, stage_dir, anchor=anchor,
                                           loss_model=loss_model, loss_variables=loss_vars)
  if not is_chief():
    return
  model, variables, _ = inference.restore_model(stage_dir)
  regress = _regress(model, variables, config.eval_batch_size)
  data = _data_with_pp(config, cfg.pp)
  ids, splits, params, seen = [], [], [], set()
  error_split = config.data.eval_splits.get('validation', config.data.train_split)
  errors = {'before': {'sharp': [], 'smoothed': []}, 'after': {'sharp': [], 'smoothed': []}}
  shown: dict[str, list] = {'ids': [], 'original': [], 'aligned': []}
  anchor_j = jnp.asarray(anchor)
  kernel = int(cfg.smooth_kernel)
  pixels = anchor.shape[0] * anchor.shape[1]
  for split in _splits(config, data):
    for batch in pipeline.iterate_images(data, split, cfg.pp, batch_size=config.eval_batch_size):
      p = regress(batch['image'])
      problem = al.degenerate(p, cfg.min_scale, cfg.max_scale)
      if problem:
        raise alignment_train.AlignmentDiverged(
            f'align: the trained regressor gives a degenerate transform on split {split!r} '
            f'({problem}); transforms not written. Its checkpoints are in {stage_dir}.')
      # An image in two splits (NIH's box images are also test images) is stored once.
      new = np.asarray([i not in seen for i in batch['image_id']], bool)
      seen.update(batch['image_id'])
      ids += list(batch['image_id'][new])
      splits += [split] * int(new.sum())
      params.append(p[new])
      if split == error_split:
        x = jnp.asarray(batch['image'])
        warped = al.warp(x, al.affine_matrix(jnp.asarray(p, jnp.float32)), fill=cfg.fill)
        for key, (a, b) in (('before', (x, al.smooth(x, kernel))),
                            ('after', (warped, al.smooth(warped, kernel)))):
          errors[key]['sharp'] += list(np.asarray(al.euclidean_loss(anchor_j, a)) / pixels)
          errors[key]['smoothed'] += list(np.asarray(al.euclidean_loss(anchor_j, b)) / pixels)
        room = cfg.figure_images - len(shown['ids'])
        if room > 0:
          shown['ids'] += list(batch['image_id'][:room])
          shown['original'] += list(batch['image'][:room])
          shown['aligned'] += list(np.asarray(warped)[:room])
  params = np.concatenate(params)
  run.write_align_transforms(ids, splits, params, al.affine_matrix_np(params))
  summary = {
      'loss_network': loss_info, 'num_images': len(ids), 'splits': sorted(set(splits)),
      'error_split': error_split,
      'error': {k: {kk: float(np.mean(vv)) if vv else math.nan for kk, vv in v.items()}
                for k, v in errors.items()},
      'params': {n: {'mean': float(params[:, i].mean()), 'std': float(params[:, i].std()),
                     'min': float(params[:, i].min()), 'max': float(params[:, i].max())}
                 for i, n in enumerate(al.PARAM_NAMES)},
      'timing': timing}
  summary['error']['num_images'] = len(errors['before']['sharp'])
  figure = reporting.alignment_figure(anchor, np.asarray(shown['original']),
                                      np.asarray(shown['aligned']), shown['ids'])
  run.write_align_results(summary, reporting.png(figure))
  e = summary['error']
  logging.info('align: %d transforms written; anchor-to-image error on %s: %.4f -> %.4f '
               '(smoothed %.4f -> %.4f).', len(ids), error_split, e['before']['sharp'],
               e['after']['sharp'], e['before']['smoothed'], e['after']['smoothed'])
