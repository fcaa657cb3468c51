"""Analytic FLOP counts against hand-computed values and torch's FlopCounterMode."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax import lax

from cxr_jax import flops
from cxr_jax.models import build_model


def _forward_flops(model, size: int, channels: int = 3) -> int:
  x = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  return flops.count_flops(lambda v, x: model.apply(v, x, train=False), variables, x)


def test_conv_and_dot_by_hand():
  def f(x, w, dense):
    y = lax.conv_general_dilated(x, w, (2, 2), 'SAME',
                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))  # [2, 4, 4, 6]
    return y.reshape(2, -1) @ dense  # [2, 96] @ [96, 5]

  n = flops.count_flops(f, jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 6)), jnp.ones((96, 5)))
  assert n == 2 * (2 * 4 * 4 * 6) * (3 * 3 * 4) + 2 * (2 * 96) * 5


def test_grouped_batched_and_transposed():
  x = jnp.ones((2, 8, 8, 6))
  depthwise = lambda x, w: lax.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=6)
  assert flops.count_flops(depthwise, x, jnp.ones((3, 3, 1, 6))) == 2 * (2 * 8 * 8 * 6) * 9
  batched = lambda a, b: jnp.einsum('bij,bjk->bik', a, b)
  assert flops.count_flops(batched, jnp.ones((3, 4, 5)), jnp.ones((3, 5, 7))) == 2 * 3 * 4 * 5 * 7
  # A 2x2 stride-2 transposed convolution: each input pixel meets each kernel tap once.
  up = lambda x, w: lax.conv_transpose(x, w, (2, 2), 'VALID',
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  assert flops.count_flops(up, x, jnp.ones((2, 2, 6, 3))) == 2 * (2 * 8 * 8) * 6 * 3 * 4


def test_scan_counts_every_step_cond_the_dearest_branch_while_refused():
  def scanned(c, m):
    return lax.scan(lambda c, _: (c @ m, None), c, None, length=5)[0]
  assert flops.count_flops(scanned, jnp.ones((2, 3)), jnp.ones((3, 3))) == 5 * 2 * 2 * 3 * 3

  def branched(p, c, m):
    return lax.cond(p, lambda c: (c @ m) @ m, lambda c: c, c)
  assert flops.count_flops(branched, True, jnp.ones((2, 3)), jnp.ones((3, 3))) == 2 * 2 * 2 * 9

  nested = jax.jit(jax.checkpoint(lambda c, m: c @ m))
  assert flops.count_flops(nested, jnp.ones((2, 3)), jnp.ones((3, 3))) == 2 * 2 * 3 * 3

  def looped(c, m):
    return lax.while_loop(lambda s: s[1] < 3, lambda s: (s[0] @ m, s[1] + 1), (c, 0))[0]
  with pytest.raises(ValueError, match='while loop'):
    flops.count_flops(looped, jnp.ones((2, 3)), jnp.ones((3, 3)))
  assert flops.train_flops(10) == 30


def test_mobilenet_v1_matches_the_paper():
  # Howard et al. 2017, Table 8: 1.0 MobileNet-224, 569 million mult-adds (1000 classes).
  model = build_model(ml_collections.ConfigDict(
      {'name': 'mobilenet_v1', 'depthwise_impl': 'xla', 'conv_impl': 'xla'}), num_classes=1000)
  assert _forward_flops(model, 224) / 2 / 1e6 == pytest.approx(569, rel=0.005)


@pytest.mark.parametrize('name,size', [('resnet50', 64), ('densenet121', 64), ('vgg16', 224),
                                       ('alexnet', 224)])
def test_torchvision_backbones_match_torch_flop_counter(name, size):
  torch = pytest.importorskip('torch')
  torchvision = pytest.importorskip('torchvision')
  from torch.utils.flop_counter import FlopCounterMode

  reference = getattr(torchvision.models, name)(weights=None, num_classes=14).eval()
  with torch.no_grad(), FlopCounterMode(display=False) as counter:
    reference(torch.zeros(1, 3, size, size))
  cfg = {'name': name} if name == 'alexnet' else {'name': name, 'conv_impl': 'xla'}
  model = build_model(ml_collections.ConfigDict(cfg), num_classes=14)
  assert _forward_flops(model, size) == counter.get_total_flops()


def test_unet_matches_torch_flop_counter():
  torch = pytest.importorskip('torch')
  import pathlib
  import sys
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / 'benchmarks'))
  import lung_heart
  from torch.utils.flop_counter import FlopCounterMode

  reference = lung_heart._torch_unet(torch).eval()
  with torch.no_grad(), FlopCounterMode(display=False) as counter:
    reference(torch.zeros(1, 3, 64, 64))
  model = build_model(lung_heart.unet_config(), num_classes=lung_heart.STRUCTURES)
  assert _forward_flops(model, 64) == counter.get_total_flops()


def test_matmul_conv_impl_counts_the_same():
  cfg = {'name': 'resnet50', 'width': 8}
  counts = [_forward_flops(build_model(ml_collections.ConfigDict({**cfg, 'conv_impl': impl}),
                                       num_classes=3), 32) for impl in ('xla', 'matmul')]
  assert counts[0] == counts[1] and np.isfinite(counts[0])
