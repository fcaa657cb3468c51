"""Convolutions whose gradients XLA:CPU computes fast: 1x1 convolutions as matrix products, k x k
weight gradients as patch matrix products.

XLA:CPU runs the backward passes of `lax.conv_general_dilated` far below matmul speed (measured
here, 2 cores, batch 16: the vjp of a 56 x 56, 64 -> 256 1x1 convolution took 8x as long as the
same product written with `dot_general`; see benchmarks/conv_impl.py). Two rewrites, both with
the parameters `flax.linen.Conv` has (`kernel` [kh, kw, C_in, C_out], optional `bias` [C_out],
created in the same order, so initialisation, checkpoints and imported weights are unchanged):

- 'matmul': a 1x1 convolution is a `dot_general` over channels (a strided slice first for
  stride > 1), whose autodiff is two more matmuls; k x k convolutions stay XLA convolutions.
- 'patches': as 'matmul', and a k x k convolution is a `jax.custom_vjp` whose forward pass and
  input gradient are XLA's convolutions and whose weight gradient is one matmul of the input's
  patches ([B * H' * W', kh * kw * C_in], gathered by strided slices) with the output gradient.
- 'xla': `flax.linen.Conv`.
- 'auto': 'matmul' on the CPU backend (where it was measured faster), 'xla' elsewhere (GPU and
  TPU convolutions are cuDNN/MXU code that these rewrites have not been measured against).
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ('auto', 'xla', 'matmul', 'patches')
_DIMS = ('NHWC', 'HWIO', 'NHWC')


def resolve_conv_impl(impl: str, cpu_default: str = 'matmul') -> str:
  """'auto' -> the implementation for the default backend (`cpu_default` on the CPU, 'xla'
  elsewhere); others are checked and returned."""
  if impl not in CONV_IMPLS:
    raise ValueError(f'conv_impl={impl!r}; valid: {CONV_IMPLS}')
  if impl == 'auto':
    return cpu_default if jax.default_backend() == 'cpu' else 'xla'
  return impl


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _pairs(padding: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def xla_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
             padding: tuple[tuple[int, int], ...], dilation: tuple[int, int]) -> jax.Array:
  """x [B, H, W, C] * kernel [kh, kw, C, O] -> [B, H', W', O] (`lax.conv_general_dilated`)."""
  return lax.conv_general_dilated(x, kernel, strides, padding, rhs_dilation=dilation,
                                  dimension_numbers=_DIMS)


def conv_patches(x: jax.Array, kernel_size: tuple[int, int], strides: tuple[int, int],
                 padding: tuple[tuple[int, int], ...], dilation: tuple[int, int],
                 out_hw: tuple[int, int]) -> jax.Array:
  """x [B, H, W, C] -> patches [B, H', W', kh * kw * C], ordered (kh, kw, C) as an HWIO kernel
  reshaped to [kh * kw * C, O]; tap (i, j) is the strided slice the convolution reads."""
  (kh, kw), (sh, sw), (dh, dw), (ho, wo) = kernel_size, strides, dilation, out_hw
  b, _, _, c = x.shape
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  taps = [lax.slice(xp, (0, i * dh, j * dw, 0),
                    (b, i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1, c), (1, sh, sw, 1))
          for i in range(kh) for j in range(kw)]
  return taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def patches_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                 padding: tuple[tuple[int, int], ...], dilation: tuple[int, int]) -> jax.Array:
  """`xla_conv` whose weight gradient is a patch matmul (see the module docstring)."""
  return xla_conv(x, kernel, strides, padding, dilation)


def _patches_fwd(x, kernel, strides, padding, dilation):
  return xla_conv(x, kernel, strides, padding, dilation), (x, kernel)


def _patches_bwd(strides, padding, dilation, residuals, g):
  x, kernel = residuals
  kh, kw, c, o = kernel.shape
  _, dx_fn = jax.vjp(lambda x: xla_conv(x, kernel, strides, padding, dilation), x)
  (dx,) = dx_fn(g)
  patches = conv_patches(x, (kh, kw), strides, padding, dilation, g.shape[1:3])
  dk = lax.dot_general(patches, g, (((0, 1, 2), (0, 1, 2)), ((), ())))
  return dx, dk.reshape(kh, kw, c, o).astype(kernel.dtype)


patches_conv.defvjp(_patches_fwd, _patches_bwd)


def _match_varying(kernel: jax.Array, x: jax.Array) -> jax.Array:
  """Marks `kernel` varying over the mesh axes `x` varies over (inside `shard_map`), so that the
  custom vjp's per-device weight gradient has the type of its input; the transpose of that
  cast sums the gradient over the axes, as autodiff does for a replicated parameter."""
  def vma(a: jax.Array) -> frozenset:
    aval = jax.typeof(a)
    if hasattr(aval, 'vma'):  # JAX 0.11+
      return frozenset(aval.vma)
    manual = getattr(aval, 'manual_axis_type', None)  # JAX 0.10
    return frozenset(manual.varying) if manual is not None else frozenset()

  missing = tuple(sorted(vma(x) - vma(kernel)))
  if not missing:
    return kernel
  if hasattr(lax, 'pcast'):
    return lax.pcast(kernel, missing, to='varying')
  return lax.pvary(kernel, missing)  # JAX versions before pcast


def pointwise_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                   padding: tuple[tuple[int, int], ...]) -> jax.Array:
  """1x1 convolution as a matmul over channels: x [B, H, W, C], kernel [1, 1, C, O]."""
  if any(p for pair in padding for p in pair):
    x = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  if strides != (1, 1):
    x = x[:, ::strides[0], ::strides[1], :]
  return lax.dot_general(x, kernel[0, 0], (((3,), (0,)), ((), ())))


class Conv(nn.Module):
  """2-D convolution (NHWC) with `flax.linen.Conv`'s parameters and results; `impl` picks how
  it is computed (see the module docstring). Explicit padding only: ((top, bottom), (l, r)).

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    strides, padding, kernel_dilation, use_bias, kernel_init, bias_init, dtype: as nn.Conv.
    impl: 'auto', 'xla', 'matmul' or 'patches'.
  """

  features: int
  kernel_size: int | tuple[int, int]
  strides: int | tuple[int, int] = 1
  padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0))
  kernel_dilation: int | tuple[int, int] = 1
  use_bias: bool = True
  kernel_init: Callable = nn.linear.default_kernel_init
  bias_init: Callable = nn.initializers.zeros_init()
  dtype: Any = None
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, H, W, C_in] -> [B, H', W', features]."""
    impl = resolve_conv_impl(self.impl)
    kernel_size = _pair(self.kernel_size)
    kernel = self.param('kernel', self.kernel_init,
                        (*kernel_size, x.shape[-1], self.features), jnp.float32)
    bias = (self.param('bias', self.bias_init, (self.features,), jnp.float32)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    strides, dilation = _pair(self.strides), _pair(self.kernel_dilation)
    padding = _pairs(self.padding)
    if impl != 'xla' and kernel_size == (1, 1):
      y = pointwise_conv(x, kernel, strides, padding)
    elif impl == 'patches':
      y = patches_conv(x, _match_varying(kernel, x), strides, padding, dilation)
    else:
      y = xla_conv(x, kernel, strides, padding, dilation)
    return y if bias is None else y + bias
