"""Convolutions whose gradients XLA:CPU computes fast: 1x1 convolutions as matrix products, k x k
weight gradients as patch matrix products.

With the YNNPACK convolutions this jaxlib uses by default, XLA:CPU runs the backward passes of
`lax.conv_general_dilated` far below matmul speed (measured here, 2 cores, batch 16: the vjp of a
56 x 56, 64 -> 256 1x1 convolution took 8x as long as the same product written with
`dot_general`; see benchmarks/conv_impl.py). cxr_jax/xla_options.py now keeps YNNPACK away from
convolutions, which closes most of that gap; 'matmul' is still ahead on DenseNet-121 and
level with or ahead of 'xla' on ResNet-50. Two rewrites, both with
the parameters `flax.linen.Conv` has (`kernel` [kh, kw, C_in, C_out], optional `bias` [C_out],
created in the same order, so initialisation, checkpoints and imported weights are unchanged):

- 'matmul': a 1x1 convolution is a `dot_general` of the [B*H*W, C] matrix over channels (a
  strided slice first for stride > 1), whose autodiff is two more matmuls; k x k convolutions
  stay XLA convolutions. (Contracting the 4-D map instead, XLA:CPU copied every output gradient
  transposed before the weight gradient: 224 px, batch 16, 2 cores, MobileNet v1 10.2-10.6 ->
  15.7-16.5 img/s with the depthwise fix of cxr_jax/models/depthwise.py, ResNet-50 3.3-3.7 ->
  4.2-4.7, `benchmarks/peers.py`.)
- 'patches': as 'matmul', and a k x k convolution is a `jax.custom_vjp` whose forward pass and
  input gradient are XLA's convolutions and whose weight gradient is a sum of matrix products of
  strided slices (`conv_weight_grad`): patches of the input, or at stride 1 of the output
  gradient where it has fewer channels, over the batch in chunks.
- 'xla': `flax.linen.Conv`.
- 'auto': 'matmul' on the CPU backend (with cxr_jax/xla_options.py's options, 224 px, batch 16,
  three runs: DenseNet-121 1.09-1.62x 'xla', ResNet-50 0.95-1.36x; VGG has no 1x1 convolution,
  so there it is XLA's convolutions), 'xla' elsewhere
  (GPU and TPU convolutions are cuDNN/MXU code these rewrites have not been measured against).
  With YNNPACK's element-wise fusions on too (`config.cpu_fusions` += 'eltwise', the papers'
  full ResNet/DenseNet configs), 'matmul' is ahead since the layout fix above (fresh processes,
  img/s: ResNet-50 5.19 vs 4.35 'xla', DenseNet-121 4.26 vs 4.19); before it, 'xla' was.
"""

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cxr_jax import parallel

CONV_IMPLS = ('auto', 'xla', 'matmul', 'patches')
_DIMS = ('NHWC', 'HWIO', 'NHWC')


def resolve_conv_impl(impl: str) -> str:
  """'auto' -> the implementation for the default backend ('matmul' on the CPU, 'xla'
  elsewhere); others are checked and returned."""
  if impl not in CONV_IMPLS:
    raise ValueError(f'conv_impl={impl!r}; valid: {CONV_IMPLS}')
  if impl == 'auto':
    return 'matmul' if jax.default_backend() == 'cpu' else 'xla'
  return impl


def pair(v: int | Sequence[int]) -> tuple[int, int]:
  """An int or a pair -> (int, int) (kernel sizes, strides, dilations)."""
  return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def padding_pairs(padding: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
  """Explicit padding ((top, bottom), (left, right)) as hashable int pairs."""
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def xla_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
             padding: tuple[tuple[int, int], ...], dilation: tuple[int, int]) -> jax.Array:
  """x [B, H, W, C] * kernel [kh, kw, C, O] -> [B, H', W', O] (`lax.conv_general_dilated`)."""
  return lax.conv_general_dilated(x, kernel, strides, padding, rhs_dilation=dilation,
                                  dimension_numbers=_DIMS)


def conv_taps(x: jax.Array, kernel_size: tuple[int, int], strides: tuple[int, int],
              padding: tuple[tuple[int, int], ...], dilation: tuple[int, int],
              out_hw: tuple[int, int], pad_value: float = 0.0) -> list[jax.Array]:
  """x [B, H, W, C] -> kh * kw taps [B, H', W', C] in (kh, kw) order: tap (i, j) is the strided
  slice of the input, padded with `pad_value`, that kernel entry (i, j) multiplies."""
  (kh, kw), (sh, sw), (dh, dw), (ho, wo) = kernel_size, strides, dilation, out_hw
  b, _, _, c = x.shape
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)), constant_values=pad_value)
  return [lax.slice(xp, (0, i * dh, j * dw, 0),
                    (b, i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1, c), (1, sh, sw, 1))
          for i in range(kh) for j in range(kw)]


# Weight gradients are computed over the batch in this many chunks (a scan): each chunk's patch
# matrices stay a fraction of the whole batch's (for VGG's first block, 1.8 GB at batch 16), and
# 4 chunks were fastest of 1, 4 and 16 images per chunk on the single-layer shapes timed (VGG
# 224 px 64 -> 64, 112 px 128 -> 128, DenseNet 56 px 128 -> 32; batch 16, 2 cores).
_WGRAD_CHUNKS = 4
# Up to this many channels on the patched side, one matmul against all kh * kw taps at once;
# wider, one matmul per tap (measured: the concatenation costs more than the wider product).
_ONE_MATMUL_MAX_CHANNELS = 64


def _tn_dot(a: jax.Array, b: jax.Array) -> jax.Array:
  """a [..., M], b [..., N] -> a^T b [M, N] over all leading dims, accumulated in float32. Both
  are flattened to 2-D first: XLA:CPU runs a product contracting 3 dims 2x slower."""
  return lax.dot_general(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]),
                         (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _wgrad_input_patches(x, g, kernel_shape, strides, padding, dilation):
  """dk [kh, kw, C, O] from patches of the input (any stride)."""
  kh, kw, c, o = kernel_shape
  taps = conv_taps(x, (kh, kw), strides, padding, dilation, g.shape[1:3])
  if c <= _ONE_MATMUL_MAX_CHANNELS:
    return _tn_dot(jnp.concatenate(taps, axis=-1), g).reshape(kh, kw, c, o)
  return jnp.stack([_tn_dot(t, g) for t in taps]).reshape(kh, kw, c, o)


def _wgrad_gradient_patches(x, g, kernel_shape, padding, dilation):
  """dk [kh, kw, C, O] from patches of the output gradient (stride 1): summing over the padded
  input's positions (u, v), kernel entry (i, j) pairs x[u, v] with g[u - i * dh, v - j * dw]
  (zero outside g). Cheaper than input patches where O < C (DenseNet: 128 -> 32)."""
  kh, kw, c, o = kernel_shape
  (dh, dw) = dilation
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  hp, wp = xp.shape[1:3]
  ph, pw = (kh - 1) * dh, (kw - 1) * dw
  gp = jnp.pad(g, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  taps = [gp[:, ph - i * dh:ph - i * dh + hp, pw - j * dw:pw - j * dw + wp, :]
          for i in range(kh) for j in range(kw)]
  if o <= _ONE_MATMUL_MAX_CHANNELS:
    dk = _tn_dot(xp, jnp.concatenate(taps, axis=-1)).reshape(c, kh * kw, o).transpose(1, 0, 2)
  else:
    dk = jnp.stack([_tn_dot(xp, t) for t in taps])
  return dk.reshape(kh, kw, c, o)


def conv_weight_grad(x: jax.Array, g: jax.Array, kernel_shape: tuple[int, int, int, int],
                     strides: tuple[int, int], padding: tuple[tuple[int, int], ...],
                     dilation: tuple[int, int]) -> jax.Array:
  """Weight gradient of `xla_conv` as patch matmuls: x [B, H, W, C], output gradient
  g [B, H', W', O] -> dk [kh, kw, C, O] (float32). Patches of whichever of x and g has fewer
  channels (g only at stride 1), the batch in `_WGRAD_CHUNKS` chunks."""
  c, o = kernel_shape[2], kernel_shape[3]
  if strides == (1, 1) and o < c:
    fn = lambda x, g: _wgrad_gradient_patches(x, g, kernel_shape, padding, dilation)
  else:
    fn = lambda x, g: _wgrad_input_patches(x, g, kernel_shape, strides, padding, dilation)
  b = x.shape[0]
  chunks = math.gcd(b, _WGRAD_CHUNKS)
  if chunks == 1:
    return fn(x, g)
  xs = x.reshape(chunks, b // chunks, *x.shape[1:])
  gs = g.reshape(chunks, b // chunks, *g.shape[1:])
  # The first chunk starts the sum (inside shard_map a zeros carry would not vary over the mesh
  # axes the chunks' gradients vary over).
  dk, _ = lax.scan(lambda acc, xg: (acc + fn(*xg), None), fn(xs[0], gs[0]), (xs[1:], gs[1:]))
  return dk


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def patches_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                 padding: tuple[tuple[int, int], ...], dilation: tuple[int, int]) -> jax.Array:
  """`xla_conv` whose weight gradient is `conv_weight_grad` (see the module docstring)."""
  return xla_conv(x, kernel, strides, padding, dilation)


def _patches_fwd(x, kernel, strides, padding, dilation):
  return xla_conv(x, kernel, strides, padding, dilation), (x, kernel)


def _patches_bwd(strides, padding, dilation, residuals, g):
  x, kernel = residuals
  _, dx_fn = jax.vjp(lambda x: xla_conv(x, kernel, strides, padding, dilation), x)
  (dx,) = dx_fn(g)
  dk = conv_weight_grad(x, g, kernel.shape, strides, padding, dilation)
  return dx, dk.astype(kernel.dtype)


patches_conv.defvjp(_patches_fwd, _patches_bwd)


def pointwise_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                   padding: tuple[tuple[int, int], ...]) -> jax.Array:
  """1x1 convolution as a matmul over channels: x [B, H, W, C], kernel [1, 1, C, O]."""
  if any(p for pair in padding for p in pair):
    x = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  if strides != (1, 1):
    x = x[:, ::strides[0], ::strides[1], :]
  # On a [B*H*W, C] matrix, not the 4-D map: autodiff's weight gradient then contracts one
  # dimension, which XLA:CPU runs without first copying the output gradient transposed (with
  # three contracted dimensions it did: 20% of MobileNet v1's train step at 224 px).
  b, h, w, c = x.shape
  y = lax.dot_general(x.reshape(b * h * w, c), kernel[0, 0], (((1,), (0,)), ((), ())))
  return y.reshape(b, h, w, kernel.shape[-1])


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
    kernel_size = pair(self.kernel_size)
    kernel = self.param('kernel', self.kernel_init,
                        (*kernel_size, x.shape[-1], self.features), jnp.float32)
    bias = (self.param('bias', self.bias_init, (self.features,), jnp.float32)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    strides, dilation = pair(self.strides), pair(self.kernel_dilation)
    padding = padding_pairs(self.padding)
    if impl != 'xla' and kernel_size == (1, 1):
      y = pointwise_conv(x, kernel, strides, padding)
    elif impl == 'patches':
      y = patches_conv(x, parallel.match_varying(kernel, x), strides, padding, dilation)
    else:
      y = xla_conv(x, kernel, strides, padding, dilation)
    return y if bias is None else y + bias
