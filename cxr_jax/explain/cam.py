"""Class activation maps on a backbone's last feature map: CAM and Grad-CAM, all classes at once.

- CAM (Zhou et al. 2016): for a head that is global average pooling + a linear classifier,
  M_k(i, j) = sum_c w_ck f_c(i, j). The models provide it as `score_map_fn` (the classifier
  applied at every location; the bias, a per-class constant, is kept: it is gone after a heat
  map's normalisation). For paper 001's space attention head the same function is the head's own
  class score map (the heat map "from the model without the last average pooling").
- Grad-CAM (Selvaraju et al. 2017): for any differentiable head,
  alpha_ck = mean_ij d y_k / d f_c(i, j), M_k = ReLU(sum_c alpha_ck f_c). One backward pass per
  class, all in one compiled program (the head's VJP mapped over the K one-hot cotangents).

Both take the feature map [N, h, w, C] and return maps [N, h, w, K] at the feature map's
resolution; `overlays.upsample` brings a map to the image.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

FeatureFn = Callable[[jax.Array], jax.Array]
METHODS = ('cam', 'grad_cam')


def cam(score_map_fn: FeatureFn, features: jax.Array) -> jax.Array:
  """features [N, h, w, C] -> CAM [N, h, w, K] (float32) through the model's `score_map_fn`."""
  return score_map_fn(features).astype(jnp.float32)


def grad_cam(head_fn: FeatureFn, features: jax.Array, class_batch: int = 1) -> jax.Array:
  """features [N, h, w, C] -> Grad-CAM maps [N, h, w, K] (float32, >= 0) of every class.

  `head_fn` maps features [N, h, w, C] -> logits [N, K] and must treat images independently
  (eval mode), so one cotangent per class gives every image's gradient at once. The K
  backward passes run inside one program (`lax.map`), `class_batch` of them vectorised at a
  time: on XLA:CPU one at a time is fastest (vmapping them turns the head's matmuls into
  batched ones, 9x slower here; benchmarks/multi_attention.py measures both).

  Only the spatial mean of the gradient is needed, and sum_ij d y / d f_c(i, j) is the
  derivative with respect to a shift s_c added to channel c at every location; differentiating
  with respect to that shift [N, C] lets XLA reduce inside the backward pass instead of
  materialising K gradients of the whole map [K, N, h, w, C].
  """
  features = features.astype(jnp.float32)
  n, h, w, c = features.shape
  logits, vjp = jax.vjp(lambda s: head_fn(features + s[:, None, None, :]),
                        jnp.zeros((n, c), jnp.float32))
  k = logits.shape[-1]
  basis = jnp.broadcast_to(jnp.eye(k, dtype=logits.dtype)[:, None, :], (k, *logits.shape))
  alpha = jax.lax.map(lambda e: vjp(e)[0], basis,
                      batch_size=class_batch if class_batch > 1 else None) / (h * w)  # [K, N, C]
  return jax.nn.relu(jnp.einsum('knc,nhwc->nhwk', alpha, features))


def class_maps(method: str, features: jax.Array, *, head_fn: FeatureFn | None = None,
               score_map_fn: FeatureFn | None = None) -> jax.Array:
  """features [N, h, w, C] -> heat maps [N, h, w, K] by `method` ('cam' or 'grad_cam')."""
  if method == 'cam':
    if score_map_fn is None:
      raise ValueError("method 'cam' needs the model's score_map_fn (a linear head)")
    return cam(score_map_fn, features)
  if method == 'grad_cam':
    if head_fn is None:
      raise ValueError("method 'grad_cam' needs the model's head_fn")
    return grad_cam(head_fn, features)
  raise ValueError(f'heat map method {method!r}; valid: {METHODS}')
