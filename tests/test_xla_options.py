"""cxr_jax/xla_options.py: CPU programs compiled without YNNPACK fusions, a user's XLA_FLAGS
winning, options this jaxlib lacks left out, and `jit` behaving as `jax.jit`."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cxr_jax import xla_options


@pytest.fixture
def fresh_options():
  xla_options.compiler_options.cache_clear()
  yield
  xla_options.compiler_options.cache_clear()


def _conv_grad(x, k):
  f = lambda k: jnp.sum(lax.conv_general_dilated(x, k, (2, 2), 'SAME',
                                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC')) ** 2)
  return jax.grad(f)(k)


def _ynn_convolutions(compiled_text: str) -> int:
  """YNNPACK fusions made from a convolution in a compiled program's HLO."""
  return len(re.findall(r'%ynn_fusion[^\n]*conv_general_dilated', compiled_text))


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='CPU options only')
def test_cpu_programs_keep_convolutions_out_of_ynnpack(fresh_options):
  assert xla_options.compiler_options() == xla_options.CPU_OPTIONS
  # A strided convolution of this size is one that this jaxlib's defaults give YNNPACK.
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 56, 56, 32)), jnp.float32)
  k = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 32, 32)), jnp.float32)
  ours = xla_options.jit(_conv_grad).lower(x, k).compile().as_text()
  assert _ynn_convolutions(ours) == 0
  ours_g, theirs_g = xla_options.jit(_conv_grad)(x, k), jax.jit(_conv_grad)(x, k)
  np.testing.assert_allclose(ours_g, theirs_g, rtol=0, atol=1e-5 * float(jnp.abs(theirs_g).max()))
  if not _ynn_convolutions(jax.jit(_conv_grad).lower(x, k).compile().as_text()):
    pytest.skip("this jaxlib's defaults put no convolution in YNNPACK (the check above is moot)")


def test_users_xla_flags_win(fresh_options, monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', os.environ.get('XLA_FLAGS', '') +
                     ' --xla_cpu_experimental_ynn_fusion_type=dot')
  assert xla_options.compiler_options() == {}


def test_an_option_this_jaxlib_lacks_is_left_out(fresh_options, monkeypatch):
  monkeypatch.setattr(xla_options, 'cpu_options', lambda fusions: {
      'xla_cpu_no_such_option_anywhere': 'x'})
  monkeypatch.setattr(jax, 'default_backend', lambda: 'cpu')
  assert xla_options.compiler_options() == {}


def test_jit_keeps_jax_jit_keywords_attributes_and_results():
  @xla_options.jit
  def plain(x):
    """Doc."""
    return x * 2

  @xla_options.jit(static_argnames=('n',))
  def power(x, n):
    return x ** n

  assert plain.__doc__ == 'Doc.' and plain.__name__ == 'plain'
  assert float(plain(3.0)) == 6.0
  assert float(power(2.0, n=3)) == 8.0
  assert 'mul' in plain.lower(1.0).as_text()


def test_decorating_does_not_start_the_backend():
  """jax.distributed.initialize and the device-count flags must come before the backend."""
  code = ('import jax._src.xla_bridge as xb\n'
          'from cxr_jax import xla_options\n'
          'f = xla_options.jit(lambda x: x + 1)\n'
          'g = xla_options.jit(static_argnums=(1,))(lambda x, n: x * n)\n'
          'assert not xb._backends, xb._backends\n'
          'import cxr_jax.explain.prediction_difference, cxr_jax.train_step\n'
          'assert not xb._backends, xb._backends\n'
          'print(int(f(1)), int(g(2, 3)))\n')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ['2', '6']


def test_library_code_jits_through_xla_options():
  """Every jitted program of the library gets the compiler options: `jax.jit` appears only in
  xla_options.py itself and in the train state's init (compiled once at -O0 on the CPU)."""
  import pathlib
  root = pathlib.Path(xla_options.__file__).parent
  found = {}
  for path in root.rglob('*.py'):
    code = [line for line in path.read_text().splitlines() if not line.lstrip().startswith('#')]
    hits = [line for line in code if re.search(r'(?<![`\w.])jax\.jit\b(?!`)', line)]
    if hits:
      found[str(path.relative_to(root))] = len(hits)
  assert found == {'xla_options.py': 2, 'train_step.py': 1}, found


def _ynn_fusions(compiled_text: str) -> int:
  return len(re.findall(r'%ynn_fusion[.\d]* = ', compiled_text))


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='CPU options only')
def test_cpu_fusions_choose_what_ynnpack_gets(fresh_options):
  f = lambda x, y: jnp.maximum(x * y + 1.0, 0.0)  # noqa: E731  (element-wise only)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 64)), jnp.float32)
  counts = {fusions: _ynn_fusions(xla_options.jit(f, cpu_fusions=fusions).lower(x, x)
                                  .compile().as_text())
            for fusions in (xla_options.DEFAULT_CPU_FUSIONS, ('eltwise',), ())}
  assert counts[xla_options.DEFAULT_CPU_FUSIONS] == 0 and counts[()] == 0, counts
  assert counts[('eltwise',)] >= 1, counts
  np.testing.assert_allclose(xla_options.jit(f, cpu_fusions=('eltwise',))(x, x), f(x, x),
                             rtol=1e-6, atol=1e-6)
  assert xla_options.compiler_options(('eltwise', 'dot')) == {
      'xla_cpu_experimental_ynn_fusion_type':
      'LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_DOT'}


def test_unknown_cpu_fusion_names_the_key():
  with pytest.raises(ValueError, match=r"cpu_fusions: unknown YNNPACK fusion type\(s\) 'conv'; "
                     r'valid: dot, reduce'):
    xla_options.jit(lambda x: x, cpu_fusions=('dot', 'conv'))
  from cxr_jax import config_lib
  config = config_lib.base_config()
  config.cpu_fusions = ('eltwise', 'elementwise')
  with pytest.raises(ValueError, match=r"^config\.cpu_fusions: unknown .*'elementwise'"):
    config_lib.validate(config)
  assert xla_options.check_cpu_fusions('dot,eltwise') == ('dot', 'eltwise')
  assert xla_options.check_cpu_fusions(('dot,eltwise',)) == ('dot', 'eltwise')  # a flag's value
  assert xla_options.check_cpu_fusions('') == ()


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='CPU options only')
def test_train_step_is_compiled_with_the_configs_cpu_fusions(fresh_options):
  """`config.cpu_fusions` reaches the train step (cxr_jax/train.py passes it)."""
  from cxr_jax import losses, optim, parallel
  from cxr_jax.config_lib import base_config
  from cxr_jax.models import MODELS
  from cxr_jax.train_step import create_train_state, make_train_step
  mesh = parallel.make_mesh()
  model = MODELS.get('custom_cnn')(num_classes=2, widths=(4, 4, 4, 4, 4), hidden=8)
  tx = optim.build_optimizer(base_config().optimizer, 10)
  state = create_train_state(model, tx, (64, 64, 1), jax.random.key(0), mesh)
  n = mesh.size
  batch = parallel.to_global({'image': np.zeros((2 * n, 64, 64, 1), np.float32),
                              'labels': np.zeros((2 * n, 2), np.float32)}, mesh)
  texts = {}
  for fusions in (xla_options.DEFAULT_CPU_FUSIONS, ('eltwise',)):
    step = make_train_step(model, tx, losses.get_loss('sigmoid_bce'), mesh, cpu_fusions=fusions)
    texts[fusions] = step.lower(state, batch, jax.random.key(1)).compile().as_text()
  assert _ynn_fusions(texts[('eltwise',)]) > 0
  assert 'ELTWISE' not in str(xla_options.compiler_options())
  assert len(re.findall(r'%ynn_fusion[^\n]*kind=kCustom', texts[('eltwise',)])) > len(
      re.findall(r'%ynn_fusion[^\n]*kind=kCustom', texts[xla_options.DEFAULT_CPU_FUSIONS]))
