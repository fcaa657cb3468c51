"""Depthwise convolution written as a sum of shifted, per-channel-scaled slices.

XLA:CPU lowers `feature_group_count=C` convolutions (and above all their gradients) to slow
generic loops; a k x k depthwise convolution is only k*k multiply-adds per output element, which
XLA fuses into one elementwise loop when written as slices. Parameters are laid out exactly as
`flax.linen.Conv(feature_group_count=C)` lays them out ([kh, kw, 1, C]), so checkpoints and
imported weights work with either implementation. Both support dilation (atrous convolution,
used by MobileNet's `output_stride` < 32), with the same 'SAME' padding.

The 'shifts' form has a hand-written gradient (a `jax.custom_vjp`): autodiff of the shifted sum
keeps all k*k taps of the input for the kernel gradient, which XLA:CPU writes out as k*k
full-size copies; `depthwise_kernel_grad` instead reads the input and the output gradient once,
in one variadic reduction. MobileNet v1 train step, 224 px, batch 16, 2 cores: 1.5 -> 1.2 s
(with the 'matmul' weight-gradient layout fix of cxr_jax/models/conv.py, 0.85 s).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cxr_jax import parallel
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
  H' = ceil(H / stride); tap (i, j) reads the input `dilation` * (i, j) pixels further.

  Differentiable with a hand-written gradient (`_shifts_bwd`): only x is kept for the backward
  pass, not its kh * kw shifted taps."""
  # A parameter meeting per-device data inside shard_map: see parallel.match_varying.
  return _shifts_conv(x, parallel.match_varying(kernel, x), int(stride), int(dilation))


def _same_taps(x: jax.Array, kernel_hw: tuple[int, int], stride: int,
               dilation: int) -> list[jax.Array]:
  """x [B, H, W, C] -> kh * kw 'SAME'-padded taps [B, ceil(H / stride), ceil(W / stride), C]."""
  (kh, kw), (h, w) = kernel_hw, x.shape[1:3]
  padding = (same_padding(h, kh, stride, dilation), same_padding(w, kw, stride, dilation))
  return conv_taps(x, (kh, kw), (stride, stride), padding, (dilation, dilation),
                   (-(-h // stride), -(-w // stride)))


def _shifts(x: jax.Array, kernel: jax.Array, stride: int, dilation: int) -> jax.Array:
  kh, kw = kernel.shape[:2]
  taps = _same_taps(x, (kh, kw), stride, dilation)
  out = None
  for (i, j), tap in zip(((i, j) for i in range(kh) for j in range(kw)), taps, strict=True):
    term = tap * kernel[i, j, 0]
    out = term if out is None else out + term
  return out


def depthwise_kernel_grad(x: jax.Array, g: jax.Array, kernel_shape: tuple[int, ...],
                          stride: int, dilation: int = 1) -> jax.Array:
  """Gradient of `depthwise_conv_shifts` with respect to its kernel: x [B, H, W, C], output
  gradient g [B, H', W', C] -> [kh, kw, 1, C], entry (i, j) = sum of tap (i, j) * g, accumulated
  in at least float32.

  All kh * kw products are summed over the width in one variadic reduction, which XLA emits as
  one loop reading x and g once; then a small sum over batch and rows. Written with one `sum` per
  tap, XLA:CPU hands each sum to a YNNPACK reduction that needs its tap materialised in memory
  first: kh * kw full-size copies, a third of MobileNet v1's train step (224 px, 2 cores)."""
  kh, kw = kernel_shape[:2]
  acc = jnp.promote_types(x.dtype, jnp.float32)
  taps = _same_taps(x, (kh, kw), stride, dilation)
  g = g.astype(acc)
  products = [tap.astype(acc) * g for tap in taps]
  zeros = [jnp.zeros((), acc)] * len(products)
  rows = lax.reduce(products, zeros, lambda a, b: [u + v for u, v in zip(a, b, strict=True)],
                    (2,))  # kh * kw of [B, H', C]
  c = x.shape[-1]
  return jnp.stack(rows).reshape(kh * kw, -1, c).sum(1).reshape(kh, kw, 1, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _shifts_conv(x: jax.Array, kernel: jax.Array, stride: int, dilation: int) -> jax.Array:
  return _shifts(x, kernel, stride, dilation)


def _shifts_fwd(x, kernel, stride, dilation):
  return _shifts(x, kernel, stride, dilation), (x, kernel)


def _shifts_bwd(stride, dilation, residuals, g):
  x, kernel = residuals
  # The input gradient is linear in g (sums of padded, scaled copies): autodiff's is one fused
  # loop; it needs no tap of x.
  _, vjp_x = jax.vjp(lambda x: _shifts(x, kernel, stride, dilation), x)
  (dx,) = vjp_x(g)
  dk = depthwise_kernel_grad(x, g, kernel.shape, stride, dilation)
  return dx, dk.astype(kernel.dtype)


_shifts_conv.defvjp(_shifts_fwd, _shifts_bwd)


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
