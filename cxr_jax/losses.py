"""Classification losses, registered by name for `config.loss`.

Each loss maps logits [B, K] and multi-hot labels [B, K] to a per-example loss [B]; the train
step averages it over the (global) batch.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

from cxr_jax.parallel import DATA_AXIS
from cxr_jax.registry import Registry

LossFn = Callable[[jax.Array, jax.Array], jax.Array]
LOSSES: Registry[LossFn] = Registry('loss')


@LOSSES.register('sigmoid_bce')
def sigmoid_bce(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Multi-label binary cross entropy, mean over classes: [B, K], [B, K] -> [B].

  This is what paper 000 calls "categorical cross entropy" on sigmoid outputs (Keras
  `binary_crossentropy`, which averages over the label axis).
  """
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels), axis=-1)


@LOSSES.register('softmax_ce')
def softmax_ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross entropy against one-hot (or soft) labels: [B, K], [B, K] -> [B]."""
  return optax.softmax_cross_entropy(logits, labels)


def get_loss(name: str) -> LossFn:
  return LOSSES.get(name)


def _global_sum(x: jax.Array) -> jax.Array:
  """Sum of `x` over the `data` mesh axis inside a sharded step (the global batch); `x` itself
  where no such axis is bound (one device, plain `jit`, eager)."""
  try:
    return lax.psum(x, DATA_AXIS)
  except NameError:  # unbound axis name: not inside shard_map over `data`
    return x


def weighted_bce_terms(logits: jax.Array, labels: jax.Array, *, per_class: bool = False
                       ) -> jax.Array:
  """Terms of the weighted binary cross entropy of Wang et al. (ChestX-ray8, paper 002 eq. 10).

  L = w_P sum_{y in P} -ln M(x) + w_N sum_{y in N} -ln(1 - M(x)), w_P = (|P| + |N|) / |P|,
  w_N = (|P| + |N|) / |N|, where P and N are the positive and negative (image, class) entries
  of the current batch. |P| and |N| are counted over the GLOBAL batch (psum over the `data`
  axis inside the sharded step), so 8 devices weigh exactly as one device does. `per_class`
  counts |P_c|, |N_c| per class instead (weights [K]). A batch without positives (or without
  negatives) has no such terms, so the undefined weight never multiplies anything (counts are
  clamped to 1).

  Args:
    logits: [B, K] (the local shard inside the step).
    labels: [B, K] multi-hot in {0, 1}.
    per_class: count per class instead of over all entries.

  Returns:
    The weighted terms [B, K]; their sum is eq. 10's L.
  """
  labels = labels.astype(jnp.float32)
  axis = 0 if per_class else (0, 1)
  pos = _global_sum(jnp.sum(labels, axis=axis))
  total = _global_sum(jnp.asarray(labels.shape[0], jnp.float32)) * (1 if per_class else
                                                                     labels.shape[1])
  neg = total - pos
  w_pos = total / jnp.maximum(pos, 1.0)
  w_neg = total / jnp.maximum(neg, 1.0)
  # -ln M(x) and -ln(1 - M(x)) from the logits, numerically stable.
  nll_pos = -jax.nn.log_sigmoid(logits)
  nll_neg = -jax.nn.log_sigmoid(-logits)
  return labels * w_pos * nll_pos + (1.0 - labels) * w_neg * nll_neg


@LOSSES.register('weighted_bce')
def weighted_bce(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Paper 002's weighted BCE (eq. 10), |P| and |N| over all (image, class) entries of the
  global batch as in its reference [18]: [B, K], [B, K] -> [B], the mean over classes, so the
  step's mean over the batch is eq. 10's L / (B K) (a constant factor; with w_P = w_N = 1
  this is `sigmoid_bce`)."""
  return jnp.mean(weighted_bce_terms(logits, labels), axis=-1)


@LOSSES.register('weighted_bce_per_class')
def weighted_bce_per_class(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """`weighted_bce` with |P_c|, |N_c| counted per class over the global batch: [B] per example."""
  return jnp.mean(weighted_bce_terms(logits, labels, per_class=True), axis=-1)
