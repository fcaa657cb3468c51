import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cxr_jax.models import build_model
from cxr_jax.models.mobilenet import MOBILENET_V1_BLOCKS, MobileNetV1


def _count(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


def _np_variables(model, x, seed: int = 5) -> dict:
  """Random variables in the layout `model.init` gives, drawn with numpy (compiling `init` op by
  op takes seconds): kernels ~ N(0, 1/fan_in), BatchNorm scales and variances in [0.5, 1.5] (so
  that a misplaced BatchNorm cannot hide behind 1s), everything else ~ N(0, 0.1)."""
  rng = np.random.default_rng(seed)
  draw = {'kernel': lambda s: rng.normal(0.0, np.prod(s[:-1]) ** -0.5, s),
          'var': lambda s: rng.uniform(0.5, 1.5, s), 'scale': lambda s: rng.uniform(0.5, 1.5, s)}
  return jax.tree_util.tree_map_with_path(
      lambda path, v: draw.get(path[-1].key, lambda s: rng.normal(0.0, 0.1, s))(
          v.shape).astype(np.float32), jax.eval_shape(model.init, jax.random.key(0), x))


def _assert_close_to_scale(actual, desired, rtol: float = 1e-5) -> None:
  """For float32 sums: an element where terms cancel carries rounding errors the size of the
  terms, not its own (and summation order differs between CPUs and implementations), so the
  absolute tolerance follows the array's largest element."""
  desired = np.asarray(desired)
  np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * np.abs(desired).max())


def test_mobilenet_v1_parameter_count_matches_keras():
  # keras.applications.MobileNet(alpha=1.0, weights=None, include_top=True): 4,231,976 trainable
  # parameters (the non-trainable rest are BatchNorm moving statistics), dropout aside.
  model = MobileNetV1(num_classes=1000)
  v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  assert _count(v['params']) == 4_231_976
  assert _count(v['batch_stats']) == 21_888


def test_mobilenet_v1_width_multiplier_half():
  # Keras MobileNet(alpha=0.5): 1,342,536 parameters in total for 1000 classes, of which
  # 10,944 are moving statistics.
  model = MobileNetV1(num_classes=1000, width_multiplier=0.5)
  v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  assert _count(v['params']) + _count(v['batch_stats']) == 1_342_536


def test_mobilenet_shapes_and_intermediates():
  model = MobileNetV1(num_classes=13, width_multiplier=0.25)
  x = jnp.ones((2, 64, 64, 1))
  variables = model.init(jax.random.key(0), x)
  logits, inter = model.apply(variables, x, mutable=['intermediates'])
  assert logits.shape == (2, 13) and logits.dtype == jnp.float32
  inter = inter['intermediates']
  assert inter['features'][0].shape == (2, 2, 2, 256)
  assert inter['pooled'][0].shape == (2, 256)
  assert inter['conv_stem'][0].shape == (2, 32, 32, 8)
  assert {f'block_{i}' for i in range(1, 14)} <= set(inter)


def test_mobilenet_train_mode_updates_batch_stats_and_bf16():
  model = MobileNetV1(num_classes=3, width_multiplier=0.25, dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  variables = model.init(jax.random.key(0), x)
  assert jax.tree.leaves(variables['params'])[0].dtype == jnp.float32
  logits, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
  assert logits.dtype == jnp.float32
  before = variables['batch_stats']['stem']['bn']['mean']
  after = updates['batch_stats']['stem']['bn']['mean']
  assert not np.allclose(before, after)


def test_output_stride_strides_and_dilations_follow_tf_slim():
  # TF-slim's mobilenet_v1_base(output_stride=8): blocks 6 and 12 lose their stride; block 6
  # keeps rate 1, blocks 7-12 get rate 2, block 13 rate 4.
  assert MobileNetV1(num_classes=2, output_stride=8).block_strides() == [
      (1, 1), (2, 1), (1, 1), (2, 1), (1, 1), (1, 1)] + [(1, 2)] * 6 + [(1, 4)]
  assert MobileNetV1(num_classes=2, output_stride=16).block_strides()[10:] == [
      (1, 1), (1, 1), (1, 2)]
  default = MobileNetV1(num_classes=2).block_strides()
  assert default == MobileNetV1(num_classes=2, output_stride=64).block_strides()
  assert default == [(s, 1) for _, s in MOBILENET_V1_BLOCKS]
  for bad in (1, 12):
    with pytest.raises(ValueError, match='output_stride must be a power of 2'):
      MobileNetV1(num_classes=2, output_stride=bad).block_strides()


def test_output_stride_keeps_parameters_and_samples_the_same_features_densely():
  # Atrous convolution computes the strided network's features at more positions: with
  # BatchNorm's running statistics (inference), the output-stride-32 map is every 4th location
  # of the output-stride-8 map, starting at 3 (each removed stride at rate r shifts the grid by
  # r: SAME padding puts a stride-2 output's taps at 2i..2i+2, centred on 2i+1). MobileNet's
  # stride pattern with fewer, narrower blocks, to compile quickly.
  blocks = ((16, 1), (16, 2), (16, 1), (32, 2), (32, 2), (32, 1), (64, 2), (64, 1))
  x = jax.random.normal(jax.random.key(2), (2, 64, 64, 3))
  coarse = MobileNetV1(num_classes=3, blocks=blocks)
  variables = _np_variables(coarse, x)
  shapes = jax.tree.map(jnp.shape, variables)
  # One jit per model compiles faster than running `apply` op by op.
  features = lambda m: jax.jit(lambda v: m.apply(v, x, return_features=True)[1])(variables)
  f32 = features(coarse)
  assert f32.shape == (2, 2, 2, 64)
  for output_stride, size in ((16, 4), (8, 8)):
    dense = MobileNetV1(num_classes=3, blocks=blocks, output_stride=output_stride)
    assert jax.tree.map(jnp.shape, jax.eval_shape(dense.init, jax.random.key(0), x)) == shapes
    f = features(dense)
    assert f.shape == (2, size, size, 64)
    step = 32 // output_stride
    _assert_close_to_scale(f[:, step - 1::step, step - 1::step], f32)


def test_build_model_errors():
  with pytest.raises(ValueError, match='valid names: .*mobilenet_v1'):
    build_model(ml_collections.ConfigDict({'name': 'mobilenet_v9'}), num_classes=2)
  with pytest.raises(ValueError, match='config.model: bad arguments'):
    build_model(ml_collections.ConfigDict({'name': 'mobilenet_v1', 'wdth': 1}), num_classes=2)
  with pytest.raises(ValueError, match='Unknown dtype'):
    build_model(ml_collections.ConfigDict({'name': 'mobilenet_v1'}), num_classes=2,
                dtype='float8')


@pytest.mark.parametrize('size,stride,dilation', [
    (8, 1, 1), (8, 2, 1), (7, 2, 1), (5, 1, 1),
    (8, 1, 2), (7, 1, 2), (8, 1, 4), (4, 1, 4), (9, 2, 2)])
def test_depthwise_shifts_equal_grouped_convolution(size, stride, dilation):
  from cxr_jax.models.depthwise import DepthwiseConv
  x = jax.random.normal(jax.random.key(0), (2, size, size, 6))
  fast = DepthwiseConv(3, stride, impl='shifts', dilation=dilation)
  ref = DepthwiseConv(3, stride, impl='xla', dilation=dilation)
  variables = fast.init(jax.random.key(1), x)
  out = fast.apply(variables, x)
  assert out.shape == (2, -(-size // stride), -(-size // stride), 6)
  _assert_close_to_scale(out, ref.apply(variables, x))
  # Gradients agree too (the training path), for the kernel and the input.
  g_fast = jax.grad(lambda v, x: (fast.apply(v, x) ** 2).sum(), argnums=(0, 1))(variables, x)
  g_ref = jax.grad(lambda v, x: (ref.apply(v, x) ** 2).sum(), argnums=(0, 1))(variables, x)
  _assert_close_to_scale(g_fast[0]['params']['kernel'], g_ref[0]['params']['kernel'])
  _assert_close_to_scale(g_fast[1], g_ref[1])


def _depthwise_kernel_grad_reference(x, g, stride, dilation):
  """sum over b, y, x of xpad[b, s*y + d*i, s*x + d*j, c] * g[b, y, x, c], float64 loops."""
  from cxr_jax.models.depthwise import same_padding
  x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
  (top, bottom), (left, right) = (same_padding(n, 3, stride, dilation) for n in x.shape[1:3])
  xp = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  ho, wo = g.shape[1:3]
  out = np.zeros((3, 3, 1, x.shape[-1]))
  for i in range(3):
    for j in range(3):
      tap = xp[:, i * dilation:, j * dilation:][:, :(ho - 1) * stride + 1:stride,
                                                :(wo - 1) * stride + 1:stride]
      out[i, j, 0] = (tap * g).sum((0, 1, 2))
  return out


@pytest.mark.parametrize('size,stride,dilation', [(8, 1, 1), (7, 2, 1), (9, 1, 2), (6, 2, 2)])
def test_depthwise_kernel_grad_equals_hand_written_sum(size, stride, dilation):
  from cxr_jax.models.depthwise import depthwise_conv_shifts, depthwise_kernel_grad
  rng = np.random.default_rng(3)
  x = rng.normal(size=(3, size, size + 1, 4)).astype(np.float32)
  k = rng.normal(size=(3, 3, 1, 4)).astype(np.float32)
  out_hw = (-(-size // stride), -(-(size + 1) // stride))
  g = rng.normal(size=(3, *out_hw, 4)).astype(np.float32)
  want = _depthwise_kernel_grad_reference(x, g, stride, dilation)
  _assert_close_to_scale(depthwise_kernel_grad(jnp.asarray(x), jnp.asarray(g), (3, 3, 1, 4),
                                               stride, dilation), want)
  # ... and is what the custom gradient of depthwise_conv_shifts returns.
  _, vjp = jax.vjp(lambda k: depthwise_conv_shifts(jnp.asarray(x), k, stride, dilation),
                   jnp.asarray(k))
  _assert_close_to_scale(vjp(jnp.asarray(g))[0], want)


def test_depthwise_kernel_grad_accumulates_bfloat16_in_float32():
  from cxr_jax.models.depthwise import depthwise_kernel_grad
  rng = np.random.default_rng(4)
  # 2 x 64 x 64 products per kernel entry: a bfloat16 running sum would be off by ~1e-2.
  x = jnp.asarray(rng.normal(size=(2, 64, 64, 3)), jnp.bfloat16)
  g = jnp.asarray(rng.normal(size=(2, 64, 64, 3)), jnp.bfloat16)
  got = depthwise_kernel_grad(x, g, (3, 3, 1, 3), 1)
  assert got.dtype == jnp.float32
  _assert_close_to_scale(got, _depthwise_kernel_grad_reference(
      np.asarray(x, np.float32), np.asarray(g, np.float32), 1, 1))


def test_depthwise_backward_keeps_the_input_not_its_taps():
  """The train step's memory and time: autodiff of the shifted sum keeps all nine taps of x for
  the kernel gradient; the hand-written gradient keeps x and the kernel only."""
  from cxr_jax.models.depthwise import depthwise_conv_shifts
  x, k = jnp.ones((2, 16, 16, 8)), jnp.ones((3, 3, 1, 8))
  for stride in (1, 2):
    _, vjp = jax.vjp(lambda x, k, s=stride: depthwise_conv_shifts(x, k, s), x, k)
    kept = sum(leaf.size for leaf in jax.tree.leaves(vjp))
    assert kept <= x.size + k.size, (stride, kept)


def test_depthwise_parameters_match_flax_grouped_conv_layout():
  from cxr_jax.models.depthwise import DepthwiseConv
  x = jnp.ones((1, 8, 8, 4))
  ours = DepthwiseConv(3, 1).init(jax.random.key(0), x)['params']['kernel']
  theirs = jax.eval_shape(lambda: __import__('flax').linen.Conv(
      4, (3, 3), feature_group_count=4, use_bias=False).init(jax.random.key(0), x))
  assert ours.shape == theirs['params']['kernel'].shape == (3, 3, 1, 4)
  with pytest.raises(ValueError, match="impl='fft'"):
    DepthwiseConv(3, 1, impl='fft').init(jax.random.key(0), x)


def test_return_features_and_head_fn_reproduce_logits():
  from cxr_jax.models.mobilenet import head_fn
  model = MobileNetV1(num_classes=4, width_multiplier=0.25)
  x = jax.random.normal(jax.random.key(2), (3, 64, 64, 3))
  variables = model.init(jax.random.key(0), x)
  logits = model.apply(variables, x)
  logits2, features = model.apply(variables, x, return_features=True)
  np.testing.assert_array_equal(logits, logits2)
  assert features.shape == (3, 2, 2, 256)
  np.testing.assert_allclose(head_fn(model, variables)(features), logits, rtol=1e-5, atol=1e-6)


def test_mobilenet_lstm_attention_wrapper():
  from cxr_jax.models.mobilenet_lstm_attention import MobileNetLSTMAttention, attention_head_fn
  model = MobileNetLSTMAttention(num_classes=3, width_multiplier=0.25, blocks=((16, 2), (32, 2)))
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 1))
  variables = model.init(jax.random.key(1), x)
  assert set(variables['params']) == {'backbone', 'lstm_attention'}
  logits, inter = model.apply(variables, x, mutable=['intermediates'])
  assert logits.shape == (2, 3)
  att = inter['intermediates']['attention'][0]
  assert att.shape == (2, 3, 4, 4)
  np.testing.assert_allclose(att.sum(axis=(2, 3)), 1.0, rtol=1e-5)
  np.testing.assert_allclose(inter['intermediates']['step_logits'][0][:, -1], logits, rtol=1e-6)
  feats = model.apply(variables, x, method=MobileNetLSTMAttention.features)
  np.testing.assert_allclose(attention_head_fn(model, variables)(feats), logits, rtol=1e-5,
                             atol=1e-6)
  # Frozen backbone: training mode leaves its BatchNorm statistics alone and passes no gradient.
  _, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
  for a, b in zip(jax.tree.leaves(updates['batch_stats']), jax.tree.leaves(
      variables['batch_stats']), strict=True):
    np.testing.assert_array_equal(a, b)
  grads = jax.grad(lambda p: model.apply({**variables, 'params': p}, x).sum())(
      variables['params'])
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads['backbone']))
  assert any(float(jnp.abs(g).max()) > 0.0 for g in jax.tree.leaves(grads['lstm_attention']))


def test_mobilenet_lstm_attention_passes_output_stride_to_the_backbone():
  # 32 px through two stride-2 blocks: a 4 x 4 map at output stride 8, 8 x 8 at 4, with the
  # same parameters; the attention then spreads over 64 locations.
  from cxr_jax.models.mobilenet_lstm_attention import MobileNetLSTMAttention
  kw = dict(num_classes=3, width_multiplier=0.25, blocks=((16, 2), (32, 2)))
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 1))
  variables = _np_variables(MobileNetLSTMAttention(**kw), x)
  model = MobileNetLSTMAttention(**kw, output_stride=4)
  assert jax.tree.map(jnp.shape, jax.eval_shape(model.init, jax.random.key(1), x)) == \
      jax.tree.map(jnp.shape, variables)
  _, inter = jax.jit(lambda v: model.apply(v, x, mutable=['intermediates']))(variables)
  att = np.asarray(inter['intermediates']['attention'][0])
  assert att.shape == (2, 3, 8, 8)
  np.testing.assert_allclose(att.sum(axis=(2, 3)), 1.0, rtol=1e-5)


def test_paper_000_demo_attends_over_an_8x8_map_at_64_px():
  # The README demo (64 px): the attention needs more than MobileNet's own 2 x 2 to choose from.
  import pathlib

  from cxr_jax import config_lib
  configs = pathlib.Path(__file__).resolve().parents[1] / 'configs'
  config = config_lib.load_sibling(str(configs / 'any.py'), 'lstm_attention.py').get_config('demo')
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  stage1 = build_model(config.model, num_classes=13)
  variables = jax.eval_shape(stage1.init, jax.random.key(0), x)
  features = jax.eval_shape(lambda v, x: stage1.apply(v, x, return_features=True)[1],
                            variables, x)
  assert features.shape[1:3] == (8, 8)
  stage2 = build_model(config.stage_overrides.train_attention.model, num_classes=13)
  variables = jax.eval_shape(stage2.init, jax.random.key(0), x)
  inter = jax.eval_shape(lambda v, x: stage2.apply(v, x, mutable=['intermediates'])[1],
                         variables, x)
  assert inter['intermediates']['attention'][0].shape == (1, 3, 8, 8)
