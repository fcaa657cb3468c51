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
