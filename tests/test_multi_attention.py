"""Paper 001's modules: space attention head, dilated ResNet, CAM / Grad-CAM on every head."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cxr_jax.attention import space_attention
from cxr_jax.explain import cam
from cxr_jax.models import build_model, model_function, resnet


@pytest.fixture(autouse=True)
def _full_float32_matmuls():
  """Exact float32 matmuls: GPUs default to TF32 (~1e-3), the tolerances here are float32's."""
  with jax.default_matmul_precision('highest'):
    yield


def test_fuse_global_local_by_hand():
  f = jnp.arange(2 * 2 * 2 * 3, dtype=jnp.float32).reshape(2, 2, 2, 3)
  fused = space_attention.fuse_global_local(f)
  assert fused.shape == (2, 2, 2, 6)
  np.testing.assert_array_equal(fused[..., :3], f)
  # Image 0: channel c holds c, c+3, c+6, c+9 over the 4 locations -> mean c + 4.5.
  np.testing.assert_allclose(fused[0, :, :, 3:], np.broadcast_to([4.5, 5.5, 6.5], (2, 2, 3)))
  np.testing.assert_allclose(fused[1, 1, 0, 3:], f[1].mean(axis=(0, 1)))


def test_space_attention_head_placements_agree_and_score_map_pools_to_logits():
  f = jax.random.normal(jax.random.key(0), (3, 4, 4, 8))
  after = space_attention.SpaceAttentionHead(5, pool='after_classifier')
  before = space_attention.SpaceAttentionHead(5, pool='before_classifier')
  variables = after.init(jax.random.key(1), f)
  assert variables['params']['classifier']['kernel'].shape == (16, 5)  # [2C, K]: no conv
  logits_a, inter = after.apply(variables, f, mutable=['intermediates'])
  logits_b, inter_b = before.apply(variables, f, mutable=['intermediates'])
  # A linear classifier commutes with the mean: both placements compute the same logits.
  np.testing.assert_allclose(logits_a, logits_b, rtol=1e-5, atol=1e-6)
  scores = inter['intermediates']['class_scores'][0]
  assert scores.shape == (3, 4, 4, 5)
  assert 'class_scores' not in inter_b.get('intermediates', {})
  np.testing.assert_allclose(scores.mean(axis=(1, 2)), logits_a, rtol=1e-5, atol=1e-6)
  kernel, bias = space_attention.head_params({'params': variables['params']}, ())
  np.testing.assert_allclose(space_attention.class_score_map(f, kernel, bias), scores,
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='pool'):
    space_attention.SpaceAttentionHead(5, pool='max').init(jax.random.key(0), f)


def _model(**kwargs):
  cfg = ml_collections.ConfigDict({'name': 'resnet18', 'width': 8, **kwargs})
  return build_model(cfg, num_classes=4)


@pytest.mark.parametrize('head', ['gap_dense', 'space_attention'])
def test_resnet_heads_head_fn_and_score_map_reproduce_logits(head):
  model = _model(head=head, se_reduction=4)
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  variables = model.init(jax.random.key(1), x)
  logits, features = model.apply(variables, x, return_features=True)
  assert features.shape == (2, 2, 2, 64)
  np.testing.assert_allclose(resnet.head_fn(model, variables)(features), logits, rtol=1e-5,
                             atol=1e-5)
  maps = model_function(model, 'score_map_fn')(model, variables)(features)
  assert maps.shape == (2, 2, 2, 4)
  np.testing.assert_allclose(maps.mean(axis=(1, 2)), logits, rtol=1e-5, atol=1e-5)
  if head == 'space_attention':
    _, inter = model.apply(variables, x, mutable=['intermediates'])
    sown = inter['intermediates']['space_attention']['class_scores'][0]
    np.testing.assert_allclose(sown, maps, rtol=1e-5, atol=1e-5)
    assert 'fc' not in variables['params']


def test_ma_parameters_are_resnet101_plus_se_and_a_2c_classifier():
  shapes = lambda m: jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  count = lambda t: sum(x.size for x in jax.tree.leaves(t['params']))
  base = count(shapes(build_model(ml_collections.ConfigDict({'name': 'resnet101'}),
                                  num_classes=14)))
  ma = build_model(ml_collections.ConfigDict({'name': 'resnet101', 'se_reduction': 16,
                                              'head': 'space_attention'}), num_classes=14)
  se = shapes(ma)['params']
  # ResNet-101 with a 14-class fc: 42,528,846 = 44,549,160 - 2048 * 986 - 986.
  assert base == 44_549_160 - 2048 * 986 - 986
  se_params = sum(x.size for p, x in jax.tree_util.tree_flatten_with_path(se)[0]
                  if any(getattr(k, 'key', '') == 'se' for k in p))
  # 33 bottlenecks, SE(C = 4 * width): C*C/16 + C/16 + C/16*C + C.
  expected_se = sum(n * (2 * c * c // 16 + c // 16 + c)
                    for n, c in zip((3, 4, 23, 3), (256, 512, 1024, 2048), strict=True))
  assert se_params == expected_se
  assert se['space_attention']['classifier']['kernel'].shape == (4096, 14)
  assert count({'params': se}) == base - (2048 * 14 + 14) + expected_se + 4096 * 14 + 14


def test_dilation_keeps_parameters_and_halves_the_output_stride():
  x = jnp.zeros((1, 64, 64, 3))
  plain, dilated = _model(), _model(replace_stride_with_dilation=(False, False, True))
  v = plain.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, v) == jax.tree.map(
      jnp.shape, dilated.init(jax.random.key(0), x))
  _, f = dilated.apply(v, x, return_features=True)
  assert f.shape == (1, 4, 4, 64)
  with pytest.raises(ValueError, match='3 booleans'):
    _model(replace_stride_with_dilation=(True,)).init(jax.random.key(0), x)


def test_dilated_resnet50_matches_torchvision():
  torch = pytest.importorskip('torch')
  torchvision = pytest.importorskip('torchvision')
  torch.manual_seed(0)
  ref = torchvision.models.resnet50(weights=None,
                                    replace_stride_with_dilation=[False, True, True]).eval()
  x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    want = ref(x).numpy()
  variables = resnet.from_torchvision({k: v.numpy() for k, v in ref.state_dict().items()})
  model = build_model(ml_collections.ConfigDict(
      {'name': 'resnet50', 'replace_stride_with_dilation': (False, True, True)}),
      num_classes=1000)
  got = model.apply(variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


def test_grad_cam_of_a_gap_linear_head_is_relu_cam_over_area():
  # d y_k / d f_c(i, j) = w_ck / (h w) everywhere, so alpha_ck = w_ck / (h w) and
  # Grad-CAM_k = ReLU(sum_c w_ck f_c) / (h w) = ReLU(CAM_k - b_k) / (h w).
  rng = np.random.default_rng(0)
  f = jnp.asarray(rng.normal(size=(2, 3, 5, 6)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(4,)), jnp.float32)
  head = lambda x: jnp.mean(x, axis=(1, 2)) @ kernel + bias
  score_map = lambda x: x @ kernel + bias
  maps = cam.grad_cam(head, f)
  np.testing.assert_allclose(maps, np.maximum(cam.cam(score_map, f) - bias, 0) / 15, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(cam.class_maps('grad_cam', f, head_fn=head), maps)
  with pytest.raises(ValueError, match='score_map_fn'):
    cam.class_maps('cam', f, head_fn=head)
  with pytest.raises(ValueError, match='valid'):
    cam.class_maps('saliency', f, head_fn=head)


def test_grad_cam_of_the_space_attention_head_by_finite_differences():
  model = _model(head='space_attention')
  x = jax.random.normal(jax.random.key(0), (1, 64, 64, 3))
  variables = model.init(jax.random.key(1), x)
  _, f = model.apply(variables, x, return_features=True)
  head = resnet.head_fn(model, variables)
  maps = np.asarray(cam.grad_cam(head, f))
  eps = 1e-2
  f_np = np.asarray(f, np.float64)
  k = 2
  alpha = np.zeros(f.shape[-1])
  for c in range(f.shape[-1]):  # central differences of y_k on a uniform shift of channel c
    d = np.zeros_like(f_np)
    d[..., c] = eps
    up = np.asarray(head(jnp.asarray(f_np + d, jnp.float32)))[0, k]
    down = np.asarray(head(jnp.asarray(f_np - d, jnp.float32)))[0, k]
    alpha[c] = (up - down) / (2 * eps) / (f.shape[1] * f.shape[2])
  want = np.maximum(np.einsum('c,hwc->hw', alpha, f_np[0]), 0)
  np.testing.assert_allclose(maps[0, ..., k], want, rtol=1e-2, atol=1e-3 * want.max())
