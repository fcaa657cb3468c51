import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cxr_jax.models import build_model
from cxr_jax.models.mobilenet import MobileNetV1


def _count(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


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


def test_build_model_errors():
  with pytest.raises(ValueError, match='valid names: .*mobilenet_v1'):
    build_model(ml_collections.ConfigDict({'name': 'mobilenet_v9'}), num_classes=2)
  with pytest.raises(ValueError, match='config.model: bad arguments'):
    build_model(ml_collections.ConfigDict({'name': 'mobilenet_v1', 'wdth': 1}), num_classes=2)
  with pytest.raises(ValueError, match='Unknown dtype'):
    build_model(ml_collections.ConfigDict({'name': 'mobilenet_v1'}), num_classes=2,
                dtype='float8')


@pytest.mark.parametrize('size,stride', [(8, 1), (8, 2), (7, 2), (5, 1)])
def test_depthwise_shifts_equal_grouped_convolution(size, stride):
  from cxr_jax.models.depthwise import DepthwiseConv
  x = jax.random.normal(jax.random.key(0), (2, size, size, 6))
  fast = DepthwiseConv(3, stride, impl='shifts')
  ref = DepthwiseConv(3, stride, impl='xla')
  variables = fast.init(jax.random.key(1), x)
  np.testing.assert_allclose(fast.apply(variables, x), ref.apply(variables, x), rtol=1e-5,
                             atol=1e-5)
  # Gradients agree too (the training path).
  g_fast = jax.grad(lambda v: fast.apply(v, x).sum())(variables)
  g_ref = jax.grad(lambda v: ref.apply(v, x).sum())(variables)
  np.testing.assert_allclose(g_fast['params']['kernel'], g_ref['params']['kernel'], rtol=1e-4)


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
