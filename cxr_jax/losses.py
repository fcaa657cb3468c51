"""Classification losses, registered by name for `config.loss`.

Each loss maps logits [B, K] and multi-hot labels [B, K] (or class indices [B], the 'label'
target of single-label data sets such as the TB sets) to a per-example loss [B]; the train
step averages it over the (global) batch. `OUTPUTS` says which activation turns a loss's logits
into the probabilities that evaluation, `predict` and the report show.
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


def get_loss(name: str) -> LossFn:
  return LOSSES.get(name)
