"""Prediction Difference Analysis: hand-checked cases and agreement with a plain loop."""

import importlib.util
import math
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxr_jax.explain import prediction_difference as pda

_REF_PATH = pathlib.Path(__file__).resolve().parents[1] / 'benchmarks' / '_pda_reference.py'
_spec = importlib.util.spec_from_file_location('_pda_reference', _REF_PATH)
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

LN2 = math.log(2.0)


def linear_head(weights: np.ndarray, bias: float = 0.0):
  """logits[n, k] = sum_{h,w,c} weights[h, w, c, k] features[n, h, w, c] + bias."""
  wts = jnp.asarray(weights, jnp.float32)
  return lambda f: jnp.einsum('nhwc,hwck->nk', f, wts) + bias


def test_window_positions_cover_every_index():
  np.testing.assert_array_equal(pda.window_positions(7, 2, 2), [0, 2, 4, 5])
  np.testing.assert_array_equal(pda.window_positions(6, 3, 1), [0, 1, 2, 3])
  with pytest.raises(ValueError, match='larger'):
    pda.window_positions(3, 4, 1)


def test_log2_odds_laplace_by_hand():
  # p = 0.9, N = 8: (0.9 * 8 + 1) / 10 = 0.82, (0.1 * 8 + 1) / 10 = 0.18.
  got = pda.log2_odds(jnp.float32(0.9), jnp.float32(0.1), 8)
  np.testing.assert_allclose(got, math.log2(0.82 / 0.18), rtol=1e-6)
  np.testing.assert_allclose(pda.log2_odds(jnp.float32(0.9), jnp.float32(0.1), None),
                             math.log2(9.0), rtol=1e-6)
  # Certainty stays finite: p = 1 -> (N + 1) / 1.
  np.testing.assert_allclose(pda.log2_odds(jnp.float32(1.0), jnp.float32(0.0), 8), math.log2(9))


def test_average_over_windows_by_hand():
  # 1 x 4 map, windows of width 2 at stride 1 (columns 0, 1, 2), WE = 1, 2, 4.
  we = jnp.asarray([[[1.0, 2.0, 4.0]]])  # [K=1, nr=1, nc=3]
  got = pda.average_over_windows(we, np.array([0]), np.array([0, 1, 2]), (1, 2), (1, 4))
  np.testing.assert_allclose(got, [[[1.0, 1.5, 3.0, 4.0]]])


def test_overlapping_windows_linear_head_by_hand():
  # x = ones [1, 4, 1], the only training map is zeros, so each sample is zeros. Logit =
  # sum_j w_j x_j with w = 1, 2, 3, 4 (10). Blanking columns (j, j+1) removes w_j + w_{j+1}; with
  # sigmoids, log2 odds = logit / ln 2, so WE = (w_j + w_{j+1}) / ln 2 = 3, 5, 7 (/ ln 2) and the
  # per-pixel means are 3, 4, 6, 7 (/ ln 2).
  head = linear_head(np.arange(1.0, 5.0).reshape(1, 4, 1, 1))
  sampler = pda.MarginalSampler.fit(np.zeros((1, 1, 4, 1)))
  rel = pda.pda_features(head, jnp.ones((1, 4, 1)), sampler, window=(1, 2), stride=1,
                         num_samples=3, key=jax.random.key(0), laplace_n=None)
  np.testing.assert_allclose(rel, np.array([[[3.0, 4.0, 6.0, 7.0]]]) / LN2, rtol=1e-5)


def test_one_location_head_and_sign():
  # Class 0 reads only location (2, 3) (evidence for), class 1 the same location negatively.
  w = np.zeros((6, 6, 2, 2))
  w[2, 3, :, 0] = 1.0
  w[2, 3, :, 1] = -1.0
  head = linear_head(w)
  rng = np.random.default_rng(0)
  train = rng.uniform(0.0, 0.5, (8, 6, 6, 2))
  x = jnp.asarray(rng.uniform(0.0, 0.5, (6, 6, 2))).at[2, 3].set(2.0)  # strong at (2, 3)
  sampler = pda.MarginalSampler.fit(train)
  key = jax.random.key(1)
  rel = np.asarray(pda.pda_features(head, x, sampler, window=2, num_samples=4, key=key))
  nonzero = np.abs(rel) > 1e-6
  expected = np.zeros((6, 6), bool)
  expected[2:4, 2:4] = True  # the non-overlapping 2 x 2 window holding (2, 3)
  np.testing.assert_array_equal(nonzero[0], expected)
  np.testing.assert_array_equal(nonzero[1], expected)
  assert (rel[0][expected] > 0).all() and (rel[1][expected] < 0).all()
  # Overlapping windows (stride 1): every pixel of a window containing (2, 3) gets some of it.
  rel = np.asarray(pda.pda_features(head, x, sampler, window=2, stride=1, num_samples=4,
                                    key=key))
  expected = np.zeros((6, 6), bool)
  expected[1:4, 2:5] = True
  np.testing.assert_array_equal(np.abs(rel[0]) > 1e-6, expected)


def test_marginal_sampler_takes_whole_windows_from_training_maps():
  train = np.arange(3 * 4 * 4 * 2, dtype=np.float32).reshape(3, 4, 4, 2)
  sampler = pda.MarginalSampler.fit(train)
  keys = jax.random.split(jax.random.key(0), 50)
  rows, cols = jnp.full((50,), 1), jnp.full((50,), 2)
  values = np.asarray(sampler.draw(keys, None, None, rows, cols, None, (2, 2)))
  windows = train[:, 1:3, 2:4]
  assert all(any(np.array_equal(v, wdw) for wdw in windows) for v in values)
  assert len({v.tobytes() for v in values}) == 3  # all three examples get used


def _random_gaussian(d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(d, d))
  return rng.normal(size=d), a @ a.T / d + 0.3 * np.eye(d)


def _conditional(mean, cov, a, b, xb):
  s_ab = cov[np.ix_(a, b)]
  gain = s_ab @ np.linalg.inv(cov[np.ix_(b, b)])
  return mean[a] + gain @ (xb - mean[b]), cov[np.ix_(a, a)] - gain @ s_ab.T


@pytest.mark.parametrize('corner', [False, True])
def test_conditional_sampler_matches_analytic_gaussian(corner):
  # Patches 3 x 3 x 2 (window 1, padding 1). On a 3 x 3 map the window at (1, 1) sees its whole
  # ring; on a 4 x 4 map the window at (0, 0) sees only the 3 ring locations inside the map, the
  # 5 outside are marginalised out.
  mean, cov = _random_gaussian(18, seed=2)
  size = 4 if corner else 3
  sampler = pda.ConditionalSampler.from_gaussian(mean, cov, window=1, padding=1,
                                                 image_shape=(size, size, 2))
  x = np.random.default_rng(3).normal(size=(size, size, 2)).astype(np.float32)
  r = c = 0 if corner else 1
  patch_cells = [(i, j) for i in range(3) for j in range(3)]  # patch coords (map = patch - 1 + r)
  observed = [(i, j) for (i, j) in patch_cells
              if (i, j) != (1, 1) and 0 <= i - 1 + r < size and 0 <= j - 1 + c < size]
  a = [2 * (3 * 1 + 1) + ch for ch in range(2)]
  b = [2 * (3 * i + j) + ch for (i, j) in observed for ch in range(2)]
  xb = np.concatenate([x[i - 1 + r, j - 1 + c] for (i, j) in observed]).astype(np.float64)
  want_mean, want_cov = _conditional(mean, cov, a, b, xb)

  groups = sampler.window_groups(np.array([r]), np.array([c]), (1, 1), (size, size))
  state = sampler.prepare(jnp.asarray(x), jnp.array([r]), jnp.array([c]), groups, (1, 1))
  np.testing.assert_allclose(state[0], want_mean, rtol=1e-4, atol=1e-5)
  case = int(groups[0])
  chol = np.asarray(sampler.cond_chol[case], np.float64)
  np.testing.assert_allclose(chol @ chol.T, want_cov, rtol=1e-4, atol=1e-5)

  n = 20_000
  keys = jax.random.split(jax.random.key(4), n)
  draws = sampler.draw(keys, jnp.zeros(n, jnp.int32), jnp.int32(case), None, None, state,
                       (1, 1))
  draws = np.asarray(draws, np.float64).reshape(n, 2)
  # Standard errors at n = 20k: ~0.01 on means and covariances of O(1).
  np.testing.assert_allclose(draws.mean(0), want_mean, atol=0.04)
  np.testing.assert_allclose(np.cov(draws.T), want_cov, atol=0.05)


def test_conditional_fit_recovers_patch_statistics():
  # Maps that are one patch each, drawn from a known Gaussian: fit's mean/cov converge to it.
  mean, cov = _random_gaussian(2 * 3 * 3, seed=5)
  data = np.random.default_rng(6).multivariate_normal(mean, cov, size=30_000)
  got_mean, got_cov = pda.patch_gaussian(data.reshape(-1, 3, 3, 2), (3, 3))
  np.testing.assert_allclose(got_mean, mean, atol=0.03)
  np.testing.assert_allclose(got_cov, cov, atol=0.05)


class TinyConvNet(nn.Module):
  """Conv -> ReLU -> mean -> Dense: a small nonlinear net for the loop comparison."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), name='conv')(x))
    return nn.Dense(3, name='head')(jnp.mean(x, axis=(1, 2)))


@pytest.fixture(scope='module')
def conv_setup():
  rng = np.random.default_rng(7)
  train = rng.uniform(0.0, 1.0, (16, 8, 8, 2)).astype(np.float32)
  x = rng.uniform(0.0, 1.0, (8, 8, 2)).astype(np.float32)
  model = TinyConvNet()
  params = model.init(jax.random.key(0), jnp.asarray(x[None]))
  fn = lambda imgs: model.apply(params, imgs)
  return fn, train, x


@pytest.mark.parametrize('kind,window,stride,padding', [
    ('marginal', 2, 1, 0),
    ('conditional', 2, 1, 1),
    ('conditional', 3, 3, 2),
])
def test_vectorised_matches_python_loop(conv_setup, kind, window, stride, padding):
  fn, train, x = conv_setup
  sampler = pda.make_sampler(kind, train, window=window, padding=padding)
  key = jax.random.key(11)
  got = pda.pda_pixels(fn, x, sampler, window=window, stride=stride, num_samples=5, key=key,
                       chunk_size=16)
  want = ref.pda_loop(fn, x, sampler, window=window, stride=stride, num_samples=5, key=key)
  assert got.shape == (3, 8, 8)
  assert np.abs(want).max() > 1e-3  # the comparison is not trivially between zeros
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_linear_head_matches_python_loop_with_hand_weight_of_evidence():
  # Feature level, logistic head on a 4 x 4 x 3 map; the loop and the vectorised version agree,
  # and one window's WE is recomputed by hand from the two probabilities.
  rng = np.random.default_rng(8)
  w = rng.normal(size=(4, 4, 3, 2))
  head = linear_head(w, bias=-0.5)
  train = rng.normal(size=(5, 4, 4, 3)).astype(np.float32)
  x = rng.normal(size=(4, 4, 3)).astype(np.float32)
  sampler = pda.MarginalSampler.fit(train)
  key = jax.random.key(3)
  got = pda.pda_features(head, x, sampler, window=2, num_samples=4, key=key, laplace_n=100)
  want = ref.pda_loop(head, x, sampler, window=2, num_samples=4, key=key, laplace_n=100)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  # Window 0 (top-left 2 x 2): rebuild its samples from the key convention.
  logit = lambda f: np.einsum('hwc,hwck->k', f, w) - 0.5
  lap = lambda p: (p * 100 + 1) / 102
  lo = lambda p: np.log2(lap(p) / lap(1 - p))
  probs = []
  for s in range(4):
    i = int(jax.random.randint(jax.random.fold_in(key, s), (), 0, 5))
    xi = x.copy()
    xi[:2, :2] = train[i, :2, :2]
    probs.append(1 / (1 + np.exp(-logit(xi))))
  we = lo(1 / (1 + np.exp(-logit(x)))) - lo(np.mean(probs, 0))
  # WE is a difference of log2 odds (float32 in `got`), which may nearly cancel: an absolute
  # tolerance too, on the scale of the log2 odds (at most log2(101) = 6.7 here).
  np.testing.assert_allclose(np.asarray(got)[:, 0, 0], we, rtol=1e-5, atol=1e-5)


def test_chunk_size_does_not_change_results_and_key_determines_them(conv_setup):
  fn, train, x = conv_setup
  sampler = pda.make_sampler('conditional', train, window=2, padding=1)
  kw = dict(window=2, stride=1, num_samples=3)
  a = pda.pda_pixels(fn, x, sampler, key=jax.random.key(0), chunk_size=7, **kw)
  b = pda.pda_pixels(fn, x, sampler, key=jax.random.key(0), chunk_size=1000, **kw)
  c = pda.pda_pixels(fn, x, sampler, key=jax.random.key(0), chunk_size=7, **kw)
  d = pda.pda_pixels(fn, x, sampler, key=jax.random.key(1), chunk_size=7, **kw)
  np.testing.assert_allclose(a, b, atol=1e-6)
  np.testing.assert_array_equal(a, c)
  sizes = [pda._make_plan(sampler, (8, 8), (2, 2), (1, 1), 3, cs).chunk_size for cs in (7, 1000)]
  assert sizes[0] <= 7 < sizes[1]  # the two runs really were chunked differently
  assert np.abs(np.asarray(a) - np.asarray(d)).max() > 1e-4


def test_errors_name_the_problem(conv_setup):
  fn, train, x = conv_setup
  sampler = pda.make_sampler('conditional', train, window=2, padding=1)
  with pytest.raises(ValueError, match='window'):
    pda.pda_pixels(fn, x, sampler, window=3, key=jax.random.key(0))
  with pytest.raises(ValueError, match='padding'):
    pda.pda_pixels(fn, x, sampler, window=2, padding=2, key=jax.random.key(0))
  with pytest.raises(ValueError, match='shape'):
    pda.pda_pixels(fn, x[:6], sampler, window=2, key=jax.random.key(0))
  with pytest.raises(TypeError, match='typed key'):
    pda.pda_pixels(fn, x, sampler, window=2, key=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match='unknown PDA sampler'):
    pda.make_sampler('uniform', train, window=2)


def test_forward_pass_count():
  # Zintgraf et al.'s setting: 10 x 10 windows at stride 1 on 224 px, 10 samples.
  assert pda.num_forward_passes((224, 224), 10, 1, 10) == 215 * 215 * 10 + 1
  assert pda.num_forward_passes((7, 7), 1, 1, 10) == 49 * 10 + 1


def test_low_rank_conditioning_equals_dense():
  # 12 patches of dimension 3 x 3 x 4 = 36: fit takes the Woodbury path; the dense conditioning
  # of the same sample covariance (same ridge) must give the same sampler.
  data = np.random.default_rng(9).normal(size=(3, 4, 4, 4)).astype(np.float32)
  fitted = pda.ConditionalSampler.fit(data, window=1, padding=1, ridge=0.1, clip=False)
  mean, cov = pda.patch_gaussian(data, (3, 3))
  dense = pda.ConditionalSampler.from_gaussian(mean, cov, window=1, padding=1,
                                               image_shape=(4, 4, 4), ridge=0.1)
  assert fitted.cond_matrix.shape == (9, 4, 32)
  np.testing.assert_allclose(fitted.cond_matrix, dense.cond_matrix, atol=1e-5)
  np.testing.assert_allclose(fitted.cond_chol, dense.cond_chol, atol=1e-5)
