"""Classifier heads re-evaluated alone on a backbone's feature map (PDA, CAM)."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def gap_dense_head_fn(dtype: Any, variables: dict, head: str) -> Callable[[jax.Array], jax.Array]:
  """features [N, h, w, C] -> logits [N, K]: global average pooling, then the dense layer
  `variables['params'][head]` (eval mode: dropout is the identity), computed in `dtype`."""
  kernel = variables['params'][head]['kernel']
  bias = variables['params'][head]['bias']

  def fn(features: jax.Array) -> jax.Array:
    pooled = jnp.mean(features.astype(dtype), axis=(1, 2))
    logits = pooled @ kernel.astype(dtype) + bias.astype(dtype)
    return logits.astype(jnp.promote_types(dtype, jnp.float32))

  return fn
