"""Space attention module of paper 001 (Ma et al., section 3.2): global and local features fused.

The last feature map [B, h, w, C] (7 x 7 for ResNet-101 at 224 px) is global-average-pooled to a
vector, the vector is tiled back to h x w ("resize it to 7 x 7", ParseNet's unpooling) and
concatenated with the local features, so every location carries [local C | global C] features.
The paper insists on no convolution between pooling and tiling. A 1 x 1 classifier then scores
every location and the scores are average-pooled into the image's logits: the class score map
[B, h, w, K] before that last pooling is the paper's heat map ("computed from the model without
the last average pooling", Fig. 4 right).

`pool='before_classifier'` is Fig. 4's other placement (average pooling between ResNet5c and the
classifier). The classifier is linear, so both placements compute the same logits from the same
parameters (mean over locations commutes with a linear map; a test checks it); they differ in
what the model exposes: only the 'after_classifier' head sows its class score map.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

POOLS = ('after_classifier', 'before_classifier')


def fuse_global_local(features: jax.Array) -> jax.Array:
  """features [B, h, w, C] -> [B, h, w, 2C]: local features, then their global average tiled."""
  pooled = jnp.mean(features, axis=(1, 2), keepdims=True)
  return jnp.concatenate([features, jnp.broadcast_to(pooled, features.shape)], axis=-1)


def class_score_map(features: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """features [B, h, w, C] -> class scores [B, h, w, K] of the 1 x 1 classifier (kernel
  [2C, K], bias [K]) on the fused features."""
  return fuse_global_local(features) @ kernel + bias


class SpaceAttentionHead(nn.Module):
  """features [B, h, w, C] -> logits [B, K] (float32); sows 'class_scores' [B, h, w, K].

  Attributes:
    num_classes: K.
    pool: 'after_classifier' (paper: score every location, then average) or
      'before_classifier' (average the fused features, then the classifier).
    dtype: compute dtype.
  """

  num_classes: int
  pool: str = 'after_classifier'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    if self.pool not in POOLS:
      raise ValueError(f'space attention pool={self.pool!r}; valid: {POOLS}')
    fused = fuse_global_local(features.astype(self.dtype))
    # A 1 x 1 convolution is a dense layer over the channel axis.
    classifier = nn.Dense(self.num_classes, dtype=self.dtype, name='classifier')
    if self.pool == 'after_classifier':
      scores = classifier(fused)
      self.sow('intermediates', 'class_scores', scores)
      logits = jnp.mean(scores, axis=(1, 2))
    else:
      logits = classifier(jnp.mean(fused, axis=(1, 2)))
    return logits.astype(jnp.promote_types(self.dtype, jnp.float32))


def head_params(variables: dict, path: tuple[str, ...]) -> tuple[jax.Array, jax.Array]:
  """(kernel [2C, K], bias [K]) of the head at `path` (e.g. ('space_attention',))."""
  node = variables['params']
  for name in path:
    node = node[name]
  return node['classifier']['kernel'], node['classifier']['bias']
