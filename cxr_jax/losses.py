"""Losses, registered by name for `config.loss`.

Each loss maps logits and targets to a per-example loss [B]; the train step averages it over
the (global) batch. Classification: logits [B, K] and multi-hot labels [B, K] (or class indices
[B], the 'label' target of single-label data sets such as the TB sets). Segmentation (paper
004's U-Net): per-pixel logits [B, H, W, K] and masks [B, H, W, K] in [0, 1]. `OUTPUTS` says
which activation turns a loss's logits into the probabilities that evaluation, `predict` and
the report show.
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
# The activation that gives a loss's probabilities; losses not listed are sigmoid ones.
OUTPUTS = {'sigmoid_bce': 'sigmoid', 'softmax_ce': 'softmax'}


def dense_targets(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Class indices [B] -> one-hot [B, K] (K = 1: the positive indicator [B, 1]); multi-hot or
  one-hot [B, K] labels pass unchanged."""
  if labels.ndim == logits.ndim - 1:
    k = logits.shape[-1]
    if k == 1:
      return labels[..., None].astype(logits.dtype)
    return jax.nn.one_hot(labels, k, dtype=logits.dtype)
  return labels


def output_activation(loss: str) -> str:
  """'softmax' or 'sigmoid': how `loss`'s logits become probabilities."""
  return OUTPUTS.get(loss, 'sigmoid')


def probabilities(logits: jax.Array, activation: str) -> jax.Array:
  """logits [..., K] -> probabilities [..., K] by `activation` ('sigmoid' | 'softmax')."""
  if activation == 'softmax':
    return jax.nn.softmax(logits, axis=-1)
  if activation != 'sigmoid':
    raise ValueError(f"output activation {activation!r}; valid: 'sigmoid', 'softmax'")
  return jax.nn.sigmoid(logits)


@LOSSES.register('sigmoid_bce')
def sigmoid_bce(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Multi-label binary cross entropy, mean over classes: [B, K], [B, K] -> [B].

  This is what paper 000 calls "categorical cross entropy" on sigmoid outputs (Keras
  `binary_crossentropy`, which averages over the label axis). Class indices [B] with one
  output (K = 1) are the binary single-label case.
  """
  labels = dense_targets(logits, labels)
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels), axis=-1)


@LOSSES.register('softmax_ce')
def softmax_ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross entropy against one-hot (or soft) labels [B, K] or class indices [B]:
  -> [B]. Paper 003's "multinomial logistic regression objective" on 2 outputs."""
  if labels.ndim == logits.ndim - 1:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32))
  return optax.softmax_cross_entropy(logits, labels)


def soft_dice_per_structure(logits: jax.Array, masks: jax.Array, smooth: float = 1.0
                            ) -> jax.Array:
  """Soft Dice of sigmoid(logits) against masks per image and structure: [B, H, W, K] -> [B, K].

  Paper 004's Eq. (2), 2 |M_gt n M_prob| / (|M_gt| + |M_prob|), with probabilities in place of
  the binary prediction and `smooth` added to numerator and denominator (an empty structure
  predicted empty scores 1, not 0/0).
  """
  probs = jax.nn.sigmoid(logits.astype(jnp.float32))
  masks = masks.astype(jnp.float32)
  inter = jnp.sum(probs * masks, axis=(1, 2))
  total = jnp.sum(probs, axis=(1, 2)) + jnp.sum(masks, axis=(1, 2))
  return (2.0 * inter + smooth) / (total + smooth)


@LOSSES.register('soft_dice')
def soft_dice(logits: jax.Array, masks: jax.Array) -> jax.Array:
  """1 - mean soft Dice over structures, per image: [B, H, W, K], [B, H, W, K] -> [B]
  (the "dice loss ... minimized" of paper 004, Eq. (2))."""
  return 1.0 - jnp.mean(soft_dice_per_structure(logits, masks), axis=-1)


@LOSSES.register('dice_bce')
def dice_bce(logits: jax.Array, masks: jax.Array) -> jax.Array:
  """Soft Dice loss plus the per-pixel sigmoid BCE (mean over pixels and structures), 1:1, per
  image: [B, H, W, K], [B, H, W, K] -> [B]. BCE gives every pixel a gradient from the first
  step, where Dice alone is flat for a near-empty prediction."""
  bce = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32),
                                           masks.astype(jnp.float32))
  return soft_dice(logits, masks) + jnp.mean(bce, axis=(1, 2, 3))


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
