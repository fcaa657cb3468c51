"""conv_impl (cxr_jax/models/conv.py): every implementation equals `lax.conv_general_dilated`
forward and in both gradients, keeps `flax.linen.Conv`'s parameters, and the backbones give the
same logits and gradients whichever implementation they use."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

from cxr_jax import parallel
from cxr_jax.models import conv, densenet, mobilenet, resnet, vgg

IMPLS = ('matmul', 'patches')


def _close(a, b, rtol: float = 1e-5) -> None:
  """|a - b| <= rtol * max|b| (float32 results differ between CPUs; scale to the magnitude)."""
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape
  np.testing.assert_allclose(a, b, atol=rtol * max(float(np.max(np.abs(b))), 1e-30), rtol=0)


def _tree_close(a, b, rtol: float = 1e-5) -> None:
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    _close(x, y, rtol)


# (kernel, stride, padding, dilation, input size): 1x1 (strided too, as in ResNet's projection
# shortcuts), 3x3 with and without stride, atrous 3x3, the 7x7/2 stems, uneven padding.
CASES = [
    ((1, 1), 1, ((0, 0), (0, 0)), 1, 9),
    ((1, 1), 2, ((0, 0), (0, 0)), 1, 9),
    ((3, 3), 1, ((1, 1), (1, 1)), 1, 8),
    ((3, 3), 2, ((1, 1), (1, 1)), 1, 9),
    ((3, 3), 1, ((2, 2), (2, 2)), 2, 8),
    ((7, 7), 2, ((3, 3), (3, 3)), 1, 16),
    ((3, 3), 2, ((0, 1), (1, 0)), 1, 8),
    ((1, 3), 1, ((0, 0), (1, 1)), 1, 7),
]


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('kernel_size,stride,padding,dilation,size', CASES)
def test_conv_equals_lax_conv_forward_and_gradients(impl, kernel_size, stride, padding, dilation,
                                                    size):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, size, size + 1, 5)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(*kernel_size, 5, 6)), jnp.float32)

  def ref(x, k):
    return lax.conv_general_dilated(x, k, (stride, stride), padding,
                                    rhs_dilation=(dilation, dilation),
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  m = conv.Conv(6, kernel_size, strides=stride, padding=padding, kernel_dilation=dilation,
                use_bias=False, impl=impl)
  ours = lambda x, k: m.apply({'params': {'kernel': k}}, x)
  y = ref(x, k)
  _close(ours(x, k), y)
  g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)  # a random cotangent
  loss = lambda f: lambda x, k: jnp.sum(f(x, k) * g)
  _tree_close(jax.grad(loss(ours), argnums=(0, 1))(x, k),
              jax.grad(loss(ref), argnums=(0, 1))(x, k))


# (batch, C, O, kernel, stride, padding, dilation): which side is patched (the gradient's where
# O < C at stride 1), one matmul or one per tap (over 64 channels), batch chunks (gcd(B, 4)).
WGRAD_CASES = [
    (3, 8, 3, (3, 3), 1, ((2, 2), (1, 3)), 2),  # gradient patches, one matmul, 1 chunk
    (4, 70, 66, (3, 3), 2, ((1, 1), (1, 1)), 1),  # input patches per tap, strided, 4 chunks
    (6, 80, 70, (3, 2), 1, ((1, 1), (0, 1)), 1),  # gradient patches per tap, 2 chunks
    (8, 4, 5, (7, 7), 2, ((3, 3), (3, 3)), 1),  # input patches, one matmul (a stem)
]


@pytest.mark.parametrize('b,c,o,kernel_size,stride,padding,dilation', WGRAD_CASES)
def test_weight_gradient_paths_equal_autodiff_of_lax_conv(b, c, o, kernel_size, stride, padding,
                                                         dilation):
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(b, 9, 8, c)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(*kernel_size, c, o)), jnp.float32)
  strides, dil = (stride, stride), (dilation, dilation)
  y, vjp = jax.vjp(lambda k: conv.xla_conv(x, k, strides, padding, dil), k)
  g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  _close(jax.jit(conv.conv_weight_grad, static_argnums=(2, 3, 4, 5))(
      x, g, k.shape, strides, padding, dil), vjp(g)[0])


@pytest.mark.parametrize('impl', ('auto', 'xla') + IMPLS)
def test_same_parameters_and_initialisation_as_flax_conv(impl):
  x = jnp.ones((1, 6, 6, 3))
  kw = dict(features=4, kernel_size=(3, 3), strides=2, padding=((1, 1), (1, 1)))
  theirs = nn.Conv(**kw).init(jax.random.key(3), x)
  ours = conv.Conv(**kw, impl=impl).init(jax.random.key(3), x)
  _tree_close(ours, theirs, rtol=0)
  _close(conv.Conv(**kw, impl=impl).apply(ours, x), nn.Conv(**kw).apply(theirs, x))


def test_bf16_compute_keeps_float32_parameters():
  m = conv.Conv(4, (1, 1), dtype=jnp.bfloat16, impl='matmul')
  v = m.init(jax.random.key(0), jnp.ones((1, 4, 4, 3)))
  assert v['params']['kernel'].dtype == jnp.float32
  assert m.apply(v, jnp.ones((1, 4, 4, 3))).dtype == jnp.bfloat16


def test_pointwise_weight_gradient_makes_no_transposed_copy_of_the_map():
  """'matmul' contracts a [B*H*W, C] matrix: contracting the 4-D map over three dimensions made
  XLA:CPU copy the output gradient transposed ([C_out, B*H*W]) before the weight gradient's
  product, 20% of MobileNet v1's train step at 224 px."""
  if jax.default_backend() != 'cpu':
    pytest.skip('an XLA:CPU program')
  from cxr_jax import xla_options
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 8)), jnp.float32)
  m = conv.Conv(24, (1, 1), use_bias=False, impl='matmul')
  variables = m.init(jax.random.key(0), x)
  loss = lambda v, x: jnp.sum(jax.nn.relu(m.apply(v, x) - 0.1) ** 2)
  text = xla_options.jit(jax.grad(loss)).lower(variables, x).compile().as_text()
  assert 'f32[2,16,16,24]' in text or 'f32[512,24]' in text  # the map is in the program
  for transposed in ('f32[24,512]', 'f32[8,512]', 'f32[24,2,16,16]', 'f32[8,2,16,16]'):
    assert transposed not in text, transposed


def test_resolve_conv_impl():
  assert conv.resolve_conv_impl('auto') == ('matmul' if jax.default_backend() == 'cpu' else 'xla')
  assert conv.resolve_conv_impl('patches') == 'patches'
  with pytest.raises(ValueError, match="conv_impl='im2col'.*valid"):
    conv.resolve_conv_impl('im2col')


def test_patches_weight_gradient_is_summed_over_the_data_axis_in_shard_map():
  """Inside the train step's shard_map the kernel is replicated: the custom vjp's per-device
  weight gradient must come back summed over devices, as autodiff of lax.conv does."""
  mesh = parallel.make_mesh()
  n = mesh.shape[parallel.DATA_AXIS]
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(n * 2, 6, 6, 3)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)

  def grad_fn(impl):
    m = conv.Conv(4, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, impl=impl)
    loss = lambda k, x: jnp.sum(jnp.sin(m.apply({'params': {'kernel': k}}, x)))
    return jax.jit(jax.shard_map(lambda k, x: jax.grad(loss)(k, x), mesh=mesh,
                                 in_specs=(P(), P(parallel.DATA_AXIS)), out_specs=P()))

  _close(grad_fn('patches')(k, x), grad_fn('xla')(k, x))


def _model_outputs(model, x):
  """Logits and parameter gradients, BatchNorm on running statistics: batch statistics of 2
  examples on 1 x 1 maps would amplify float32 rounding into 1e-3 differences."""
  variables = model.init(jax.random.key(0), x)

  def loss(params):
    logits = model.apply({**variables, 'params': params}, x, train=False)
    return jnp.sum(jnp.sin(logits)), logits

  (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(variables['params'])
  return variables, logits, grads


@pytest.mark.parametrize('build', [
    lambda impl: resnet.ResNet(num_classes=3, stage_sizes=(1, 1, 1, 1), width=8, conv_impl=impl),
    lambda impl: densenet.DenseNet(num_classes=3, growth_rate=4, block_config=(2, 2),
                                   num_init_features=8, conv_impl=impl),
    lambda impl: vgg.VGG(num_classes=3, depths=(1, 1), widths=(4, 8), hidden=16,
                         conv_impl=impl),
    lambda impl: mobilenet.MobileNetV1(num_classes=3, width_multiplier=0.25, conv_impl=impl,
                                       blocks=mobilenet.MOBILENET_V1_BLOCKS[:4]),
], ids=['resnet', 'densenet', 'vgg', 'mobilenet'])
def test_backbones_same_parameters_logits_and_gradients_for_every_impl(build):
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 32, 32, 3)), jnp.float32)
  ref_vars, ref_logits, ref_grads = _model_outputs(build('xla'), x)
  for impl in IMPLS:
    variables, logits, grads = _model_outputs(build(impl), x)
    _tree_close(variables, ref_vars, rtol=0)
    # A whole network compounds float32 rounding: 1e-4 of the magnitude, not 1e-5.
    _close(logits, ref_logits, 1e-4)
    _tree_close(grads, ref_grads, 1e-4)
