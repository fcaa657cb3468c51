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


def gap_dense_score_map_fn(dtype: Any, variables: dict, head: str
                           ) -> Callable[[jax.Array], jax.Array]:
  """features [N, h, w, C] -> class score maps [N, h, w, K]: the dense layer at every location.

  For a GAP + dense head this is Zhou et al.'s class activation map plus the bias (a constant
  per class, gone after a heat map's min-max normalisation); its spatial mean is the logit.
  """
  kernel = variables['params'][head]['kernel']
  bias = variables['params'][head]['bias']

  def fn(features: jax.Array) -> jax.Array:
    scores = features.astype(dtype) @ kernel.astype(dtype) + bias.astype(dtype)
    return scores.astype(jnp.promote_types(dtype, jnp.float32))

  return fn
