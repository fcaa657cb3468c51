"""The training loop: sharded train step, periodic evaluation, checkpoints and logs.

The loop does not know which paper it runs: the config names the model, loss, optimiser and
data, and `train_and_evaluate` wires them together. One step is `jax.jit` of a `jax.shard_map`
over the `data` mesh axis: each device computes the gradient of the globally averaged loss on
its shard, BatchNorm averages its batch statistics over `data`, and the optimiser update runs
on the replicated, identical gradients.
"""

import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions
from etils import epath
from flax import struct
from jax import lax
from jax.sharding import PartitionSpec as P

from cxr_jax import checkpoints, evaluate, losses, optim, parallel
from cxr_jax.data import pipeline
from cxr_jax.evaluators import EVALUATORS
from cxr_jax.io_utils import atomic_write_json
from cxr_jax.models import build_model

MODEL_INFO = 'model.json'


@struct.dataclass
class TrainState:
  """Everything a step changes. Replicated over the `data` axis."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  def variables(self) -> dict[str, Any]:
    v = {'params': self.params}
    if self.batch_stats:
      v['batch_stats'] = self.batch_stats
    return v


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       image_shape: tuple[int, ...], key: jax.Array,
                       mesh: jax.sharding.Mesh) -> TrainState:
  """Initialises parameters for images of `image_shape` [H, W, C], replicated over `mesh`."""

  @functools.partial(jax.jit, out_shardings=parallel.replicated(mesh))
  def init(key):
    variables = model.init({'params': key, 'dropout': key}, jnp.zeros((1, *image_shape)),
                           train=False)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params))

  return init(key)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    loss_fn: losses.LossFn, mesh: jax.sharding.Mesh
                    ) -> Callable[[TrainState, dict[str, jax.Array], jax.Array],
                                  tuple[TrainState, dict[str, jax.Array]]]:
  """Returns jit(step)(state, batch, key) -> (state, metrics); the state is donated.

  `batch` holds global arrays 'image' [B, H, W, C] and 'labels' [B, K] sharded over `data`.
  """
  axis = parallel.DATA_AXIS

  def per_device(params, batch_stats, images, labels, key):
    key = jax.random.fold_in(key, lax.axis_index(axis))

    def loss_of(params):
      variables = {'params': params}
      if batch_stats:
        variables['batch_stats'] = batch_stats
      logits, updates = model.apply(variables, images, train=True, mutable=['batch_stats'],
                                    rngs={'dropout': key})
      # Differentiate the pmean'd loss: the gradient w.r.t. the replicated parameters is then
      # the global-batch gradient (a local loss would come back summed over `data`).
      loss = lax.pmean(jnp.mean(loss_fn(logits, labels)), axis)
      return loss, updates.get('batch_stats', {})

    (loss, new_stats), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
    return loss, grads, new_stats

  sharded_grads = jax.shard_map(
      per_device, mesh=mesh, in_specs=(P(), P(), P(axis), P(axis), P()),
      out_specs=(P(), P(), P()))

  @functools.partial(jax.jit, donate_argnums=(0,))
  def step(state: TrainState, batch: dict[str, jax.Array], key: jax.Array):
    key = jax.random.fold_in(key, state.step)
    loss, grads, batch_stats = sharded_grads(state.params, state.batch_stats, batch['image'],
                                             batch['labels'], key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    return new_state, {'loss': loss, 'grad_norm': optax.global_norm(grads)}

  return step


def make_predict_fn(model: nn.Module) -> Callable[[Any, jax.Array], jax.Array]:
  """(variables, images [B, H, W, C]) -> sigmoid probabilities [B, K]."""
  return lambda variables, images: jax.nn.sigmoid(model.apply(variables, images, train=False))


def num_train_steps(config: ml_collections.ConfigDict) -> int:
  """config.num_train_steps if > 0, else config.num_epochs over the (filtered) train split."""
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  if config.num_epochs <= 0:
    raise ValueError('Set config.num_train_steps or config.num_epochs to a positive number.')
  n = pipeline.make_eval_iter(config.data, config.data.train_split,
                              global_batch_size=config.batch_size).num_examples
  return max(1, math.ceil(config.num_epochs * n * jax.process_count() / config.batch_size))


def _scalars(prefix: str, metrics: dict[str, Any]) -> dict[str, float]:
  out = {}
  for k, v in metrics.items():
    if isinstance(v, dict):
      out.update(_scalars(f'{prefix}{k}/', v))
    elif isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
      out[f'{prefix}{k}'] = float(v)
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, stage_dir: epath.Path) -> None:
  """Trains `config.model` on `config.data`, resuming from `stage_dir` if it holds checkpoints.

  Writes `stage_dir/checkpoints/` (last N), `stage_dir/best/` (best by
  `config.best_metric` on the validation split) and TensorBoard events in `stage_dir/logs/`.
  """
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  class_names = tuple(config.data.classes)
  model = build_model(config.model, num_classes=len(class_names), dtype=config.dtype,
                      bn_axis_name=parallel.DATA_AXIS)
  total_steps = num_train_steps(config)
  tx = optim.build_optimizer(config.optimizer, total_steps)
  step_fn = make_train_step(model, tx, losses.get_loss(config.loss), mesh)
  evaluator = EVALUATORS.get(config.evaluator)(
      make_predict_fn(model), config.data, config.data.eval_splits.validation,
      batch_size=config.eval_batch_size, mesh=mesh, class_names=class_names,
      threshold=config.threshold)

  root_key = jax.random.key(config.seed)
  init_key, step_key = jax.random.split(root_key)
  ckpt = checkpoints.Checkpoints(stage_dir, keep=config.keep_checkpoints)
  first = True
  start_step, meta = 0, {'best_value': None, 'best_step': None, 'plateau': {}}
  train_iter = None
  state = None
  writer = metric_writers.create_default_writer(
      str(stage_dir / 'logs'), just_logging=jax.process_index() > 0)
  try:
    latest = ckpt.latest_step()
    # The first batch's shape sizes the model; resuming rebuilds the iterator at the step.
    probe = next(pipeline.make_train_iter(config.data, global_batch_size=config.batch_size,
                                          seed=config.seed, start_step=0))
    image_shape = tuple(int(d) for d in probe['image'].shape[1:])
    state = create_train_state(model, tx, image_shape, init_key, mesh)
    if jax.process_index() == 0:
      # What later stages and `predict` need to rebuild the model without the data.
      atomic_write_json(str(stage_dir / MODEL_INFO), {
          'image_shape': image_shape, 'class_names': class_names,
          'model': config.model.to_dict(), 'dtype': config.dtype,
          'threshold': config.threshold, 'pp_eval': config.data.pp_eval})
    if latest is not None:
      state, meta = ckpt.restore_latest(state)
      start_step = int(state.step)
      logging.info('Resumed %s from step %d.', stage_dir, start_step)
    plateau = optim.PlateauState(**meta['plateau'])
    train_iter = pipeline.make_train_iter(config.data, global_batch_size=config.batch_size,
                                          seed=config.seed, start_step=start_step)
    report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
    logging.info('Training %s for %d steps (global batch %d on %d devices).',
                 config.model.name, total_steps, config.batch_size, mesh.devices.size)
    t0, t_step = time.time(), start_step
    for step in range(start_step + 1, total_steps + 1):
      batch = parallel.to_global(next(train_iter), mesh)
      state, train_metrics = step_fn(state, batch, step_key)
      if first:
        first = False
        logging.info('First step compiled and ran in %.1fs.', time.time() - t0)
        t0, t_step = time.time(), step
      report(step, time.time())
      if step % config.log_every_steps == 0 or step == total_steps:
        scalars = {f'train/{k}': float(v) for k, v in jax.device_get(train_metrics).items()}
        scalars['train/lr_plateau_scale'] = optim.plateau_scale(state.opt_state)
        writer.write_scalars(step, scalars)
        rate = (step - t_step) / max(time.time() - t0, 1e-9)
        eta = (total_steps - step) / rate if rate > 0 else float('nan')
        logging.info('step %d/%d loss %.4f | %.2f steps/s, ETA %s', step, total_steps,
                     scalars['train/loss'], rate, time.strftime('%H:%M:%S', time.gmtime(eta))
                     if math.isfinite(eta) else '?')
      is_eval = step % config.eval_every_steps == 0 or step == total_steps
      is_best = False
      if is_eval:
        metrics, _ = evaluator.run(state.variables())
        value = evaluate.select_metric(metrics, config.best_metric)
        writer.write_scalars(step, _scalars('validation/', metrics))
        is_best = value.is_better(meta['best_value'])
        if is_best:
          meta.update(best_value=value.value, best_step=step)
        auroc = metrics['mean_auroc']
        logging.info('step %d validation %s=%.4f mean_auroc=%s (best %.4f at step %d)', step,
                     config.best_metric, value.value,
                     'n/a' if auroc is None else f'{auroc:.4f}', meta['best_value'],
                     meta['best_step'])
        plateau_cfg = config.optimizer.plateau
        if plateau_cfg.enabled:
          pvalue = evaluate.select_metric(metrics, plateau_cfg.metric)
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
      if step % config.checkpoint_every_steps == 0 or step == total_steps or is_best:
        ckpt.save(step, state, dict(meta), best=is_best)
    writer.flush()
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()


def restore_best_variables(config: ml_collections.ConfigDict,
                           stage_dir: epath.Path) -> tuple[nn.Module, dict[str, Any]]:
  """(model, variables) of the best checkpoint written by `train_and_evaluate`."""
  info_path = stage_dir / MODEL_INFO
  if not info_path.exists():
    raise FileNotFoundError(f'{info_path} not found: run the training stage first.')
  image_shape = tuple(json.loads(info_path.read_text())['image_shape'])
  mesh = parallel.make_mesh()
  model = build_model(config.model, num_classes=len(config.data.classes), dtype=config.dtype)
  tx = optim.build_optimizer(config.optimizer, 1)
  target = create_train_state(model, tx, image_shape, jax.random.key(0), mesh)
  ckpt = checkpoints.Checkpoints(stage_dir, keep=config.keep_checkpoints)
  try:
    state, _ = ckpt.restore_best(target)
  finally:
    ckpt.close()
  return model, state.variables()
