"""Depthwise convolution written as a sum of shifted, per-channel-scaled slices.

XLA:CPU lowers `feature_group_count=C` convolutions (and above all their gradients) to slow
generic loops; a k x k depthwise convolution is only k*k multiply-adds per output element, which
XLA fuses into one elementwise loop when written as slices. Parameters are laid out exactly as
`flax.linen.Conv(feature_group_count=C)` lays them out ([kh, kw, 1, C]), so checkpoints and
imported weights work with either implementation.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TF/XLA 'SAME' padding (extra pixel after), for one spatial dimension."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def depthwise_conv_shifts(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """'SAME' depthwise convolution: x [B, H, W, C], kernel [kh, kw, 1, C] -> [B, H', W', C]."""
  kh, kw = kernel.shape[:2]
  _, h, w, _ = x.shape
  ph, pw = same_padding(h, kh, stride), same_padding(w, kw, stride)
  xp = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
  ho, wo = -(-h // stride), -(-w // stride)
  out = None
  for i in range(kh):
    for j in range(kw):
      tap = lax.slice(xp, (0, i, j, 0),
                      (xp.shape[0], i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1,
                       xp.shape[3]), (1, stride, stride, 1))
      term = tap * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


class DepthwiseConv(nn.Module):
  """k x k depthwise convolution without bias; `impl` 'shifts' (fast on CPU) or 'xla'."""

  kernel_size: int = 3
  strides: int = 1
  impl: str = 'shifts'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (self.kernel_size, self.kernel_size, 1, c))
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if self.impl == 'shifts':
      return depthwise_conv_shifts(x, kernel, self.strides)
    if self.impl == 'xla':
      return lax.conv_general_dilated(
          x, kernel, (self.strides, self.strides), 'SAME', feature_group_count=c,
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    raise ValueError(f"depthwise impl={self.impl!r}; valid: 'shifts', 'xla'")
