"""Classification losses, registered by name for `config.loss`.

Each loss maps logits [B, K] and multi-hot labels [B, K] to a per-example loss [B]; the train
step averages it over the (global) batch.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

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
