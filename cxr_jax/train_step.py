"""The data-parallel train step and train state (pure JAX: no TensorFlow, no IO).

One step is `jax.jit` of a `jax.shard_map` over the `data` mesh axis: each device computes the
gradient of the globally averaged loss on its shard, BatchNorm averages its batch statistics
over `data`, and the optimiser update runs on the replicated, identical gradients.
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax import lax
from jax.sharding import PartitionSpec as P

from cxr_jax import losses, parallel, xla_options

NAN_POLICIES = ('stop', 'skip')


@struct.dataclass
class TrainState:
  """Everything a step changes. Replicated over the `data` axis.

  nonfinite_steps: steps whose loss or gradient was not finite (their update was not applied);
  first_nonfinite_step: the first of them, -1 while there is none (config.nan_policy).
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  nonfinite_steps: jax.Array = dataclasses.field(default_factory=lambda: jnp.zeros((), jnp.int32))
  first_nonfinite_step: jax.Array = dataclasses.field(
      default_factory=lambda: jnp.full((), -1, jnp.int32))

  def variables(self) -> dict[str, Any]:
    v = {'params': self.params}
    if self.batch_stats:
      v['batch_stats'] = self.batch_stats
    return v


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       image_shape: tuple[int, ...], key: jax.Array,
                       mesh: jax.sharding.Mesh,
                       extra_shapes: dict[str, tuple[int, ...]] | None = None) -> TrainState:
  """Initialises parameters for images of `image_shape` [H, W, C] (and the model's extra
  inputs of `extra_shapes`, per example), replicated over `mesh`."""

  @functools.partial(jax.jit, out_shardings=parallel.replicated(mesh))
  def init(key):
    extra = {k: jnp.zeros((1, *shape)) for k, shape in (extra_shapes or {}).items()}
    variables = model.init({'params': key, 'dropout': key}, jnp.zeros((1, *image_shape)),
                           train=False, **extra)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
                      nonfinite_steps=jnp.zeros((), jnp.int32),
                      first_nonfinite_step=jnp.full((), -1, jnp.int32))

  if jax.default_backend() == 'cpu':
    # XLA:CPU spends most of an init's compile time optimising the threefry random bits (a
    # 4-block ResNet-18: 20.8 s at the default level, 2.2 s at -O0); init runs once.
    return init.lower(key).compile(
        compiler_options={'xla_backend_optimization_level': 0})(key)
  return init(key)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    loss_fn: losses.LossFn, mesh: jax.sharding.Mesh, *,
                    target: str = 'labels', inputs: tuple[str, ...] = (),
                    nan_policy: str = 'stop',
                    cpu_fusions: Sequence[str] = xla_options.DEFAULT_CPU_FUSIONS
                    ) -> Callable[[TrainState, dict[str, jax.Array], jax.Array],
                                  tuple[TrainState, dict[str, jax.Array]]]:
  """Returns jit(step)(state, batch, key) -> (state, metrics); the state is donated.

  A step whose loss or gradient is not finite changes nothing but the step counter and the
  state's non-finite bookkeeping. nan_policy 'stop': from the first such step on, no update is
  applied (the loop stops at its next check with the last good parameters); 'skip': later
  finite steps carry on.

  `batch` holds global arrays sharded over `data`: 'image' [B, H, W, C], the loss's `target`
  (e.g. 'labels' [B, K]) and the model's extra `inputs` (passed to the model by name).
  Losses see the local shard; one that needs global batch statistics (counts over the whole
  batch) computes them with collectives over `parallel.DATA_AXIS` (`losses.LossFn`).

  cpu_fusions: the YNNPACK fusion types the step is compiled with on XLA:CPU
  (cxr_jax/xla_options.py; `config.cpu_fusions`); no effect on other backends.
  """
  if nan_policy not in NAN_POLICIES:
    raise ValueError(f'config.nan_policy={nan_policy!r}; valid: {", ".join(NAN_POLICIES)}')
  axis = parallel.DATA_AXIS

  def per_device(params, batch_stats, images, targets, extra, key):
    key = jax.random.fold_in(key, lax.axis_index(axis))

    def loss_of(params):
      variables = {'params': params}
      if batch_stats:
        variables['batch_stats'] = batch_stats
      logits, updates = model.apply(variables, images, train=True, mutable=['batch_stats'],
                                    rngs={'dropout': key}, **extra)
      # Differentiate the pmean'd loss: the gradient w.r.t. the replicated parameters is then
      # the global-batch gradient (a local loss would come back summed over `data`).
      loss = lax.pmean(jnp.mean(loss_fn(logits, targets)), axis)
      return loss, updates.get('batch_stats', {})

    (loss, new_stats), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
    return loss, grads, new_stats

  sharded_grads = jax.shard_map(
      per_device, mesh=mesh, in_specs=(P(), P(), P(axis), P(axis), P(axis), P()),
      out_specs=(P(), P(), P()))

  @functools.partial(xla_options.jit, donate_argnums=(0,), cpu_fusions=cpu_fusions)
  def step(state: TrainState, batch: dict[str, jax.Array], key: jax.Array):
    key = jax.random.fold_in(key, state.step)
    loss, grads, batch_stats = sharded_grads(state.params, state.batch_stats, batch['image'],
                                             batch[target], {k: batch[k] for k in inputs}, key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    apply = finite & (state.first_nonfinite_step < 0) if nan_policy == 'stop' else finite
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(apply, a, b), new, old)  # noqa: E731
    new_state = state.replace(
        step=state.step + 1, params=keep(params, state.params),
        batch_stats=keep(batch_stats, state.batch_stats),
        opt_state=keep(opt_state, state.opt_state),
        nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
        first_nonfinite_step=jnp.where((state.first_nonfinite_step < 0) & ~finite,
                                       state.step + 1, state.first_nonfinite_step))
    return new_state, {'loss': loss, 'grad_norm': grad_norm}

  return step


def make_predict_fn(model: nn.Module, activation: str = 'sigmoid') -> Callable[..., jax.Array]:
  """(variables, images [B, H, W, C], **extra inputs) -> probabilities [B, K] by `activation`
  ('sigmoid', or 'softmax' for single-label softmax models: `losses.output_activation`)."""
  return lambda variables, images, **extra: losses.probabilities(
      model.apply(variables, images, train=False, **extra), activation)
