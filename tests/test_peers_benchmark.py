"""benchmarks/peers.py compares like with like: each torch twin has the cxr_jax model's parameters
and forward FLOPs (torch's own FlopCounterMode), and the GPU peak table reads device kinds."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_collections
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / 'benchmarks'))
import peers  # noqa: E402

from cxr_jax.models import build_model  # noqa: E402


@pytest.mark.parametrize('case', peers.CASES, ids=lambda c: c.name)
def test_torch_twin_has_the_same_parameters_and_flops(case):
  torch = pytest.importorskip('torch')
  from torch.utils.flop_counter import FlopCounterMode

  size = case.size or 64
  model = build_model(ml_collections.ConfigDict(case.model), num_classes=case.num_classes)
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  extra = ({'masks': jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)}
           if 'masks' in case.inputs else {})
  variables = jax.eval_shape(model.init, jax.random.key(0), x, **extra)
  twin = case.torch_model(torch, size).eval()
  assert (sum(a.size for a in jax.tree.leaves(variables['params']))
          == sum(p.numel() for p in twin.parameters()))
  kwargs = {'masks': torch.zeros(1, 3, size, size)} if 'masks' in case.inputs else {}
  with torch.no_grad(), FlopCounterMode(display=False) as counter:
    twin(torch.zeros(1, 3, size, size), **kwargs)
  # VGG's and AlexNet's adaptive pooling is a (counted) matrix product in cxr_jax at 64 px.
  assert peers.analytic_forward_flops(case, size) == pytest.approx(
      counter.get_total_flops(), rel=2e-4)


def test_frozen_backbone_counts_the_branch_gradients_only():
  (case,) = [c for c in peers.CASES if c.frozen_backbone]
  forward = peers.analytic_forward_flops(case, 64)
  branch = peers._count(case, 64, method='attend')
  assert 0 < branch < forward / 10
  assert peers.analytic_train_flops(case, 64) == forward + 2 * branch


def test_gpu_peak_table():
  assert peers.gpu_peak('NVIDIA H200', 'bfloat16') == ('H200 SXM', 989.4)
  assert peers.gpu_peak('NVIDIA H100 80GB HBM3', 'float32') == ('H100 SXM', 494.7)
  assert peers.gpu_peak('NVIDIA H100 PCIe', 'bfloat16') == ('H100 PCIe', 756.5)
  assert peers.gpu_peak('Tesla T4', 'bfloat16') is None


def test_benchmarks_import_without_tensorflow():
  # The GPU image has no TensorFlow or TFDS: configs (config_lib) and the benchmarks that
  # benchmarks/gpu_suite.sh runs must import without them.
  import subprocess
  code = ('import sys\n'
          'class Block:\n'
          '  def find_spec(self, name, path=None, target=None):\n'
          '    if name.split(".")[0] in ("tensorflow", "tensorflow_datasets"):\n'
          '      raise ImportError("blocked " + name)\n'
          'sys.meta_path.insert(0, Block())\n'
          f'sys.path.insert(0, {str(pathlib.Path(peers.__file__).parent)!r})\n'
          'import peers, pda, conv_impl, max_pool, cxr_jax.config_lib\n'
          'print("imported")\n')
  done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0 and 'imported' in done.stdout, done.stderr[-2000:]
