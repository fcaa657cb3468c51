"""BatchNorm with the hand-written training gradient (cxr_jax/models/batch_norm.py) against flax's
BatchNorm + activation (autodiff): values, gradients, running statistics, devices, dtypes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cxr_jax import parallel
from cxr_jax.models import batch_norm as bn
from cxr_jax.models import densenet, mobilenet, resnet, unet

ACT = {'': lambda y: y, 'relu': nn.relu, 'relu6': nn.relu6}


def _close(a, b, rtol=1e-5):
  """Every leaf equal to rtol of its largest magnitude (float32 rounding differs by CPU)."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert x.shape == y.shape
    np.testing.assert_allclose(x, y, rtol=0, atol=rtol * max(np.max(np.abs(y)), 1e-6))


def _data(shape=(4, 5, 6, 7), seed=0):
  rng = np.random.default_rng(seed)
  c = shape[-1]
  # Channel means far from 0 and spreads far from 1: the two-pass statistics matter.
  x = rng.normal(size=shape) * rng.uniform(0.5, 4, c) + rng.normal(size=c) * 3
  params = {'scale': rng.uniform(0.5, 2, c), 'bias': rng.normal(size=c)}
  stats = {'mean': rng.normal(size=c), 'var': rng.uniform(0.5, 2, c)}
  w = rng.normal(size=shape)
  f = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)  # noqa: E731
  return f(x), f(params), f(stats), f(w)


def _flax(activation, momentum=0.9, epsilon=1e-5, axis_name=None, dtype=jnp.float32):
  norm = nn.BatchNorm(use_running_average=False, momentum=momentum, epsilon=epsilon,
                      axis_name=axis_name, dtype=dtype, use_fast_variance=False)
  return norm, ACT[activation]


def _value_grads(module, act, params, stats, x, w):
  """Loss sum(act(module(x)) * w), its gradients w.r.t. params and x, new batch_stats."""
  def loss(params, x):
    y, new = module.apply({'params': params, 'batch_stats': stats}, x, mutable=['batch_stats'])
    y = act(y)
    return jnp.sum(y.astype(jnp.float32) * w), (new['batch_stats'], y)
  (value, (new_stats, y)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      params, x)
  return value, grads, new_stats, y


@pytest.mark.parametrize('activation', ['', 'relu', 'relu6'])
@pytest.mark.parametrize('impl', ['fused', 'autodiff'])
def test_values_gradients_and_running_stats_equal_flax(activation, impl):
  x, params, stats, w = _data()
  params = {**params, 'scale': params['scale'] * 4}  # relu6's upper kink inside the range
  ours = bn.BatchNorm(activation=activation, impl=impl)
  ref, act = _flax(activation)
  assert (jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x))
          == jax.tree.map(jnp.shape, ref.init(jax.random.key(0), x)))
  got = _value_grads(ours, lambda y: y, params, stats, x, w)
  want = _value_grads(ref, act, params, stats, x, w)
  _close(got[3], want[3], 1e-6)  # forward values
  _close(got[2], want[2], 1e-6)  # running statistics
  _close(got[1], want[1])  # d/dscale, d/dbias, d/dx
  if activation == 'relu6':
    assert 0 < float(jnp.mean(got[3] == 6)) < 0.5  # both kinks exercised


def test_gradient_against_hand_computed_batch_norm_formula():
  """1 channel, 4 values: dL/dx of sum(w * BN(x)) from the closed form, computed in float64."""
  x = np.array([1.0, 2.0, 4.0, 7.0])
  w = np.array([0.5, -1.0, 2.0, 0.25])
  gamma, beta, eps = 1.5, 0.2, 1e-5
  n, mu = 4, x.mean()
  var = ((x - mu) ** 2).mean()
  inv = 1 / np.sqrt(var + eps)
  xhat = (x - mu) * inv
  want_dx = gamma * inv / n * (n * w - w.sum() - xhat * (w * xhat).sum())
  f = lambda x, s, b: jnp.sum(  # noqa: E731
      bn.batch_norm_train(x, s, b, eps, None, '', jnp.float32)[0][..., 0] * w)
  dx, ds, db = jax.grad(f, argnums=(0, 1, 2))(
      jnp.asarray(x[:, None], jnp.float32), jnp.full((1,), gamma, jnp.float32),
      jnp.full((1,), beta, jnp.float32))
  np.testing.assert_allclose(np.asarray(dx)[:, 0], want_dx, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ds, [(w * xhat).sum()], rtol=1e-5)
  np.testing.assert_allclose(db, [w.sum()], rtol=1e-6)


def test_gradient_through_the_batch_statistics_themselves():
  """Cotangents on the returned mean/var (no train step sends them) follow autodiff too."""
  x, params, _, w = _data(seed=1)

  def loss(fn):
    def f(x, s, b):
      y, mean, var = fn(x, s, b)
      return jnp.sum(y * w) + jnp.sum(jnp.sin(mean)) + jnp.sum(var * jnp.arange(var.size))
    return f

  def autodiff(x, s, b):
    mean, var = bn._moments(x, None)
    return bn._normalize(x, mean, var, s, b, 1e-5, 'relu', jnp.float32)[0], mean, var

  fused = lambda x, s, b: bn.batch_norm_train(x, s, b, 1e-5, None, 'relu', jnp.float32)  # noqa: E731
  args = (x, params['scale'], params['bias'])
  _close(jax.grad(loss(fused), argnums=(0, 1, 2))(*args),
         jax.grad(loss(autodiff), argnums=(0, 1, 2))(*args))


def test_eval_mode_uses_running_statistics_as_flax():
  x, params, stats, _ = _data(seed=2)
  variables = {'params': params, 'batch_stats': stats}
  got = bn.BatchNorm(use_running_average=True, activation='relu').apply(variables, x)
  norm = nn.BatchNorm(use_running_average=True, epsilon=1e-5, use_fast_variance=False)
  np.testing.assert_array_equal(got, nn.relu(norm.apply(variables, x)))


def test_sharded_batch_statistics_and_gradients_equal_one_device():
  """Inside shard_map over 8 devices with axis_name: statistics of the global batch, gradients
  w.r.t. the replicated parameters summed over devices: the single-device full-batch result."""
  mesh = parallel.make_mesh()
  n = mesh.shape[parallel.DATA_AXIS]
  x, params, stats, w = _data(shape=(2 * n, 3, 3, 5), seed=3)

  def grads(axis_name):
    module = bn.BatchNorm(activation='relu', axis_name=axis_name)

    def loss(params, x, w):
      y, new = module.apply({'params': params, 'batch_stats': stats}, x, mutable=['batch_stats'])
      total = jnp.sum(y * w)
      return (jax.lax.psum(total, axis_name) if axis_name else total), new['batch_stats']
    return jax.grad(loss, has_aux=True)

  sharded = jax.jit(jax.shard_map(
      lambda p, x, w: grads(parallel.DATA_AXIS)(p, x, w), mesh=mesh,
      in_specs=(P(), P(parallel.DATA_AXIS), P(parallel.DATA_AXIS)), out_specs=(P(), P())))
  _close(sharded(params, x, w), grads(None)(params, x, w))


def test_bfloat16_output_close_to_flax():
  x, params, stats, w = _data(seed=4)
  variables = {'params': params, 'batch_stats': stats}
  y, _ = bn.BatchNorm(activation='relu', dtype=jnp.bfloat16).apply(
      variables, x.astype(jnp.bfloat16), mutable=['batch_stats'])
  norm = nn.BatchNorm(use_running_average=False, epsilon=1e-5, use_fast_variance=False,
                      dtype=jnp.bfloat16)
  ref, _ = norm.apply(variables, x.astype(jnp.bfloat16), mutable=['batch_stats'])
  assert y.dtype == jnp.bfloat16
  _close(y, nn.relu(ref), 1e-2)
  g = jax.grad(lambda x: jnp.sum(bn.batch_norm_train(
      x, params['scale'], params['bias'], 1e-5, None, 'relu', jnp.bfloat16)[0] * w))(
          x.astype(jnp.bfloat16))
  assert g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g)))


def test_unknown_impl_and_activation_are_refused():
  x = jnp.ones((2, 3, 3, 4))
  with pytest.raises(ValueError, match="bn_impl='cudnn'.*auto"):
    bn.BatchNorm(impl='cudnn').init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="activation='gelu'"):
    bn.BatchNorm(activation='gelu').init(jax.random.key(0), x)


@pytest.mark.parametrize('build', [
    lambda impl: resnet.ResNet(num_classes=3, stage_sizes=(1, 1, 1, 1), width=8, bn_impl=impl),
    lambda impl: densenet.DenseNet(num_classes=3, growth_rate=4, block_config=(2, 2),
                                   num_init_features=8, bn_impl=impl),
    lambda impl: mobilenet.MobileNetV1(num_classes=3, width_multiplier=0.25,
                                       blocks=((64, 1), (128, 2)), bn_impl=impl),
    lambda impl: unet.UNet(num_classes=2, depth=2, base_width=4, bn_impl=impl),
], ids=['resnet', 'densenet', 'mobilenet', 'unet'])
def test_backbones_train_the_same_with_either_impl(build):
  """A training-mode loss, its parameter gradients and the new batch statistics of each
  backbone: 'fused' equals 'autodiff' (same variables, float rounding apart)."""
  x = jnp.asarray(np.random.default_rng(5).normal(size=(4, 32, 32, 3)), jnp.float32)

  def run(impl):
    model = build(impl)
    variables = model.init(jax.random.key(0), x)

    def loss(params):
      logits, new = model.apply({**variables, 'params': params}, x, train=True,
                                mutable=['batch_stats'])
      return jnp.sum(jnp.sin(logits)), new['batch_stats']
    return jax.value_and_grad(loss, has_aux=True)(variables['params'])

  got, want = run('fused'), run('autodiff')
  _close(got[0], want[0], 1e-5)  # loss, batch statistics
  # Gradients against the largest of all: some are float32 noise around an exact 0 (the bias
  # of a BatchNorm whose output only feeds another BatchNorm's statistics after a linear map).
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want[1]))
  for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale)


def test_auto_is_fused_on_the_cpu_only():
  assert bn.resolve_bn_impl('auto') == ('fused' if jax.default_backend() == 'cpu'
                                        else 'autodiff')
  assert bn.resolve_bn_impl('autodiff') == 'autodiff'


def test_float64_inputs_keep_float64_statistics():
  """Under jax_enable_x64 float64 maps are normalised in float64, as flax does (the 8-vs-1
  device float64 train step test relies on it)."""
  with jax.enable_x64(True):
    x, params, _, w = _data(seed=6)
    x, w = x.astype(jnp.float64), w.astype(jnp.float64)
    fused = lambda x: jnp.sum(bn.batch_norm_train(  # noqa: E731
        x, params['scale'], params['bias'], 1e-5, None, 'relu', jnp.float64)[0] * w)

    def autodiff(x):
      mean, var = bn._moments(x, None)
      return jnp.sum(bn._normalize(x, mean, var, params['scale'], params['bias'], 1e-5, 'relu',
                                   jnp.float64)[0] * w)
    assert bn._moments(x, None)[0].dtype == jnp.float64
    np.testing.assert_allclose(jax.grad(fused)(x), jax.grad(autodiff)(x), rtol=0, atol=1e-12)
