"""Depthwise convolution written as a sum of shifted, per-channel-scaled slices.

XLA:CPU lowers `feature_group_count=C` convolutions (and above all their gradients) to slow
generic loops; a k x k depthwise convolution is only k*k multiply-adds per output element, which
XLA fuses into one elementwise loop when written as slices. Parameters are laid out exactly as
`flax.linen.Conv(feature_group_count=C)` lays them out ([kh, kw, 1, C]), so checkpoints and
imported weights work with either implementation. Both support dilation (atrous convolution,
used by MobileNet's `output_stride` < 32), with the same 'SAME' padding.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cxr_jax.models.conv import conv_taps


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
  """TF/XLA 'SAME' padding (extra pixel after), for one spatial dimension; a dilated kernel
  spans (kernel - 1) * dilation + 1 pixels."""
  out = -(-size // stride)
  span = (kernel - 1) * dilation + 1
  total = max((out - 1) * stride + span - size, 0)
  return total // 2, total - total // 2


def depthwise_conv_shifts(x: jax.Array, kernel: jax.Array, stride: int,
                          dilation: int = 1) -> jax.Array:
  """'SAME' depthwise convolution: x [B, H, W, C], kernel [kh, kw, 1, C] -> [B, H', W', C],
  H' = ceil(H / stride); tap (i, j) reads the input `dilation` * (i, j) pixels further."""
  kh, kw = kernel.shape[:2]
  _, h, w, _ = x.shape
  padding = (same_padding(h, kh, stride, dilation), same_padding(w, kw, stride, dilation))
  taps = conv_taps(x, (kh, kw), (stride, stride), padding, (dilation, dilation),
                   (-(-h // stride), -(-w // stride)))
  out = None
  for (i, j), tap in zip(((i, j) for i in range(kh) for j in range(kw)), taps, strict=True):
    term = tap * kernel[i, j, 0]
    out = term if out is None else out + term
  return out


class DepthwiseConv(nn.Module):
  """k x k depthwise convolution without bias; `impl` 'shifts' (fast on CPU) or 'xla'.

  `dilation` spaces the taps (atrous); the parameters do not depend on it.
  """

  kernel_size: int = 3
  strides: int = 1
  impl: str = 'shifts'
  dilation: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, H, W, C] -> [B, ceil(H / strides), ceil(W / strides), C] in `dtype`."""
    c = x.shape[-1]
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (self.kernel_size, self.kernel_size, 1, c))
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if self.impl == 'shifts':
      return depthwise_conv_shifts(x, kernel, self.strides, self.dilation)
    if self.impl == 'xla':
      return lax.conv_general_dilated(
          x, kernel, (self.strides, self.strides), 'SAME',
          rhs_dilation=(self.dilation, self.dilation), feature_group_count=c,
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    raise ValueError(f"depthwise impl={self.impl!r}; valid: 'shifts', 'xla'")
