"""Training loop of paper 002's alignment module (section 3.2, Fig. 5).

A regressor (ResNet-18 by default) maps each training image I to (s_x, s_y, t_x, t_y, theta);
the step warps I by eq. 6, smooths it (B(G(.))) and minimises L_e (eq. 8) + L_p (eq. 7)
against the anchor image A, with the perceptual features from a frozen loss network (the
ResNet-50 trained on the data first). The step is data parallel like cxr_jax/train_step.py:
`jax.jit` of a `jax.shard_map` over `data`, the loss averaged over `data` before
differentiation, BatchNorm statistics averaged over `data`; the loss network's variables and the
anchor's features are arguments, replicated, never trained.

Degenerate alignments stop the run: after every step the transforms of the batch are checked
(non-finite values, |s| < config.align.min_scale or > max_scale). A checkpoint is only written
once the NEXT step has shown that its parameters still give sane transforms (the copy waits one
step; at the end one extra forward pass checks the last parameters), so the checkpoints on
disk are always good and `AlignmentDiverged` names the last one.
"""

import copy
import functools
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
from clu import metric_writers
from etils import epath
from jax import lax
from jax.sharding import PartitionSpec as P

from cxr_jax import checkpoints, layout, optim, parallel, xla_options
from cxr_jax.attention import alignment as al
from cxr_jax.data import pipeline
from cxr_jax.inference import run as run_lib
from cxr_jax.models import build_model
from cxr_jax.train_step import TrainState, create_train_state


class AlignmentDiverged(RuntimeError):
  """The alignment collapsed (scale -> 0, NaN, ...); the message names the step, the cause and
  the last good checkpoint kept on disk."""


def build_regressor(align_cfg: ml_collections.ConfigDict, bn_axis_name: str | None = None
                    ) -> nn.Module:
  """The alignment network: `config.align.model` with a 5-output head."""
  return build_model(align_cfg.model, num_classes=len(al.PARAM_NAMES), dtype='float32',
                     bn_axis_name=bn_axis_name)


def make_align_step(model: nn.Module, loss_model: nn.Module, tx: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh, *, layers: tuple[str, ...], smooth_kernel: int,
                    fill: float, reduction: str
                    ) -> Callable[..., tuple[Any, dict[str, jax.Array]]]:
  """jit(step)(state, images, anchor, anchor_features, loss_variables) -> (state, metrics).

  images: global [B, H, W, C] sharded over `data`; anchor [H, W, C]; anchor_features: the loss
  network's maps of the anchor per layer [1, h, w, c]; loss_variables: the frozen loss network.
  Metrics (global): loss, euclidean, perceptual, scale_min, scale_max, finite (1.0 / 0.0).
  """
  axis = parallel.DATA_AXIS

  def per_device(params, batch_stats, images, anchor, anchor_feats, loss_vars):
    def loss_of(params):
      out, updates = model.apply({'params': params, 'batch_stats': batch_stats}, images,
                                 train=True, mutable=['batch_stats'])
      warped = al.warp(images, al.affine_matrix(out), fill=fill)
      phi = al.smooth(warped, smooth_kernel)
      le = al.euclidean_loss(anchor, phi, reduction)
      _, inter = loss_model.apply(loss_vars, phi, train=False, mutable=['intermediates'])
      lp = al.perceptual_loss(anchor_feats, al.layer_features(inter['intermediates'], layers))
      loss = lax.pmean(jnp.mean(le + lp), axis)
      aux = (updates['batch_stats'], lax.pmean(jnp.mean(le), axis),
             lax.pmean(jnp.mean(lp), axis), out)
      return loss, aux

    (loss, (stats, le, lp, out)), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
    scales = jnp.abs(out[:, :2])
    finite = lax.pmin(jnp.all(jnp.isfinite(out)).astype(jnp.float32), axis)
    metrics = {'loss': loss, 'euclidean': le, 'perceptual': lp,
               'scale_min': lax.pmin(jnp.min(scales), axis),
               'scale_max': lax.pmax(jnp.max(scales), axis), 'finite': finite,
               **{f'mean_{n}': lax.pmean(jnp.mean(out[:, i]), axis)
                  for i, n in enumerate(al.PARAM_NAMES)}}
    return grads, stats, metrics

  sharded = jax.shard_map(per_device, mesh=mesh,
                          in_specs=(P(), P(), P(axis), P(), P(), P()),
                          out_specs=(P(), P(), P()))

  @functools.partial(xla_options.jit, donate_argnums=(0,))
  def step(state: TrainState, images, anchor, anchor_feats, loss_vars):
    grads, stats, metrics = sharded(state.params, state.batch_stats, images, anchor,
                                    anchor_feats, loss_vars)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics['grad_norm'] = optax.global_norm(grads)
    return state.replace(step=state.step + 1, params=params, batch_stats=stats,
                         opt_state=opt_state), metrics

  return step


def anchor_features(loss_model: nn.Module, loss_variables: Any, anchor: np.ndarray,
                    layers: tuple[str, ...]) -> list[jax.Array]:
  """The loss network's maps of the anchor [H, W, C], per layer [1, h, w, c]."""
  _, inter = loss_model.apply(loss_variables, jnp.asarray(anchor)[None], train=False,
                              mutable=['intermediates'])
  return al.layer_features(inter['intermediates'], layers)


def _check(metrics: dict[str, Any], cfg: ml_collections.ConfigDict) -> str | None:
  if metrics['finite'] < 1 or not math.isfinite(metrics['loss']):
    return 'non-finite transform parameters or loss (NaN or inf)'
  if metrics['scale_min'] < cfg.min_scale:
    return (f'scale {metrics["scale_min"]:.3g} < config.align.min_scale={cfg.min_scale} '
            '(the warp collapses the image)')
  if metrics['scale_max'] > cfg.max_scale:
    return f'scale {metrics["scale_max"]:.3g} > config.align.max_scale={cfg.max_scale}'
  return None


def train_alignment(config: ml_collections.ConfigDict, stage_dir: epath.Path, *,
                    anchor: np.ndarray, loss_model: nn.Module, loss_variables: Any
                    ) -> dict[str, float]:
  """Trains the alignment regressor of `config.align` in `stage_dir`, resuming from its
  checkpoints; writes its model description (inference restores it like any stage's model).

  Returns the wall time split {'setup', 'steps', 'total'} in seconds.
  Raises AlignmentDiverged on a degenerate alignment (the checkpoints kept are good ones).
  """
  t_start = time.time()
  cfg = config.align
  mesh = parallel.make_mesh()
  parallel.check_batch_size(cfg.batch_size, mesh)
  stage = layout.StageDir(stage_dir)
  data_cfg = copy.deepcopy(config.data)
  with data_cfg.unlocked():
    data_cfg.pp_train = cfg.pp
    data_cfg.extra_copies = ''
  model = build_regressor(cfg, bn_axis_name=parallel.DATA_AXIS)
  ckpt = checkpoints.Checkpoints(stage_dir, keep=config.keep_checkpoints)
  writer = metric_writers.create_default_writer(str(stage.logs_dir),
                                                just_logging=jax.process_index() > 0)
  layers = tuple(cfg.perceptual_layers)
  try:
    latest = ckpt.latest_step()
    start = latest or 0
    train_input = pipeline.make_train_iter(data_cfg, global_batch_size=cfg.batch_size,
                                           seed=config.seed, start_step=start)
    epoch_steps = train_input.num_examples_global / cfg.batch_size
    total = (int(cfg.num_train_steps) if cfg.num_train_steps > 0
             else max(1, math.ceil(cfg.num_epochs * epoch_steps)))
    tx = optim.build_optimizer(cfg.optimizer, total, epoch_steps)
    first = next(train_input)
    image_shape = tuple(int(d) for d in first['image'].shape[1:])
    if image_shape != tuple(anchor.shape):
      raise ValueError(f'config.align.pp gives images of shape {image_shape}, the anchor is '
                       f'{tuple(anchor.shape)}: preprocess both the same way.')
    state = create_train_state(model, tx, image_shape, jax.random.key(config.seed), mesh)
    state = state.replace(params=jax.device_put(al.identity_head(state.params),
                                                parallel.replicated(mesh)))
    if jax.process_index() == 0:
      info = run_lib.ModelInfo(image_shape=image_shape, class_names=al.PARAM_NAMES,
                               model=cfg.model.to_dict(), pp_eval=cfg.pp, data=config.data.name,
                               num_train_examples=train_input.num_examples_global)
      stage.write_model_info({**info.to_json(), 'optimizer': cfg.optimizer.to_dict()})
    if latest is not None:
      state, _ = ckpt.restore_latest(state)
      logging.info('Resumed the alignment of %s from step %d.', stage_dir, start)
    repl = parallel.replicated(mesh)
    loss_vars = jax.device_put(loss_variables, repl)
    anchor_dev = jax.device_put(jnp.asarray(anchor, jnp.float32), repl)
    feats = jax.device_put(anchor_features(loss_model, loss_variables, anchor, layers), repl)
    kwargs = dict(layers=layers, smooth_kernel=int(cfg.smooth_kernel), fill=float(cfg.fill),
                  reduction=cfg.euclidean_reduction)
    step_fn = make_align_step(model, loss_model, tx, mesh, **kwargs)
    batches = iter([first])
    logging.info('Training the alignment module (%s) for %d steps, batch %d.',
                 cfg.model.name, total, cfg.batch_size)
    t_loop = time.time()
    pending: tuple[int, Any] | None = None  # (step, state copy) waiting for its check
    last_good = latest
    for step in range(start + 1, total + 2):
      images = next(batches, None)
      if images is None:
        images = next(train_input)
      batch = parallel.to_global({'image': images['image']}, mesh)['image']
      probing = step == total + 1
      if probing:  # one extra step on a copy checks the last parameters (same program)
        _, metrics = step_fn(jax.tree.map(jnp.copy, state), batch, anchor_dev, feats, loss_vars)
      else:
        state, metrics = step_fn(state, batch, anchor_dev, feats, loss_vars)
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      problem = _check(metrics, cfg)
      if problem:
        where = (f'the last good checkpoint is step {last_good} in {stage.checkpoints_dir}'
                 if last_good is not None else 'no checkpoint was written')
        raise AlignmentDiverged(
            f'alignment degenerated at step {step - 1} ({problem}); stopped, {where}. '
            'Lower config.align.optimizer.learning_rate or use '
            "config.align.euclidean_reduction='mean'.")
      if pending is not None:  # its parameters gave sane transforms on this batch
        ckpt.save(pending[0], pending[1], {'last_good_step': pending[0]}, best=True)
        last_good = pending[0]
        pending = None
      if probing:
        break
      if step % cfg.log_every_steps == 0 or step == total:
        writer.write_scalars(step, {f'align/{k}': v for k, v in metrics.items()})
        logging.info('align step %d/%d loss %.4g (L_e %.4g, L_p %.4g) scale %.3f-%.3f',
                     step, total, metrics['loss'], metrics['euclidean'], metrics['perceptual'],
                     metrics['scale_min'], metrics['scale_max'])
      if step % cfg.checkpoint_every_steps == 0 or step == total:
        pending = (step, jax.tree.map(jnp.copy, state))
    timing = {'setup': t_loop - t_start, 'steps': time.time() - t_loop}
    writer.flush()
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()
  timing['total'] = time.time() - t_start
  logging.info('align: %.1fs in all (set-up %.1fs, steps %.1fs).', timing['total'],
               timing['setup'], timing['steps'])
  return timing
