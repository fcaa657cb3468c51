"""BatchNorm (+ ReLU) with a hand-written training gradient, a drop-in for flax's `nn.BatchNorm`.

Autodiff of flax's BatchNorm (two-pass statistics, then `(x - mean) * scale * rsqrt(var + eps)
+ bias`, then ReLU) leaves XLA a backward of many element-wise passes over the map and, on
XLA:CPU, per-channel broadcasts materialised at full size. The training gradient here is the
textbook one (Ioffe & Szegedy 2015, as torch's fused kernels compute it), two passes over the
map: one for the per-channel sums, one for the input gradient:

  g = dL/dy (masked by y > 0 when the ReLU is fused), x^ = (x - mean) * rsqrt(var + eps)
  dL/dbias = sum(g),  dL/dscale = sum(g * x^)
  dL/dx = scale * rsqrt(var + eps) / n * (n * g - dL/dbias - x^ * dL/dscale)

with sums and n over the batch and spatial axes (and over `axis_name`'s devices when the batch
statistics are averaged across them). Forward values, parameters and batch statistics are those
of `nn.BatchNorm(use_fast_variance=False)` (two-pass variance, statistics in at least float32);
only the gradient's float rounding differs. The models' `bn_impl` picks it: 'auto' (their
default) is 'fused' on the CPU and 'autodiff' (flax's) elsewhere, where it has not been measured
yet. ResNet, DenseNet, MobileNet and U-Net fuse the ReLU that follows a BatchNorm into it.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from cxr_jax.parallel import match_varying

BN_IMPLS = ('auto', 'fused', 'autodiff')
ACTIVATIONS = ('', 'relu', 'relu6')

_F32 = jnp.float32


def _compute_dtype(x: jax.Array) -> Any:
  # At least float32 (float64 under jax_enable_x64 with float64 inputs), as flax's statistics.
  return jnp.promote_types(x.dtype, _F32)


def _moments(x: jax.Array, axis_name: str | None) -> tuple[jax.Array, jax.Array]:
  """Per-channel mean and (biased, two-pass) variance of x [..., C], in at least float32."""
  axes = tuple(range(x.ndim - 1))
  xf = x.astype(_compute_dtype(x))
  mean = xf.mean(axes)
  if axis_name is not None:
    mean = lax.pmean(mean, axis_name)
  var = jnp.square(xf - mean).mean(axes)
  if axis_name is not None:
    var = lax.pmean(var, axis_name)
  return mean, var


def _normalize(x, mean, var, scale, bias, epsilon, activation, dtype):
  inv = lax.rsqrt(var + epsilon)
  y = (x.astype(_compute_dtype(x)) - mean) * (scale * inv) + bias
  if activation == 'relu':
    y = jax.nn.relu(y)
  elif activation == 'relu6':
    y = jax.nn.relu6(y)
  return y.astype(dtype), inv


def _activation_mask(y: jax.Array, activation: str) -> jax.Array:
  # From the output, as jax.nn.relu's and relu6's own derivatives (0 at the kinks).
  return (y > 0) & (y < 6) if activation == 'relu6' else y > 0


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                     axis_name: str | None, activation: str,
                     dtype: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode BatchNorm over all but the last axis, optionally followed by ReLU or ReLU6.

  Args:
    x: [..., C] (e.g. [B, H, W, C]), any float dtype; statistics are computed in at least float32.
    scale, bias: [C] float32.
    epsilon: added to the variance.
    axis_name: mesh axis whose devices' batch statistics are averaged (inside shard_map), or None.
    activation: '' (none), 'relu' or 'relu6', applied to the normalised output (its gradient
      mask is taken from the output).
    dtype: the output's dtype.

  Returns:
    (y [..., C] in `dtype`, batch mean [C], batch variance [C]) (statistics in at least float32, the
    variance biased, as flax's).
  """
  mean, var = _moments(x, axis_name)
  y, _ = _normalize(x, mean, var, scale, bias, epsilon, activation, dtype)
  return y, mean, var


def _train_fwd(x, scale, bias, epsilon, axis_name, activation, dtype):
  # symbolic_zeros=True: the primals arrive as CustomVJPPrimal(value, perturbed).
  x, scale, bias = x.value, scale.value, bias.value
  mean, var = _moments(x, axis_name)
  y, inv = _normalize(x, mean, var, scale, bias, epsilon, activation, dtype)
  return (y, mean, var), (x, mean, inv, scale, y if activation else None)


def _train_bwd(epsilon, axis_name, activation, dtype, res, cotangents):
  del epsilon
  x, mean, inv, scale, y = res
  dy, dmean, dvar = cotangents
  axes = tuple(range(x.ndim - 1))
  cdtype = _compute_dtype(x)
  n = x.size // x.shape[-1]
  if axis_name is not None:
    n = n * lax.psum(1, axis_name)
  if isinstance(dy, SymbolicZero):
    dx = jnp.zeros(x.shape, cdtype)
    dscale = dbias = jnp.zeros_like(scale)
  else:
    g = dy.astype(cdtype)
    if activation:
      g = jnp.where(_activation_mask(y, activation), g, 0)
    xhat = (x.astype(cdtype) - mean) * inv
    dbias = g.sum(axes)
    dscale = (g * xhat).sum(axes)
    sum_dbias, sum_dscale = dbias, dscale
    if axis_name is not None:
      sum_dbias, sum_dscale = lax.psum((dbias, dscale), axis_name)
    dx = (scale * inv / n) * (n * g - sum_dbias - xhat * sum_dscale)
  # The statistics' own cotangents are symbolic zeros in a train step (they only feed the
  # running averages, under stop_gradient); added for correctness under any other use.
  if not isinstance(dmean, SymbolicZero):
    dx = dx + dmean / n
  if not isinstance(dvar, SymbolicZero):
    dx = dx + (2 / n) * dvar * (x.astype(cdtype) - mean)
  return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


batch_norm_train.defvjp(_train_fwd, _train_bwd, symbolic_zeros=True)


def resolve_bn_impl(impl: str) -> str:
  """'auto' -> 'fused' on the CPU (where it was measured faster), 'autodiff' elsewhere (XLA's
  GPU/TPU fusions of the autodiff gradient are not measured against it yet); others checked."""
  if impl not in BN_IMPLS:
    raise ValueError(f'bn_impl={impl!r}: expected one of {BN_IMPLS}.')
  if impl == 'auto':
    return 'fused' if jax.default_backend() == 'cpu' else 'autodiff'
  return impl


class BatchNorm(nn.Module):
  """`nn.BatchNorm` over the last axis, optionally fused with the ReLU (or ReLU6) after it.

  Same variables as flax's (params `scale` [C], `bias` [C]; batch_stats `mean`, `var`), same
  running-average update (`momentum` * old + (1 - momentum) * batch statistic, flax's biased
  variance), same forward values. `impl='fused'` trains through `batch_norm_train`'s gradient;
  `impl='autodiff'` differentiates the same forward automatically (what flax's BatchNorm does),
  kept for comparison and benchmarks.

  Attributes:
    use_running_average: normalise with the running statistics (inference) instead of the batch's.
    momentum: of the running averages (flax's convention: 0.9 = torch's momentum 0.1).
    epsilon: added to the variance.
    axis_name: mesh axis over which batch statistics are averaged while training.
    dtype: output dtype (statistics in at least float32).
    activation: '' (none), 'relu' or 'relu6' after the normalisation.
    impl: 'fused', 'autodiff' or 'auto' ('fused' on the CPU, 'autodiff' elsewhere).
  """

  use_running_average: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5
  axis_name: str | None = None
  dtype: Any = jnp.float32
  activation: str = ''
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., C] -> [..., C] in `dtype`."""
    impl = resolve_bn_impl(self.impl)
    if self.activation not in ACTIVATIONS:
      raise ValueError(f'BatchNorm activation={self.activation!r}: expected one of '
                       f'{ACTIVATIONS}.')
    channels = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (channels,), _F32)
    bias = self.param('bias', nn.initializers.zeros, (channels,), _F32)
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((channels,), _F32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((channels,), _F32))
    dtype = self.dtype or x.dtype
    if self.use_running_average:
      y, _ = _normalize(x, ra_mean.value, ra_var.value, scale, bias, self.epsilon,
                        self.activation, dtype)
      return y
    axis_name = None if self.is_initializing() else self.axis_name
    if impl == 'fused':
      y, mean, var = batch_norm_train(x, match_varying(scale, x), match_varying(bias, x),
                                      self.epsilon, axis_name, self.activation, dtype)
    else:
      mean, var = _moments(x, axis_name)
      y, _ = _normalize(x, mean, var, scale, bias, self.epsilon, self.activation, dtype)
    if not self.is_initializing():
      mean, var = lax.stop_gradient(mean), lax.stop_gradient(var)
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y


def batch_norm(axis_name: str | None, dtype: Any, name: str, train: bool, *,
               activation: str = '', impl: str = 'auto') -> BatchNorm:
  """torchvision's BatchNorm2d defaults (eps 1e-5, momentum 0.1 = flax's 0.9), `activation`
  (e.g. the 'relu' after it) fused.

  (torch updates its running variance with the unbiased batch variance, flax and this module
  with the biased one: a factor n / (n - 1) on the statistics that training accumulates,
  nothing else.)
  """
  return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                   axis_name=axis_name if train else None, dtype=dtype, activation=activation,
                   impl=impl, name=name)
