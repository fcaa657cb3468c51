"""Optimisers, learning-rate schedules and the plateau controller, built from `config.optimizer`.

The optimiser is an optax chain whose last element scales updates by a `plateau_scale`
hyper-parameter kept in the optimiser state: the host lowers it after an evaluation that did not
improve the monitored metric (`ReduceLROnPlateau` semantics, paper 003), so every schedule,
plateau included, lives in the checkpointed state and survives a restart.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from cxr_jax.registry import Registry

Schedule = Callable[[jax.Array], jax.Array]
OPTIMIZERS: Registry[Callable[..., optax.GradientTransformation]] = Registry('optimizer')
SCHEDULES: Registry[Callable[..., Schedule]] = Registry('schedule')


@OPTIMIZERS.register('adam')
def _adam(learning_rate: Schedule, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-7,
          **_) -> optax.GradientTransformation:
  # eps=1e-7 is Keras's Adam default (paper 000 trained with Keras).
  return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)


@OPTIMIZERS.register('sgd')
def _sgd(learning_rate: Schedule, *, momentum: float = 0.9, nesterov: bool = False,
         **_) -> optax.GradientTransformation:
  return optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov)


@SCHEDULES.register('constant')
def _constant(base_lr: float, total_steps: int, **_) -> Schedule:
  del total_steps
  return optax.constant_schedule(base_lr)


@SCHEDULES.register('step')
def _step(base_lr: float, total_steps: int, *, boundaries: tuple[int, ...] = (),
          boundary_epochs: tuple[float, ...] = (), factor: float = 0.1,
          steps_per_epoch: float | None = None, **_) -> Schedule:
  """lr * factor**i after the i-th boundary, given in steps (`boundaries`) or in epochs
  (`boundary_epochs`, e.g. paper 001's lr/10 after 20 epochs; needs `steps_per_epoch`)."""
  del total_steps
  steps = [int(b) for b in boundaries]
  if boundary_epochs:
    if not steps_per_epoch:
      raise ValueError('config.optimizer.schedule.boundary_epochs needs the steps per epoch '
                       '(known when training on a data set)')
    steps += [round(e * steps_per_epoch) for e in boundary_epochs]
  return optax.piecewise_constant_schedule(base_lr, {b: factor for b in sorted(steps)})


@SCHEDULES.register('cosine')
def _cosine(base_lr: float, total_steps: int, *, warmup_steps: int = 0, **_) -> Schedule:
  return optax.warmup_cosine_decay_schedule(0.0, base_lr, warmup_steps, max(total_steps, 1))


def _decay_mask(kind: str) -> Callable[[Any], Any] | None:
  if kind == 'all':  # torch.optim semantics: every parameter, BN and biases included
    return None
  if kind == 'kernels':
    return lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)
  raise ValueError(f"config.optimizer.decay_mask={kind!r}; valid: 'all', 'kernels'")


def build_optimizer(opt_cfg: ml_collections.ConfigDict, total_steps: int,
                    steps_per_epoch: float | None = None) -> optax.GradientTransformation:
  """optax chain: [L2 or decoupled decay] -> optimiser(schedule) -> plateau scale.

  `opt_cfg` fields: name, learning_rate, schedule (name + kwargs), weight_decay, decoupled
  (AdamW-style decay instead of L2 added to the gradient, which is torch/Keras `weight_decay`),
  decay_mask, grad_clip_norm, frozen (parameter path prefixes such as 'backbone' that are not
  trained), lr_multipliers (optional {path prefix: factor}: updates of matching parameters are
  scaled by the factor, the longest matching prefix winning; factor 0 freezes, like `frozen`;
  a prefix that matches no parameter is an error when the optimiser is initialised, naming
  the top-level parameter names), and any optimiser kwargs in `opt_cfg.kwargs`.

  Paper 003's fine-tuning recipe (new head, faster): `lr_multipliers={'classifier_6': 10.0}`
  trains the transferred layers at the base rate and the new 2-way head at 10x (Matlab's
  WeightLearnRateFactor / BiasLearnRateFactor; the head the paper's Matlab nets call fc8 is
  `classifier_6` in our VGG, AlexNet and custom CNN, torchvision's name);
  `{'classifier_6': 10.0, '': 0.0}` would train the head alone ('' matches all).
  """
  sched_cfg = dict(opt_cfg.schedule.to_dict())
  schedule = SCHEDULES.get(sched_cfg.pop('name'))(opt_cfg.learning_rate, total_steps,
                                                  steps_per_epoch=steps_per_epoch, **sched_cfg)
  parts = []
  if opt_cfg.get('grad_clip_norm'):
    parts.append(optax.clip_by_global_norm(opt_cfg.grad_clip_norm))
  wd = opt_cfg.weight_decay
  mask = _decay_mask(opt_cfg.decay_mask)
  if wd and not opt_cfg.decoupled:
    parts.append(optax.add_decayed_weights(wd, mask))
  optimizer = OPTIMIZERS.get(opt_cfg.name)(schedule, **opt_cfg.kwargs.to_dict())
  parts.append(_decoupled(optimizer, wd, mask, schedule) if wd and opt_cfg.decoupled
               else optimizer)
  tx = optax.chain(*parts)
  frozen = tuple(opt_cfg.get('frozen', ()) or ())
  multipliers = _lr_multipliers(opt_cfg.get('lr_multipliers'))
  if frozen or 0.0 in multipliers.values():
    # Frozen parameters get no update, no decay and no optimiser state.
    tx = optax.multi_transform(
        {'train': tx, 'frozen': optax.set_to_zero()},
        functools.partial(_freeze_labels, prefixes=frozen, multipliers=multipliers))
  if any(m not in (0.0, 1.0) for m in multipliers.values()):
    # Scaling the optimiser's output scales its learning rate (SGD, momentum, Adam alike) and
    # keeps one optimiser state and one global gradient norm over all trained parameters.
    factors = sorted(set(multipliers.values()) | {1.0})
    tx = optax.chain(tx, optax.multi_transform(
        {_mult_label(m): optax.scale(m) if m else optax.set_to_zero() for m in factors},
        functools.partial(_multiplier_labels, multipliers=multipliers)))
  if multipliers:
    tx = _checking_prefixes(tx, multipliers)
  # Last, so that `plateau_scale` finds it at opt_state[-1] whatever came before.
  return optax.chain(tx, optax.inject_hyperparams(optax.scale)(step_size=1.0))


def _checking_prefixes(tx: optax.GradientTransformation, multipliers: dict[str, float]
                       ) -> optax.GradientTransformation:
  """`tx` whose init first checks that every lr_multipliers prefix matches a parameter (a
  misspelt head name would otherwise silently train at the base rate)."""
  def init(params):
    check_prefixes(params, multipliers, 'lr_multipliers')
    return tx.init(params)
  return optax.GradientTransformation(init, tx.update)


def _path_name(path: Any) -> str:
  return '/'.join(str(getattr(k, 'key', k)) for k in path)


def _matches(name: str, prefix: str) -> bool:
  return prefix == '' or name == prefix or name.startswith(prefix + '/')


def _lr_multipliers(cfg: Any) -> dict[str, float]:
  """{prefix: factor} from a dict, ConfigDict or sequence of pairs (None: no multipliers)."""
  if not cfg:
    return {}
  items = cfg.to_dict().items() if hasattr(cfg, 'to_dict') else dict(cfg).items()
  out = {}
  for prefix, factor in items:
    if float(factor) < 0:
      raise ValueError(f'config.optimizer.lr_multipliers[{prefix!r}]={factor} is negative')
    out[str(prefix).strip('/')] = float(factor)
  return out


def _multiplier(name: str, multipliers: dict[str, float]) -> float:
  """Factor of the longest prefix matching `name` (1 when none matches)."""
  best = max((p for p in multipliers if _matches(name, p)), key=len, default=None)
  return 1.0 if best is None else multipliers[best]


def _mult_label(factor: float) -> str:
  return f'lr_x{factor:g}'


def _freeze_labels(params: Any, prefixes: tuple[str, ...],
                   multipliers: dict[str, float] | None = None) -> Any:
  """'frozen' for parameters whose '/'-joined path starts with one of `prefixes`, or whose
  learning-rate multiplier is 0."""
  def label(path, _):
    name = _path_name(path)
    if any(_matches(name, p) for p in prefixes if p):
      return 'frozen'
    return 'frozen' if multipliers and _multiplier(name, multipliers) == 0.0 else 'train'
  return jax.tree_util.tree_map_with_path(label, params)


def check_prefixes(params: Any, prefixes: Any, key: str) -> None:
  """ValueError naming `config.optimizer.<key>` entries that match no parameter path."""
  names = [_path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  unmatched = [p for p in prefixes if p and not any(_matches(n, p) for n in names)]
  if unmatched:
    top = sorted({n.split('/')[0] for n in names})
    raise ValueError(f'config.optimizer.{key}: {unmatched} match no parameter of the model '
                     f"(paths are '/'-joined, e.g. '{names[0] if names else ''}'; top-level "
                     f'names: {top}).')


def _multiplier_labels(params: Any, multipliers: dict[str, float]) -> Any:
  return jax.tree_util.tree_map_with_path(
      lambda path, _: _mult_label(_multiplier(_path_name(path), multipliers)), params)


def _decoupled(inner: optax.GradientTransformation, wd: float, mask: Any,
               schedule: Schedule) -> optax.GradientTransformation:
  """inner(g) - lr(t) * wd * params: AdamW's decoupled weight decay around any optimiser."""
  decay = optax.chain(optax.add_decayed_weights(wd, mask), optax.scale_by_learning_rate(schedule))

  def init(params):
    return (inner.init(params), decay.init(params))

  def update(updates, state, params=None):
    inner_state, decay_state = state
    new_updates, inner_state = inner.update(updates, inner_state, params)
    zeros = jax.tree.map(jnp.zeros_like, updates)
    decay_updates, decay_state = decay.update(zeros, decay_state, params)
    return jax.tree.map(jnp.add, new_updates, decay_updates), (inner_state, decay_state)

  return optax.GradientTransformation(init, update)


def plateau_scale(opt_state: Any) -> float:
  """The current plateau multiplier of the learning rate."""
  return float(opt_state[-1].hyperparams['step_size'])


def set_plateau_scale(opt_state: Any, scale: float) -> Any:
  last = opt_state[-1]
  hyper = dict(last.hyperparams, step_size=jnp.asarray(scale, jnp.float32))
  return (*opt_state[:-1], last._replace(hyperparams=hyper))


@dataclasses.dataclass(frozen=True)
class PlateauState:
  """Host-side bookkeeping of ReduceLROnPlateau, saved with the checkpoint metadata."""

  best: float | None = None
  bad_evals: int = 0
  cooldown: int = 0
  reductions: int = 0


def plateau_update(state: PlateauState, value: float, *, mode: str, patience: int,
                   factor: float, cooldown: int, max_reductions: int,
                   min_delta: float = 0.0) -> tuple[PlateauState, float | None]:
  """One evaluation's worth of ReduceLROnPlateau; returns (state, new factor or None).

  `mode` is 'max' or 'min'; after `patience` evaluations without improving `best` by more
  than `min_delta`, the learning rate is multiplied by `factor` (at most `max_reductions`
  times), then `cooldown` evaluations pass before counting again.
  """
  better = (state.best is None or
            (value > state.best + min_delta if mode == 'max' else value < state.best - min_delta))
  if better:
    return dataclasses.replace(state, best=value, bad_evals=0,
                               cooldown=max(state.cooldown - 1, 0)), None
  if state.cooldown > 0:
    return dataclasses.replace(state, cooldown=state.cooldown - 1), None
  bad = state.bad_evals + 1
  if bad >= patience and state.reductions < max_reductions:
    return PlateauState(state.best, 0, cooldown, state.reductions + 1), factor
  return dataclasses.replace(state, bad_evals=bad), None
