"""Max pooling with a hand-written gradient that XLA:CPU runs 1.7-10x faster: `max_pool`.

`flax.linen.max_pool` is `lax.reduce_window(max)`; its gradient (JAX's select-and-gather
transposed to a select-and-scatter) reaches XLA:CPU as a variadic reduce-window that carries
four int32 index maps the size of the padded input (each an `iota` written out every step) and a
scatter: for ResNet's and DenseNet's stem pool (224 px, batch 16, 64 channels at 112 -> 56 px)
~0.25 s of DenseNet-121's ~3.2 s of thread time per train step on 2 cores, for one layer.

'taps' (a `jax.custom_vjp`): the forward pass takes the maximum and the index of the first
maximal tap of every window over kh * kw strided slices of the padded input (one fused loop)
and keeps only that index (int8) for the backward pass. The input gradient is, where the windows
tile the input (window == stride, no padding: VGG's, U-Net's pools), one broadcast-and-select
over the input; where they overlap, a scatter-add of the output gradient to the flat positions
the index names (a sum of kh * kw interior-padded masked copies instead was fused by XLA into
every consumer of the gradient, the argmax recomputed in each: slower than the reduce-window).
`benchmarks/max_pool.py` times the layers of the backbones against both and torch.

Results equal `flax.linen.max_pool`'s (same padding with -inf); gradients equal its gradient:
all of a window's gradient goes to its first maximum in row-major order (as torch's MaxPool2d;
ties are common after a ReLU), and NaNs propagate. 'auto' is 'taps' on the CPU backend and
`flax.linen.max_pool` elsewhere (GPU and TPU pooling not measured against it yet); integer
inputs, and inputs of 2**31 - 1 elements or more (int32 flat indices), always use the latter.
"""

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cxr_jax.models.conv import conv_taps, padding_pairs, pair

POOL_IMPLS = ('auto', 'xla', 'taps')


def resolve_pool_impl(impl: str) -> str:
  """'auto' -> 'taps' on the CPU backend, 'xla' elsewhere; others are checked and returned."""
  if impl not in POOL_IMPLS:
    raise ValueError(f'pool impl={impl!r}; valid: {POOL_IMPLS}')
  if impl == 'auto':
    return 'taps' if jax.default_backend() == 'cpu' else 'xla'
  return impl


def _out_hw(in_hw, window, strides, padding) -> tuple[int, int]:
  """Output rows and columns (floor mode); <= 0 where the map is smaller than the window."""
  return tuple((n + lo + hi - k) // s + 1 for n, k, s, (lo, hi) in
               zip(in_hw, window, strides, padding, strict=True))


def _argmax_taps(x, window, strides, padding):
  """y [B, H', W', C] = window maxima, idx (int8 / int32) = row-major index of the first
  maximal tap of each window."""
  taps = conv_taps(x, window, strides, padding, (1, 1), _out_hw(x.shape[1:3], window, strides,
                                                                padding), pad_value=-jnp.inf)
  idx_dtype = jnp.int8 if len(taps) <= 127 else jnp.int32
  y, idx = taps[0], jnp.zeros(taps[0].shape, idx_dtype)
  for t, tap in enumerate(taps[1:], 1):
    # Strictly greater keeps the first maximum; a NaN tap wins so that NaNs propagate.
    take = (tap > y) | jnp.isnan(tap)
    y = jnp.where(take, tap, y)
    idx = jnp.where(take, jnp.asarray(t, idx_dtype), idx)
  return y, idx


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool_taps(x, window, strides, padding, in_hw):
  del in_hw
  return _argmax_taps(x, window, strides, padding)[0]


def _taps_fwd(x, window, strides, padding, in_hw):
  return _argmax_taps(x, window, strides, padding)  # (y, residual idx)


def _disjoint_bwd(window, in_hw, idx, g):
  """Windows that tile the input (window == stride, no padding): each input pixel is in at most
  one window, so the gradient is one broadcast-and-select over the input (rows and columns past
  the last window get zeros)."""
  (kh, kw), (h, w) = window, in_hw
  b, ho, wo, c = g.shape
  code = (lax.broadcasted_iota(jnp.int32, (kh, kw), 0) * kw
          + lax.broadcasted_iota(jnp.int32, (kh, kw), 1)).astype(idx.dtype)
  dx = jnp.where(idx[:, :, None, :, None, :] == code[None, None, :, None, :, None],
                 g[:, :, None, :, None, :], jnp.zeros((), g.dtype))
  dx = dx.reshape(b, ho * kh, wo * kw, c)
  if (ho * kh, wo * kw) != (h, w):
    dx = jnp.pad(dx, ((0, 0), (0, h - ho * kh), (0, w - wo * kw), (0, 0)))
  return dx


def _taps_bwd(window, strides, padding, in_hw, idx, g):
  if window == strides and not any(p for pair in padding for p in pair):
    return (_disjoint_bwd(window, in_hw, idx, g),)
  kw, (sh, sw), (h, w) = window[1], strides, in_hw
  b, ho, wo, c = g.shape
  # Each output pixel's gradient goes to one input pixel: a scatter-add, its flat indices
  # computed in one fused loop. (Written as a sum of kh * kw interior-padded copies of the
  # masked gradient, XLA:CPU fused the argmax and that sum into every consumer of the gradient:
  # 2x the reduce-window gradient's time in DenseNet-121.) A maximum in the padding (a window
  # of -inf) gets an out-of-range index and is dropped.
  shape = (b, ho, wo, c)
  iota = lambda d: lax.broadcasted_iota(jnp.int32, shape, d)
  idx = idx.astype(jnp.int32)
  row = iota(1) * sh + idx // kw - padding[0][0]
  col = iota(2) * sw + idx % kw - padding[1][0]
  inside = (row >= 0) & (row < h) & (col >= 0) & (col < w)
  flat = jnp.where(inside, ((iota(0) * h + row) * w + col) * c + iota(3), b * h * w * c)
  dx = jnp.zeros((b * h * w * c,), g.dtype).at[flat.reshape(-1)].add(g.reshape(-1), mode='drop')
  return (dx.reshape(b, h, w, c),)


_max_pool_taps.defvjp(_taps_fwd, _taps_bwd)


def max_pool(x: jax.Array, window: int | Sequence[int], strides: int | Sequence[int],
             padding: str | Sequence[tuple[int, int]] = 'VALID', impl: str = 'auto') -> jax.Array:
  """Max pooling, NHWC: x [B, H, W, C] -> [B, H', W', C], H' = (H + pads - kh) // sh + 1
  (floor mode, as `flax.linen.max_pool` and torch's MaxPool2d). `padding` 'VALID' or
  ((top, bottom), (left, right)), padded with -inf; `impl` 'auto', 'taps' or 'xla'
  (`flax.linen.max_pool`)."""
  window, strides = pair(window), pair(strides)
  if isinstance(padding, str):
    if padding != 'VALID':
      raise ValueError(f"max_pool padding={padding!r}; expected 'VALID' or explicit pairs")
    padding = ((0, 0), (0, 0))
  padding = padding_pairs(padding)
  # 'taps' scatters its gradient with int32 flat indices (one past the end: dropped). A map
  # smaller than the window (tiny test models) has an empty output: flax's gives it.
  if (resolve_pool_impl(impl) == 'xla' or not jnp.issubdtype(x.dtype, jnp.floating)
      or x.size >= 2**31 - 1 or min(_out_hw(x.shape[1:3], window, strides, padding)) <= 0):
    return nn.max_pool(x, window, strides=strides, padding=padding)
  return _max_pool_taps(x, window, strides, padding, tuple(x.shape[1:3]))
