"""The training loop: periodic evaluation, best-checkpoint selection, resuming, logs.

The loop does not know which paper it runs: the config names the model, loss, optimiser and
data, and `train_and_evaluate` wires them together around the data-parallel step of
cxr_jax/train_step.py.
"""

import dataclasses
import fnmatch
import itertools
import math
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from etils import epath

from cxr_jax import (
  checkpoints,
  config_lib,
  errors,
  evaluate,
  layout,
  losses,
  optim,
  parallel,
  preemption,
  xla_options,
)
from cxr_jax.data import pipeline
from cxr_jax.evaluators import EVALUATORS
from cxr_jax.inference import run as run_lib
from cxr_jax.models import build_model
from cxr_jax.train_step import TrainState, create_train_state, make_predict_fn, make_train_step


def num_train_steps(config: ml_collections.ConfigDict, epoch_steps: float) -> int:
  """config.num_train_steps if > 0, else config.num_epochs over the (filtered) train split
  (`epoch_steps`: global steps in one pass over it)."""
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  if config.num_epochs <= 0:
    raise ValueError('Set config.num_train_steps or config.num_epochs to a positive number.')
  return max(1, math.ceil(config.num_epochs * epoch_steps))


def _scalars(prefix: str, metrics: dict[str, Any]) -> dict[str, float]:
  out = {}
  for k, v in metrics.items():
    if isinstance(v, dict):
      out.update(_scalars(f'{prefix}{k}/', v))
    elif isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
      out[f'{prefix}{k}'] = float(v)
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, stage_dir: epath.Path
                       ) -> dict[str, float]:
  """Trains `config.model` on `config.data`, resuming from `stage_dir` if it holds checkpoints.

  Writes the last N checkpoints, the best one (by `config.best_metric` on the validation split),
  TensorBoard events and the model description into `stage_dir` (cxr_jax/layout.py).

  Returns where the wall time went, in seconds: {'setup' (data pipeline, model, restore),
  'steps' (the train steps with their input and logging, first compilation included),
  'evaluation', 'checkpoints', 'wrap_up' (after the last step), 'total'}; also logged.
  """
  t_start = time.time()
  timing = {'setup': 0.0, 'steps': 0.0, 'evaluation': 0.0, 'checkpoints': 0.0, 'wrap_up': 0.0}
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  stage = layout.StageDir(stage_dir)
  weights = config.init_from.checkpoint
  if weights and not layout.imported_weights_ready(weights):
    raise FileNotFoundError(
        f'config.init_from.checkpoint={weights!r}: no imported weights there. Convert the file '
        'you downloaded with `python -m cxr_jax.tools.import_weights --source=torchvision '
        f'--arch=... --input=FILE --output={weights}` (WORKSPACE.md), or train from scratch '
        "with --config.init_from.checkpoint=''.")
  class_names = config_lib.output_names(config)  # classes, or a segmenter's structures
  model = build_model(config.model, num_classes=len(class_names), dtype=config.dtype,
                      bn_axis_name=parallel.DATA_AXIS)
  output = losses.output_activation(config.loss)
  evaluator = EVALUATORS.get(config.evaluator)(
      make_predict_fn(model, output), config.data, config.data.eval_splits.validation,
      batch_size=config.eval_batch_size, mesh=mesh, class_names=class_names,
      threshold=config.threshold, threshold_rule=config.get('threshold_rule', 'max_f1'))

  root_key = jax.random.key(config.seed)
  init_key, step_key = jax.random.split(root_key)
  ckpt = checkpoints.Checkpoints(stage_dir, keep=config.keep_checkpoints)
  first = True
  meta = {'best_value': None, 'best_step': None, 'plateau': {}}
  writer = metric_writers.create_default_writer(
      str(stage.logs_dir), just_logging=jax.process_index() > 0)
  try:
    latest = ckpt.latest_step()
    start_step = latest or 0
    # The iterator starts where the run resumes; it counts the (filtered) split once, which
    # sizes epochs; its first batch sizes the model and is then trained on like every other.
    train_input = pipeline.make_train_iter(config.data, global_batch_size=config.batch_size,
                                           seed=config.seed, start_step=start_step)
    epoch_steps = train_input.num_examples_global / config.batch_size
    total_steps = num_train_steps(config, epoch_steps)
    tx = optim.build_optimizer(config.optimizer, total_steps, epoch_steps)
    step_fn = make_train_step(model, tx, losses.get_loss(config.loss), mesh,
                              target=config.data.get('target', 'labels'),
                              inputs=tuple(config.data.get('inputs', ())),
                              nan_policy=config.get('nan_policy', 'stop'),
                              cpu_fusions=tuple(config.get('cpu_fusions',
                                                           xla_options.DEFAULT_CPU_FUSIONS)))
    first_batch = next(train_input)
    train_iter = itertools.chain([first_batch], train_input)
    image_shape = tuple(int(d) for d in first_batch['image'].shape[1:])
    if config_lib.is_segmentation(config):
      _check_masks(first_batch['masks'].shape[1:], image_shape, class_names, config.data.name)
    extra_shapes = {k: tuple(first_batch[k].shape[1:]) for k in config.data.get('inputs', ())}
    state = create_train_state(model, tx, image_shape, init_key, mesh, extra_shapes)
    if jax.process_index() == 0:
      # What inference (later stages, `predict`, the viewer) needs to rebuild the model without
      # the config or the data: cxr_jax/inference/run.py's ModelInfo.
      info = run_lib.ModelInfo(
          image_shape=image_shape, class_names=class_names, model=config.model.to_dict(),
          dtype=config.dtype, threshold=config.threshold,
          threshold_rule=config.get('threshold_rule', 'max_f1'), pp_eval=config.data.pp_eval,
          data=config.data.name, num_train_examples=train_input.num_examples_global,
          inputs=extra_shapes, output=output,
          task='segmentation' if config_lib.is_segmentation(config) else 'classification')
      stage.write_model_info({**info.to_json(), 'optimizer': config.optimizer.to_dict()})
    if latest is not None:
      state, meta = ckpt.restore_latest(state)
      if int(state.step) != start_step:
        raise ValueError(f'{stage_dir}: checkpoint {latest} holds step {int(state.step)}.')
      logging.info('Resumed %s from step %d.', stage_dir, start_step)
    elif config.init_from.stage:
      state = init_from_stage(state, stage_dir.parent / config.init_from.stage,
                              config.init_from.target)
    elif config.init_from.checkpoint:
      state = init_from_checkpoint(state, model, config.init_from.checkpoint,
                                   in_channels=image_shape[-1],
                                   fresh=tuple(config.init_from.get('fresh', ())))
    plateau = optim.PlateauState(**meta['plateau'])
    report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
    logging.info('Training %s for %d steps (global batch %d on %d devices).',
                 config.model.name, total_steps, config.batch_size, mesh.devices.size)
    t0, t_step = time.time(), start_step
    t_loop = t0
    timing['setup'] = t_loop - t_start
    for step in range(start_step + 1, total_steps + 1):
      batch = parallel.to_global(next(train_iter), mesh)
      state, train_metrics = step_fn(state, batch, step_key)
      if step == total_steps:
        jax.block_until_ready(state)  # the last step's time is the loop's, not the wrap-up's
      if first:
        first = False
        logging.info('First step compiled and ran in %.1fs.', time.time() - t0)
        t0, t_step = time.time(), step
      report(step, time.time())
      is_log = step % config.log_every_steps == 0 or step == total_steps
      is_eval = step % config.eval_every_steps == 0 or step == total_steps
      is_save = step % config.checkpoint_every_steps == 0 or step == total_steps
      if is_log or is_eval or is_save:
        # Before anything is logged, evaluated or saved: a non-finite state never reaches a
        # checkpoint, least of all the best one.
        _check_finite(state, step, config.get('nan_policy', 'stop'), ckpt, stage_dir)
      # Agreeing over hosts is a collective: every log step there, every step on one host.
      signal_name = (preemption.requested_anywhere() if jax.process_count() == 1 or is_log
                     else None)
      if signal_name:
        t_ckpt = time.time()
        _check_finite(state, step, config.get('nan_policy', 'stop'), ckpt, stage_dir)
        ckpt.save(step, state, dict(meta))
        ckpt.wait()
        timing['checkpoints'] += time.time() - t_ckpt
        logging.warning('%s received: checkpoint saved at step %d/%d in %s; run the same command '
                        'again to resume.', signal_name, step, total_steps, stage_dir)
        raise errors.Preempted(
            f'{signal_name} at step {step}/{total_steps} of {stage.name}: checkpoint saved in '
            f'{stage.checkpoints_dir}; run the same command again to resume.')
      if is_log:
        scalars = {f'train/{k}': float(v) for k, v in jax.device_get(train_metrics).items()}
        scalars['train/lr_plateau_scale'] = optim.plateau_scale(state.opt_state)
        scalars['train/nonfinite_steps'] = int(state.nonfinite_steps)
        writer.write_scalars(step, scalars)
        rate = (step - t_step) / max(time.time() - t0, 1e-9)
        eta = (total_steps - step) / rate if rate > 0 else float('nan')
        logging.info('step %d/%d loss %.4f | %.2f steps/s, ETA %s', step, total_steps,
                     scalars['train/loss'], rate, time.strftime('%H:%M:%S', time.gmtime(eta))
                     if math.isfinite(eta) else '?')
      is_best = False
      if is_eval:
        t_eval = time.time()
        metrics, _ = evaluator.run(state.variables())
        scalars = getattr(evaluator, 'SCALAR_METRICS', None)
        value = evaluate.select_metric(metrics, config.best_metric, scalars=scalars)
        writer.write_scalars(step, _scalars('validation/', metrics))
        is_best = value.is_better(meta['best_value'])
        if is_best:
          meta.update(best_value=value.value, best_step=step)
        # The headline score of the task: multi-label, single-label, segmentation.
        shown = next((k for k in ('mean_auroc', 'auroc', 'mean_dice') if k in metrics),
                     'mean_auroc')
        score = metrics.get(shown)
        logging.info('step %d validation %s=%.4f %s=%s (best %.4f at step %d)', step,
                     config.best_metric, value.value, shown,
                     'n/a' if score is None else f'{score:.4f}', meta['best_value'],
                     meta['best_step'])
        plateau_cfg = config.optimizer.plateau
        if plateau_cfg.enabled:
          pvalue = evaluate.select_metric(metrics, plateau_cfg.metric, scalars=scalars)
          plateau, factor = optim.plateau_update(
              plateau, pvalue.value, mode='max' if pvalue.higher_is_better else 'min',
              patience=plateau_cfg.patience, factor=plateau_cfg.factor,
              cooldown=plateau_cfg.cooldown, max_reductions=plateau_cfg.max_reductions)
          if factor is not None:
            scale = optim.plateau_scale(state.opt_state) * factor
            state = state.replace(opt_state=optim.set_plateau_scale(state.opt_state, scale))
            logging.info('Plateau on %s: learning rate x%g (scale now %g).',
                         plateau_cfg.metric, factor, scale)
          meta['plateau'] = dataclasses.asdict(plateau)
        timing['evaluation'] += time.time() - t_eval
      if is_save or is_best:
        t_ckpt = time.time()
        ckpt.save(step, state, dict(meta), best=is_best)
        timing['checkpoints'] += time.time() - t_ckpt
    t_end = time.time()
    # Steps run asynchronously (their time shows wherever a value is read), so the steps' share
    # is the loop's wall time less the evaluations and checkpoint saves.
    timing['steps'] = t_end - t_loop - timing['evaluation'] - timing['checkpoints']
    writer.flush()
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()
  timing['wrap_up'] = time.time() - t_end
  timing['total'] = time.time() - t_start
  logging.info('%s: %.1fs in all: set-up %.1fs, steps %.1fs, evaluation %.1fs, checkpoints '
               '%.1fs, wrap-up %.1fs.', stage.name, timing['total'], timing['setup'],
               timing['steps'], timing['evaluation'], timing['checkpoints'], timing['wrap_up'])
  return timing


def _check_finite(state: TrainState, step: int, policy: str, ckpt: checkpoints.Checkpoints,
                  stage_dir: epath.Path) -> None:
  """Raises NonFiniteError (policy 'stop') naming the first non-finite step and the last good
  checkpoint, which is kept; logs the steps skipped so far (policy 'skip')."""
  first = int(state.first_nonfinite_step)
  if first < 0:
    return
  if policy == 'skip':
    logging.warning('step %d: %d step(s) with a non-finite loss or gradient skipped so far (the '
                    'first at step %d).', step, int(state.nonfinite_steps), first)
    return
  ckpt.wait()
  latest, best = ckpt.latest_step(), ckpt.best_step()
  where = layout.StageDir(stage_dir).checkpoints_dir
  kept = (f'the last good checkpoint is step {latest} in {where} (best: step {best})'
          if latest is not None else 'no checkpoint was saved before it')
  raise errors.NonFiniteError(
      f'non-finite loss or gradient at step {first}: training stopped; {kept}. Lower the '
      'learning rate, check the data, or set config.nan_policy=skip to skip such steps.')
def _check_masks(mask_shape: tuple[int, ...], image_shape: tuple[int, ...],
                 structures: tuple[str, ...], data: str) -> None:
  """A segmenter's target masks [H, W, K] must match the images and config.data.structures."""
  want = (*image_shape[:2], len(structures))
  if tuple(mask_shape) != want:
    raise ValueError(
        f'{data!r}: training masks of shape {tuple(mask_shape)} after preprocessing, expected '
        f'{want}: the image size {tuple(image_shape[:2])} and one channel per structure of '
        f'config.data.structures = {list(structures)}.')


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  return {jax.tree_util.keystr(p): tuple(x.shape)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def init_from_checkpoint(state: TrainState, model: nn.Module, directory: str, *,
                         in_channels: int, fresh: tuple[str, ...] = ()) -> TrainState:
  """Loads imported weights (`python -m cxr_jax.tools.import_weights` output) into `state`.

  Strict like the importer: every leaf must come from the checkpoint with its shape, except
  - the classifier head, which keeps this run's initialisation when the checkpoint's head was
    initialised at import (`head_paths`), has another number of classes, or is another head
    (the checkpoint's head leaves that this model lacks are dropped: ImageNet `fc` -> space
    attention head);
  - leaves matching a `fresh` glob pattern ('params/*/se/*': SE gates an ImageNet ResNet lacks),
    which keep this run's initialisation and need not be in the checkpoint.
  """
  from cxr_jax import pretrained
  imported_model, imported = pretrained.load_checkpoint(directory)
  meta = pretrained.read_meta(directory)
  fresh_vars = {'params': jax.device_get(state.params),
                'batch_stats': jax.device_get(state.batch_stats)}
  ours, theirs = pretrained.tree_shapes(fresh_vars), pretrained.tree_shapes(imported)
  head = pretrained.classifier_paths(model.clone(bn_axis_name=None), in_channels)
  differing = {p for p in head if ours.get(p) != theirs.get(p)}
  their_head = pretrained.classifier_paths(imported_model, in_channels)
  imported = _drop_paths(imported, [p for p in their_head if p not in ours])
  matched = sorted(p for p in ours if any(fnmatch.fnmatch(p, f) for f in fresh))
  unmatched = [f for f in fresh if not any(fnmatch.fnmatch(p, f) for p in ours)]
  if unmatched:
    raise ValueError(f'config.init_from.fresh: {unmatched} match no variable of the model '
                     "(paths look like 'params/layer1_0/se/fc1/kernel').")
  skip = tuple(sorted(set(meta.get('head_paths', [])) | differing | set(matched)))
  merged = pretrained.merge_pretrained(fresh_vars, imported, skip=skip)
  sharding = jax.tree.leaves(state.params)[0].sharding
  logging.info('Initialised the model from %s (kept this run\'s initialisation for %d leaves: '
               '%s%s).', directory, len(skip), ', '.join(skip[:6]), ' ...' if len(skip) > 6
               else '')
  return state.replace(params=jax.device_put(merged['params'], sharding),
                       batch_stats=jax.device_put(merged.get('batch_stats', {}), sharding))


def _drop_paths(tree: dict, paths: list[str]) -> dict:
  """`tree` without the leaves at `paths` (and sub-dicts left empty)."""
  import flax
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep='/')
  return flax.traverse_util.unflatten_dict({k: v for k, v in flat.items() if k not in paths},
                                           sep='/')


def init_from_stage(state: TrainState, source_dir: epath.Path, target: str) -> TrainState:
  """Copies the best variables of an earlier stage into `state.params[target]` (and stats), or
  into the whole model when `target` is '' (e.g. paper 001's stage 2 continuing stage 1).

  Strict: every parameter and statistic of the target subtree must come from the source with
  the same shape; the error lists what is missing, unexpected or mis-shaped.
  """
  info = run_lib.read_model_info(source_dir)
  model = run_lib.build(info)
  variables, _ = checkpoints.restore_variables(
      source_dir, run_lib.abstract_variables(model, info.image_shape, info.inputs))
  new = {}
  for collection in ('params', 'batch_stats'):
    dest = getattr(state, collection)
    src = variables.get(collection, {})
    if target and target not in dest:
      if src:
        raise ValueError(f'init_from: the model has no {collection} subtree {target!r} to load '
                         f'{source_dir} into; top-level names: {sorted(dest)}')
      continue
    into = dest[target] if target else dest
    want, got = _shapes(into), _shapes(src)
    if want != got:
      missing = sorted(set(want) - set(got))
      unexpected = sorted(set(got) - set(want))
      shapes = sorted(k for k in set(want) & set(got) if want[k] != got[k])
      raise ValueError(
          f'init_from {source_dir} -> {collection}[{target or "<all>"!r}] does not match: '
          f'missing {missing[:10]}, unexpected {unexpected[:10]}, wrong shape '
          f'{[(k, got[k], want[k]) for k in shapes[:10]]}')
    if not want:
      continue
    sharding = jax.tree.leaves(into)[0].sharding
    loaded = jax.device_put(src, sharding)
    new[collection] = {**dest, target: loaded} if target else loaded
  logging.info('Initialised %s from the best checkpoint of %s.', target or 'the model',
               source_dir)
  return state.replace(**new)
