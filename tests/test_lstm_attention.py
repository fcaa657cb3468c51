"""LSTMAttention (paper 000's recurrent attention) against hand-set cases and a numpy reference."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxr_jax.attention.lstm_attention import LSTMAttention


def _sigmoid(x: np.ndarray) -> np.ndarray:
  return 1.0 / (1.0 + np.exp(-x))


def _lstm_step(lstm: dict, c: np.ndarray, h: np.ndarray, x: np.ndarray):
  """One step of flax's LSTMCell in float64: input kernels 'i?', recurrent 'h?' with bias."""
  gate = lambda g: x @ lstm[f'i{g}']['kernel'] + h @ lstm[f'h{g}']['kernel'] + lstm[f'h{g}']['bias']
  i, f, g, o = _sigmoid(gate('i')), _sigmoid(gate('f')), np.tanh(gate('g')), _sigmoid(gate('o'))
  c = f * c + i * g
  return c, o * np.tanh(c)


def _reference(params, features: np.ndarray, num_steps: int, feedback: str = 'probs'):
  """The module's equations written out in numpy (float64): logits [B,T,K], attention [B,T,L]."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  batch, height, width, channels = features.shape
  a = np.asarray(features, np.float64).reshape(batch, height * width, channels)
  mean = a.mean(axis=1)
  c = np.tanh(mean @ p['init_c']['kernel'] + p['init_c']['bias'])
  h = np.tanh(mean @ p['init_h']['kernel'] + p['init_h']['bias'])
  projected = a @ p['attention_features']['kernel'] + p['attention_features']['bias']
  probs = np.zeros((batch, p['classifier']['bias'].shape[0]))
  all_logits, all_alpha = [], []
  for _ in range(num_steps):
    hidden = h @ p['attention_hidden']['kernel']
    scores = (np.tanh(projected + hidden[:, None, :]) @ p['attention_score']['kernel'])[..., 0]
    alpha = np.exp(scores - scores.max(axis=1, keepdims=True))
    alpha /= alpha.sum(axis=1, keepdims=True)
    context = np.einsum('bl,blc->bc', alpha, a)
    x = np.concatenate([probs, context], axis=-1) if feedback == 'probs' else context
    c, h = _lstm_step(p['lstm'], c, h, x)
    logits = h @ p['classifier']['kernel'] + p['classifier']['bias']
    probs = _sigmoid(logits)
    all_logits.append(logits)
    all_alpha.append(alpha)
  return np.stack(all_logits, axis=1), np.stack(all_alpha, axis=1)


def _setup(shape=(2, 3, 4, 8), num_classes=5, seed=0, **kwargs):
  """A model, features [B,h,w,C] and random float32 parameters with the module's layout.

  The parameters are drawn with numpy (kernels ~ N(0, 1/fan_in), biases ~ N(0, 0.1)) into the
  tree that `init` would build: compiling `init` (orthogonal initialiser and all) for every
  shape would cost seconds per test on 2 cores. `init` itself is tested below.
  """
  model = LSTMAttention(num_classes=num_classes, **kwargs)
  features = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
  tree = jax.eval_shape(model.init, jax.random.key(0), features)
  rng = np.random.default_rng(seed + 1)
  draw = lambda s: (rng.normal(size=s.shape) * (0.1 if len(s.shape) == 1 else
                                                 s.shape[0] ** -0.5)).astype(np.float32)
  return model, jnp.asarray(features), jax.tree.map(draw, tree)


@pytest.mark.parametrize('shape,num_steps', [((1, 1, 1, 3), 1), ((2, 3, 5, 8), 3),
                                              ((3, 7, 7, 16), 2), ((2, 2, 9, 4), 3)])
def test_shapes_and_attention_is_a_distribution(shape, num_steps):
  model, features, variables = _setup(shape, num_classes=4, num_steps=num_steps)
  out = jax.jit(model.apply)(variables, features)
  batch, height, width, _ = shape
  assert out['logits'].shape == out['probs'].shape == (batch, num_steps, 4)
  assert out['attention'].shape == (batch, num_steps, height, width)
  assert all(v.dtype == jnp.float32 for v in out.values())
  alpha = np.asarray(out['attention'])
  assert (alpha >= 0).all()
  np.testing.assert_allclose(alpha.sum(axis=(2, 3)), 1.0, atol=1e-6)
  np.testing.assert_allclose(out['probs'], jax.nn.sigmoid(out['logits']), atol=1e-7)


def test_parameter_shapes_follow_the_paper_sizes():
  model, features, variables = _setup((1, 2, 2, 32), num_classes=13)
  shapes = jax.tree.map(jnp.shape, variables['params'])
  assert shapes['lstm']['ii']['kernel'] == (13 + 32, 16)  # input = concat(p_{t-1}, z_t)
  assert shapes['lstm']['hi']['kernel'] == (16, 16)
  assert shapes['classifier']['kernel'] == (16, 13)  # 16 units before the dense layer
  assert shapes['attention_features']['kernel'] == (32, 64)
  assert shapes['attention_hidden']['kernel'] == (16, 64)
  assert shapes['attention_score']['kernel'] == (64, 1)
  _, _, no_feedback = _setup((1, 2, 2, 32), num_classes=13, feedback='none')
  assert no_feedback['params']['lstm']['ii']['kernel'].shape == (32, 16)


def test_one_step_with_zero_attention_parameters_is_an_lstm_on_the_mean():
  model, features, variables = _setup((2, 3, 4, 8), num_classes=5, num_steps=1)
  params = jax.tree.map(np.asarray, variables['params'])
  params['attention_score']['kernel'] = np.zeros_like(params['attention_score']['kernel'])
  out = model.apply({'params': params}, features)
  # All scores 0 -> uniform attention 1/12 -> context = mean annotation vector.
  np.testing.assert_allclose(out['attention'], np.full((2, 1, 3, 4), 1 / 12), atol=1e-7)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  mean = np.asarray(features, np.float64).mean(axis=(1, 2))
  c0 = np.tanh(mean @ p['init_c']['kernel'] + p['init_c']['bias'])
  h0 = np.tanh(mean @ p['init_h']['kernel'] + p['init_h']['bias'])
  x = np.concatenate([np.zeros((2, 5)), mean], axis=-1)  # p_0 = 0
  _, h1 = _lstm_step(p['lstm'], c0, h0, x)
  logits = h1 @ p['classifier']['kernel'] + p['classifier']['bias']
  np.testing.assert_allclose(out['logits'][:, 0], logits, atol=1e-6)
  np.testing.assert_allclose(out['probs'][:, 0], _sigmoid(logits), atol=1e-6)


@pytest.mark.parametrize('feedback', ['probs', 'none'])
def test_three_steps_match_numpy_reference(feedback):
  model, features, variables = _setup((2, 3, 4, 8), num_classes=5, feedback=feedback)
  out = model.apply(variables, features)
  logits, alpha = _reference(variables['params'], np.asarray(features), 3, feedback)
  np.testing.assert_allclose(out['logits'], logits, atol=1e-6)
  np.testing.assert_allclose(out['attention'].reshape(2, 3, 12), alpha, atol=1e-6)
  # W_s != 0 here, so the attention moves between steps.
  assert np.abs(alpha[:, 0] - alpha[:, 1]).max() > 1e-4


def test_attention_over_an_8x8_map_moves_between_steps_and_images():
  # The map paper 000's demo now attends over (64 px at output stride 8). With random weights
  # and inputs every step and every image gets its own distribution over the 64 locations;
  # at 2 x 2 (the old demo) there was almost nothing to choose.
  model, features, variables = _setup((3, 8, 8, 16), num_classes=5, num_steps=3)
  alpha = np.asarray(jax.jit(model.apply)(variables, features)['attention'])
  assert alpha.shape == (3, 3, 8, 8)
  np.testing.assert_allclose(alpha.sum(axis=(2, 3)), 1.0, atol=1e-6)
  assert alpha.max() > 2 / 64  # not uniform (1/64 everywhere)
  # Random weights move the LSTM state, hence the attention, only a little from step to step
  # (here >= 7e-4 somewhere in every map, 5% of 1/64), far above float32 noise; images differ
  # much more (>= 0.04).
  for t in range(3):
    for u in range(t):  # every pair of steps of every image
      assert np.abs(alpha[:, t] - alpha[:, u]).max(axis=(1, 2)).min() > 1e-4, (t, u)
  for b in range(3):
    for c in range(b):  # every pair of images at every step
      assert np.abs(alpha[b] - alpha[c]).max(axis=(1, 2)).min() > 1e-2, (b, c)


def test_attention_is_the_same_every_step_when_it_ignores_the_hidden_state():
  model, features, variables = _setup((2, 3, 4, 8))
  params = jax.tree.map(np.asarray, variables['params'])
  params['attention_hidden']['kernel'] = np.zeros_like(params['attention_hidden']['kernel'])
  alpha = np.asarray(model.apply({'params': params}, features)['attention'])
  np.testing.assert_allclose(alpha[:, 1:], np.broadcast_to(alpha[:, :1], alpha[:, 1:].shape),
                             atol=1e-7)


def test_a_location_with_a_much_higher_score_takes_all_the_weight():
  # Score = 50 * tanh(a_i[0]): 50 * tanh(10) ~ 50 at location (1, 2), 0 elsewhere.
  model, _, variables = _setup((1, 3, 4, 3), num_classes=2, attention_size=2)
  params = jax.tree.map(np.asarray, variables['params'])
  params['attention_features'] = {'kernel': np.array([[1., 0.], [0., 0.], [0., 0.]]),
                                  'bias': np.zeros(2)}
  params['attention_hidden']['kernel'] = np.zeros((16, 2))
  params['attention_score']['kernel'] = np.array([[50.], [0.]])
  features = np.zeros((1, 3, 4, 3), np.float32)
  features[0, 1, 2] = [10., -1., 2.]
  alpha = np.asarray(model.apply({'params': params}, features)['attention'])
  expected = np.zeros((1, 3, 3, 4))
  expected[:, :, 1, 2] = 1.0
  np.testing.assert_allclose(alpha, expected, atol=1e-12)


def _add_to_first_classifier_output(delta):
  """Interceptor that shifts the step-1 logits only (the classifier is shared by all steps)."""
  calls = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.module.name == 'classifier' and context.method_name == '__call__':
      calls.append(None)
      if len(calls) == 1:
        out = out + delta
    return out
  return interceptor


@pytest.mark.parametrize('feedback', ['probs', 'none'])
def test_step_one_logits_feed_step_two_only_with_feedback(feedback):
  model, features, variables = _setup((2, 3, 4, 8), num_classes=5, num_steps=2,
                                      feedback=feedback)
  base = model.apply(variables, features)
  with nn.intercept_methods(_add_to_first_classifier_output(3.0)):
    shifted = model.apply(variables, features)
  np.testing.assert_allclose(shifted['logits'][:, 0], base['logits'][:, 0] + 3.0, atol=1e-6)
  change = np.abs(np.asarray(shifted['logits'][:, 1] - base['logits'][:, 1])).max()
  if feedback == 'probs':
    assert change > 1e-3
  else:
    assert change == 0.0


def test_gradients_reach_the_feature_map_and_every_parameter():
  model, features, variables = _setup((2, 3, 4, 8), num_classes=5)
  labels = jnp.array([[1., 0., 0., 1., 0.], [0., 1., 0., 0., 0.]])

  def loss(params, feats):
    logits = model.apply({'params': params}, feats)['logits'][:, -1]
    return jnp.mean(jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits))))

  g_params, g_features = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables['params'], features)
  assert np.isfinite(g_features).all() and np.abs(g_features).max() > 0
  for path, g in jax.tree_util.tree_leaves_with_path(g_params):
    assert np.isfinite(g).all() and np.abs(g).max() > 0, jax.tree_util.keystr(path)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  model, features, variables = _setup((2, 3, 4, 8), num_classes=5)
  bf16 = LSTMAttention(num_classes=5, dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(
      jax.eval_shape(bf16.init, jax.random.key(1), features)))
  out16 = bf16.apply(variables, features)
  out32 = model.apply(variables, features)
  for name in out32:
    assert out16[name].dtype == jnp.float32
    assert np.isfinite(out16[name]).all()
    np.testing.assert_allclose(out16[name], out32[name], atol=0.05)
  np.testing.assert_allclose(out16['attention'].sum(axis=(2, 3)), 1.0, atol=1e-6)


def test_init_is_deterministic_float32_and_has_the_tested_layout():
  model, features, variables = _setup((2, 3, 4, 8), num_classes=5)
  init = jax.jit(model.init)
  first, second = init(jax.random.key(1), features), init(jax.random.key(1), features)
  assert jax.tree.structure(first) == jax.tree.structure(variables)
  assert jax.tree.all(jax.tree.map(np.array_equal, first, second))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(first))
  out = model.apply(first, features)
  np.testing.assert_allclose(out['attention'].sum(axis=(2, 3)), 1.0, atol=1e-6)


def test_deterministic_and_jit_vmap_agree_with_eager():
  model, features, variables = _setup((4, 3, 4, 8), num_classes=5)
  eager = model.apply(variables, features)
  for name, value in model.apply(variables, features).items():
    np.testing.assert_array_equal(value, eager[name])
  jitted = jax.jit(model.apply)(variables, features)
  # vmap over a leading axis: 2 groups of 2 images give the same as one batch of 4.
  vmapped = jax.vmap(model.apply, in_axes=(None, 0))(variables, features.reshape(2, 2, 3, 4, 8))
  for name in eager:
    np.testing.assert_allclose(jitted[name], eager[name], atol=1e-6)
    np.testing.assert_allclose(vmapped[name].reshape(eager[name].shape), eager[name], atol=1e-6)


def test_bad_arguments_are_rejected():
  features = jnp.zeros((2, 3, 4, 8))
  # The checks run before any parameter is made, so nothing is compiled.
  with pytest.raises(ValueError, match=r'features \[B, h, w, C\]'):
    LSTMAttention(num_classes=2).init(jax.random.key(0), features[0])
  with pytest.raises(ValueError, match="valid: \\['probs', 'none'\\]"):
    LSTMAttention(num_classes=2, feedback='logits').init(jax.random.key(0), features)
  with pytest.raises(ValueError, match='num_steps must be >= 1'):
    LSTMAttention(num_classes=2, num_steps=0).init(jax.random.key(0), features)
