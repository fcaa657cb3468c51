"""Max pooling (cxr_jax/models/pooling.py): 'taps' equals `flax.linen.max_pool` forward and in
its gradient (first maximum of a window takes it all, ties included), keeps only an int8 index
for the backward pass, and compiles without the reduce-window gradient it replaces."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxr_jax.models import pooling

# (window, stride, padding, input [H, W]): ResNet's / DenseNet's stem (3/2, pad 1), VGG's and
# U-Net's 2/2 (windows that tile the input: the gradient without a scatter), AlexNet's and the
# custom CNN's 3/2 valid (odd sizes: floor mode), 3/3, stride 1, rectangular windows with uneven
# padding.
CASES = [
    (3, 2, ((1, 1), (1, 1)), (13, 11)),
    (2, 2, 'VALID', (12, 12)),
    (2, 2, 'VALID', (13, 9)),
    (3, 2, 'VALID', (15, 14)),
    (3, 3, 'VALID', (10, 11)),
    (3, 1, ((1, 1), (1, 1)), (9, 9)),
    ((3, 2), (2, 1), ((1, 0), (0, 1)), (10, 9)),
]


def _ties(shape, seed=0):
  """ReLU'd normals (a quarter zero), rounded to a coarse grid: many windows have tied maxima,
  zero and positive."""
  x = np.maximum(np.random.default_rng(seed).normal(size=shape) + 0.3, 0)
  return jnp.asarray(np.round(x * 4) / 4, jnp.float32)


def _ref(x, window, stride, padding):
  window = (window, window) if isinstance(window, int) else window
  stride = (stride, stride) if isinstance(stride, int) else stride
  return nn.max_pool(x, window, strides=stride, padding=padding)


@pytest.mark.parametrize('window,stride,padding,hw', CASES)
def test_taps_equals_flax_max_pool_forward_and_gradient_with_ties(window, stride, padding, hw):
  x = _ties((2, *hw, 5))
  ref = lambda x: _ref(x, window, stride, padding)
  new = lambda x: pooling.max_pool(x, window, stride, padding, impl='taps')
  y_ref, vjp_ref = jax.vjp(ref, x)
  y_new, vjp_new = jax.vjp(new, x)
  np.testing.assert_array_equal(y_new, y_ref)
  g = jnp.asarray(np.random.default_rng(1).normal(size=y_ref.shape), jnp.float32)
  # Each input pixel sums the gradients of the windows whose first maximum it is: equal up to
  # the order of at most kh * kw float32 additions.
  np.testing.assert_allclose(vjp_new(g)[0], vjp_ref(g)[0], rtol=0, atol=1e-6)
  np.testing.assert_allclose(jax.jit(vjp_new)(g)[0], vjp_ref(g)[0], rtol=0, atol=1e-6)
  # Not a gradient that splits ties: a window's whole gradient goes to one input pixel.
  ones = vjp_new(jnp.ones_like(g))[0]
  assert float(ones.sum()) == pytest.approx(g.size)


def test_nan_propagates_and_minus_infinity_windows_drop_their_gradient():
  x = np.array(_ties((1, 6, 6, 2)))
  x[0, 0, 0, 0] = np.nan
  x[0, 3:, 3:, 1] = -np.inf  # the last window, padding included, is all -inf
  x = jnp.asarray(x)
  args = (3, 2, ((1, 1), (1, 1)))
  y = pooling.max_pool(x, *args, impl='taps')
  np.testing.assert_array_equal(y, _ref(x, *args))
  assert np.isnan(y[0, 0, 0, 0]) and y[0, 2, 2, 1] == -np.inf
  g = jnp.ones_like(y)
  dx = jax.vjp(lambda x: pooling.max_pool(x, *args, impl='taps'), x)[1](g)[0]
  np.testing.assert_array_equal(dx[..., 1], jax.vjp(lambda x: _ref(x, *args), x)[1](g)[0][..., 1])


def test_bfloat16_and_integer_inputs():
  x = _ties((2, 8, 8, 3))
  y = pooling.max_pool(x.astype(jnp.bfloat16), 2, 2, impl='taps')
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(y.astype(jnp.float32), _ref(x.astype(jnp.bfloat16), 2, 2,
                                                            'VALID').astype(jnp.float32))
  dx = jax.grad(lambda x: pooling.max_pool(x, 2, 2, impl='taps').astype(jnp.float32).sum())(
      x.astype(jnp.bfloat16))
  assert dx.dtype == jnp.bfloat16 and float(dx.astype(jnp.float32).sum()) == 2 * 4 * 4 * 3
  xi = (x * 4).astype(jnp.int32)  # integers: flax's pooling (no gradient)
  np.testing.assert_array_equal(pooling.max_pool(xi, 2, 2), _ref(xi, 2, 2, 'VALID'))


def test_backward_keeps_an_int8_index_not_the_input():
  x = jnp.ones((2, 16, 16, 8))
  y, vjp = jax.vjp(lambda x: pooling.max_pool(x, 3, 2, ((1, 1), (1, 1)), impl='taps'), x)
  leaves = jax.tree.leaves(vjp)
  assert sum(leaf.nbytes for leaf in leaves) <= y.size, [(v.shape, v.dtype) for v in leaves]


def test_compiled_gradient_has_no_reduce_window():
  """flax's max pool's gradient compiles to a variadic reduce-window carrying int32 index maps
  of the padded input (iotas written out every step) and a scatter: ~0.25 s of DenseNet-121's
  ~3.2 s step at 224 px on 2 cores, for its one stem pool."""
  if jax.default_backend() != 'cpu':
    pytest.skip('an XLA:CPU program')
  from cxr_jax import xla_options
  x = _ties((2, 16, 16, 8))
  loss = lambda x, impl: jnp.sum(pooling.max_pool(x, 3, 2, ((1, 1), (1, 1)), impl=impl) ** 2)
  text = lambda impl: xla_options.jit(jax.grad(loss), static_argnums=1).lower(
      x, impl).compile().as_text()
  assert 'reduce-window' in text('xla')  # what the test looks for is there before
  assert 'reduce-window' not in text('taps')


def test_map_smaller_than_the_window_gives_flaxs_empty_output():
  x = jnp.ones((2, 2, 2, 3))
  np.testing.assert_array_equal(pooling.max_pool(x, 3, 2, impl='taps'), _ref(x, 3, 2, 'VALID'))
  assert pooling.max_pool(x, 3, 2, impl='taps').shape == _ref(x, 3, 2, 'VALID').shape


def test_auto_and_errors():
  assert pooling.resolve_pool_impl('auto') == (
      'taps' if jax.default_backend() == 'cpu' else 'xla')
  with pytest.raises(ValueError, match="pool impl='fast'.*valid"):
    pooling.max_pool(jnp.ones((1, 4, 4, 1)), 2, 2, impl='fast')
  with pytest.raises(ValueError, match="padding='SAME'.*expected 'VALID'"):
    pooling.max_pool(jnp.ones((1, 4, 4, 1)), 2, 2, 'SAME')


def test_vmapped_gradient_equals_per_example_gradient():
  """Explanations vmap models over images (cxr_jax/explain/): the custom gradient batches."""
  x = _ties((3, 1, 9, 9, 2))
  f = lambda x: jnp.sum(jnp.sin(pooling.max_pool(x, 3, 2, ((1, 1), (1, 1)), impl='taps')))
  got = jax.vmap(jax.grad(f))(x)
  for i in range(3):
    np.testing.assert_allclose(got[i], jax.grad(f)(x[i]), rtol=0, atol=1e-6)


def test_benchmark_times_both_impls_and_writes_json(tmp_path, monkeypatch, capsys):
  import json
  import pathlib
  import sys
  monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parents[1] / 'benchmarks'))
  import max_pool as bench
  out = tmp_path / 'pool.json'
  monkeypatch.setattr(sys, 'argv', ['max_pool.py', '--layers=alexnet pool1 3x3/2', '--batch=1',
                                    '--repeats=1', '--no_torch', f'--json={out}'])
  bench.main()
  (row,) = json.loads(out.read_text())['rows']
  assert row['layer'] == 'alexnet pool1 3x3/2' and row['xla_ms'] > 0 and row['taps_ms'] > 0
  assert 'xla/taps' in capsys.readouterr().out
  monkeypatch.setattr(sys, 'argv', ['max_pool.py', '--layers=nope'])
  with pytest.raises(SystemExit):
    bench.main()
