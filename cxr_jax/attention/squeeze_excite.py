"""Feature attention module of paper 001 (Ma et al., section 3.1): squeeze-and-excitation.

Hu et al.'s SE block, inserted into every residual block of the ResNet (cxr_jax/models/resnet.py,
`se_reduction`) on the residual branch before the addition with the shortcut, as their Fig. 3:
squeeze = global average pooling, eq. (1) z_c = mean_ij u_c(i, j); excitation, eq. (2)
s = sigmoid(W2 ReLU(W1 z)), W1 [C, C/r], W2 [C/r, C]; output u_c * s_c. The gates s [B, C] are
sown as `se/gate` of each block (what the channel recalibration did to an image).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class SqueezeExcite(nn.Module):
  """Squeeze-and-excitation: x [B, H, W, C] -> x * gate, gate = sigmoid(FC(ReLU(FC(GAP(x)))))."""

  reduction: int = 16
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    s = jnp.mean(x, axis=(1, 2))
    s = nn.relu(nn.Dense(max(1, c // self.reduction), dtype=self.dtype, name='fc1')(s))
    gate = nn.sigmoid(nn.Dense(c, dtype=self.dtype, name='fc2')(s))
    self.sow('intermediates', 'gate', gate)
    return x * gate[:, None, None, :]
