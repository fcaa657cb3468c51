"""Paper 001's space attention head: the W_l / W_g degeneracy, its initialisation, ParseNet's
normalisation, and the head's re-evaluations (head_fn / score_map_fn) in every setting."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cxr_jax.attention import space_attention
from cxr_jax.models import build_model, resnet

C, K = 6, 3


@pytest.fixture(autouse=True)
def _full_float32_matmuls():
  """Exact float32 matmuls: GPUs default to TF32 (~1e-3), the tolerances here are float32's."""
  with jax.default_matmul_precision('highest'):
    yield


def _data(seed: int = 0) -> tuple[jax.Array, jax.Array]:
  """Post-ReLU-like features [4, 3, 3, C] and multi-hot labels [4, K]."""
  kf, ky = jax.random.split(jax.random.key(seed))
  features = jax.nn.relu(jax.random.normal(kf, (4, 3, 3, C)) + 0.5)
  labels = jax.random.bernoulli(ky, 0.5, (4, K)).astype(jnp.float32)
  return features, labels


def _loss(head: space_attention.SpaceAttentionHead):
  def loss(params, features, labels):
    logits = head.apply({'params': params}, features)
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))
  return loss


def _train(head, params, tx, steps: int = 8):
  features, labels = _data(1)
  grad_fn = jax.jit(jax.grad(_loss(head)))
  state = tx.init(params)
  for _ in range(steps):
    updates, state = tx.update(grad_fn(params, features, labels), state, params)
    params = optax.apply_updates(params, updates)
  return params


def _halves(params):
  kernel = params['classifier']['kernel']
  return kernel[:C], kernel[C:]


def test_kernel_inits():
  f, _ = _data()
  init = lambda name: space_attention.SpaceAttentionHead(K, classifier_init=name).init(
      jax.random.key(0), f)['params']
  w_l, w_g = _halves(init('tied'))
  np.testing.assert_array_equal(w_l, w_g)
  # The effective kernel W_l + W_g is LeCun-normal over fan-in C, as a GAP + dense head's.
  big = space_attention.tied_kernel_init(jax.random.key(1), (2 * 512, 256))
  np.testing.assert_allclose(np.std(big[:512] + big[512:]), 1 / np.sqrt(512), rtol=0.05)
  np.testing.assert_array_equal(init('zeros')['classifier']['kernel'], 0)
  w_l, w_g = _halves(init('lecun'))
  assert np.abs(w_l - w_g).max() > 0.1
  for name in ('tied', 'zeros', 'lecun'):  # names and shapes of checkpoints do not change
    params = init(name)
    assert set(params) == {'classifier'}
    assert params['classifier']['kernel'].shape == (2 * C, K)
    assert params['classifier']['bias'].shape == (K,)
  with pytest.raises(ValueError, match='init'):
    init('orthogonal')


@pytest.mark.parametrize('tx', [
    optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(0.5, momentum=0.9)),
    optax.adam(0.05)], ids=['sgd_momentum_l2', 'adam'])
def test_tied_halves_stay_equal_and_the_map_is_the_cam_of_the_effective_kernel(tx):
  head = space_attention.SpaceAttentionHead(K)  # defaults: no normalisation, tied init
  f, _ = _data()
  params0 = head.init(jax.random.key(0), f)['params']
  params = _train(head, params0, tx)
  w_l, w_g = _halves(params)
  moved = np.abs(w_l - _halves(params0)[0]).max()
  assert moved > 1e-2  # training did move the kernel
  np.testing.assert_allclose(w_l, w_g, rtol=0, atol=1e-5 * moved)
  # Exposed map = CAM of the effective kernel (W_l + W_g) / 2, plus g W_g + b per image.
  _, inter = head.apply({'params': params}, f, mutable=['intermediates'])
  scores = inter['intermediates']['class_scores'][0]
  g = f.mean(axis=(1, 2))
  want = f @ ((w_l + w_g) / 2) + (g @ w_g + params['classifier']['bias'])[:, None, None, :]
  np.testing.assert_allclose(scores, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_the_finding_with_independent_halves_w_l_minus_w_g_is_never_learned():
  """classifier_init='lecun' (the former default): the halves get identical gradients, so their
  difference D keeps its initial value (plain SGD), or shrinks by exactly (1 - lr * decay) per
  step (L2), and the map carries the CAM of D / 2 (init noise) on top of the effective
  classifier's."""
  head = space_attention.SpaceAttentionHead(K, classifier_init='lecun')
  f, labels = _data()
  params0 = head.init(jax.random.key(0), f)['params']
  d0 = np.subtract(*_halves(params0))
  grads = jax.grad(_loss(head))(params0, f, labels)
  a, b = _halves(grads)  # equal up to float32 reduction order: tolerance scaled to the size
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
  lr, decay, steps = 0.5, 0.05, 8
  for wd in (0.0, decay):
    tx = optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr))
    params = _train(head, params0, tx, steps)
    w_l, w_g = _halves(params)
    assert np.abs(w_l - _halves(params0)[0]).max() > 1e-2
    np.testing.assert_allclose(w_l - w_g, (1 - lr * wd)**steps * d0, rtol=0,
                               atol=1e-5 * np.abs(d0).max())
  # The noise term is as large as the learnt one: the map is not the effective kernel's CAM.
  _, inter = head.apply({'params': params}, f, mutable=['intermediates'])
  scores = inter['intermediates']['class_scores'][0]
  g = f.mean(axis=(1, 2))
  effective = f @ ((w_l + w_g) / 2) + (g @ w_g + params['classifier']['bias'])[:, None, None, :]
  np.testing.assert_allclose(scores - effective, f @ ((w_l - w_g) / 2), rtol=1e-4, atol=1e-5)
  assert np.abs(scores - effective).max() > 0.1 * np.abs(effective - effective.mean()).max()


def test_normalized_fusion_by_hand():
  f, _ = _data()
  f = f.at[0, 0, 0].set(0.0)  # an all-zero location (possible after ReLU)
  a = jnp.arange(1.0, C + 1)
  c = jnp.full((C,), 3.0)
  fused = space_attention.fuse_global_local(f, (a, c))
  g = np.asarray(f).mean(axis=(1, 2))
  norms = np.linalg.norm(np.asarray(f), axis=-1, keepdims=True)
  want_local = np.asarray(f) / np.sqrt(norms**2 + space_attention.NORM_EPS) * np.asarray(a)
  np.testing.assert_allclose(fused[..., :C], want_local, rtol=1e-5, atol=1e-6)
  want_global = 3.0 * g / np.linalg.norm(g, axis=-1, keepdims=True)
  np.testing.assert_allclose(fused[..., C:], np.broadcast_to(
      want_global[:, None, None], f.shape), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(fused[0, 0, 0, :C], 0)
  grad = jax.grad(lambda x: jnp.sum(space_attention.fuse_global_local(x, (a, c))**2))(f)
  assert np.isfinite(np.asarray(grad)).all()


def test_normalized_head_differentiates_the_halves_and_sees_beyond_the_gap_vector():
  f, labels = _data()
  # Same spatial mean, different spatial distribution.
  flat = jnp.broadcast_to(f.mean(axis=(1, 2), keepdims=True), f.shape)
  plain = space_attention.SpaceAttentionHead(K)
  normed = space_attention.SpaceAttentionHead(K, normalize=True)
  p_plain = plain.init(jax.random.key(0), f)['params']
  p_normed = normed.init(jax.random.key(0), f)['params']
  assert set(p_normed) == {'classifier', 'local_scale', 'global_scale'}
  np.testing.assert_array_equal(p_normed['local_scale'], space_attention.NORM_SCALE_INIT)
  # The paper's head is a function of the GAP vector; the normalised one is not.
  np.testing.assert_allclose(plain.apply({'params': p_plain}, f),
                             plain.apply({'params': p_plain}, flat), rtol=1e-5, atol=1e-5)
  diff = np.abs(normed.apply({'params': p_normed}, f) - normed.apply({'params': p_normed}, flat))
  assert diff.max() > 1e-2
  # Identical gradients for W_l and W_g without normalisation, different ones with it.
  g_plain = _halves(jax.grad(_loss(plain))(p_plain, f, labels))
  np.testing.assert_allclose(*g_plain, rtol=1e-5, atol=1e-5 * np.abs(g_plain[1]).max())
  g_l, g_g = _halves(jax.grad(_loss(normed))(p_normed, f, labels))
  assert np.linalg.norm(g_l - g_g) > 0.1 * np.linalg.norm(g_l)
  # Trained, the tied halves of the normalised head part.
  w_l, w_g = _halves(_train(normed, p_normed, optax.sgd(0.5)))
  assert np.abs(w_l - w_g).max() > 1e-2


@pytest.mark.parametrize('pool', space_attention.POOLS)
@pytest.mark.parametrize('normalize', [False, True])
def test_head_fn_and_score_map_fn_reproduce_the_model(normalize, pool):
  cfg = ml_collections.ConfigDict({'name': 'resnet18', 'width': 8, 'head': 'space_attention',
                                   'sam_normalize': normalize, 'sam_pool': pool})
  model = build_model(cfg, num_classes=4)
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  variables = model.init(jax.random.key(1), x)
  head_vars = variables['params']['space_attention']
  assert ('local_scale' in head_vars) == normalize
  # Random scales: a scale mixed up between the branches or channels would show.
  if normalize:
    ka, kc = jax.random.split(jax.random.key(2))
    head_vars = {**head_vars, 'local_scale': jax.random.uniform(ka, (64,), minval=1, maxval=20),
                 'global_scale': jax.random.uniform(kc, (64,), minval=1, maxval=20)}
    variables = {**variables, 'params': {**variables['params'], 'space_attention': head_vars}}
  (logits, features), inter = model.apply(variables, x, return_features=True,
                                          mutable=['intermediates'])
  tol = 1e-5 * np.abs(logits).max()
  np.testing.assert_allclose(resnet.head_fn(model, variables)(features), logits, rtol=1e-5,
                             atol=tol)
  maps = resnet.score_map_fn(model, variables)(features)
  assert maps.shape == (2, 2, 2, 4)
  np.testing.assert_allclose(maps.mean(axis=(1, 2)), logits, rtol=1e-5, atol=tol)
  sown = inter['intermediates'].get('space_attention', {}).get('class_scores')
  if pool == 'after_classifier':
    np.testing.assert_allclose(sown[0], maps, rtol=1e-5, atol=tol)
  else:
    assert sown is None
  # Both placements give the same logits from the same parameters.
  other = model.clone(sam_pool=[p for p in space_attention.POOLS if p != pool][0])
  np.testing.assert_allclose(other.apply(variables, x), logits, rtol=1e-5, atol=tol)
  # A model whose flag disagrees with its parameters is refused, not silently re-evaluated.
  with pytest.raises(ValueError, match='sam_normalize'):
    resnet.score_map_fn(model.clone(sam_normalize=not normalize), variables)
