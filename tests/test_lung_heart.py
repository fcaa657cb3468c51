"""Paper 004's classifier parts: multi-scale attention (parity with a torch twin of the released
code), feature weighting (adaptive pooling as torch's), the DenseNet switches, Table 3's
GT-blind boxes, and Table 2 / Table 3 / Fig. 3 from `python -m cxr_jax.report`."""

import inspect
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cxr_jax.attention import feature_weighting as fw
from cxr_jax.attention.multiscale import MultiScaleAttention
from cxr_jax.models import build_model

torch = pytest.importorskip('torch')


def _torch_msa(x: np.ndarray, params: dict) -> np.ndarray:
  """The released code's MultiScaleAttention, written in torch (NCHW), with our weights."""
  t = torch.from_numpy(np.transpose(x, (0, 3, 1, 2)).copy())

  def conv(inp, kernel):  # flax HWIO -> torch OIHW, symmetric padding k // 2, no bias
    w = torch.from_numpy(np.transpose(np.asarray(kernel), (3, 2, 0, 1)).copy())
    return torch.nn.functional.conv2d(inp, w, padding=w.shape[-1] // 2)

  def max_mean(y):
    return [torch.max(y, dim=1, keepdim=True)[0], torch.mean(y, dim=1, keepdim=True)]

  maps = max_mean(t) + max_mean(conv(t, params['scale_conv1']['kernel'])) + max_mean(
      conv(t, params['scale_conv2']['kernel']))
  att = torch.sigmoid(conv(torch.cat(maps, dim=1), params['agg_conv']['kernel']))
  return np.transpose((att * t).numpy(), (0, 2, 3, 1))


def test_multiscale_attention_matches_the_released_code():
  x = np.random.default_rng(0).normal(size=(2, 20, 24, 3)).astype(np.float32)
  module = MultiScaleAttention()
  variables = jax.jit(module.init)(jax.random.key(1), x)
  params = variables['params']
  assert {k: v['kernel'].shape for k, v in params.items()} == {
      'scale_conv1': (5, 5, 3, 3), 'scale_conv2': (9, 9, 3, 3), 'agg_conv': (3, 3, 6, 1)}
  assert all(set(v) == {'kernel'} for v in params.values())  # no biases
  out, state = module.apply(variables, x, mutable=['intermediates'])
  np.testing.assert_allclose(out, _torch_msa(x, params), atol=2e-5 * np.abs(x).max())
  att = state['intermediates']['msa_map'][0]
  assert att.shape == (2, 20, 24, 1) and 0 < float(att.min()) <= float(att.max()) < 1
  # The text's stride-2 reading: same shapes and parameters, maps upsampled back.
  half = MultiScaleAttention(stride=2)
  assert half.apply(half.init(jax.random.key(1), x), x).shape == x.shape
  with pytest.raises(ValueError, match='stride=3'):
    MultiScaleAttention(stride=3).init(jax.random.key(1), x)


@pytest.mark.parametrize('size,out', [((14, 14), (7, 7)), ((10, 7), (4, 3)), ((5, 5), (2, 3))])
def test_adaptive_avg_pool_matches_torch(size, out):
  x = np.random.default_rng(0).random((2, *size, 1)).astype(np.float32)
  ours = fw.adaptive_avg_pool(jnp.asarray(x), out)
  theirs = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x[..., 0]), out).numpy()
  np.testing.assert_allclose(ours[..., 0], theirs, rtol=1e-6, atol=1e-7)


def test_feature_weighting_zeroes_features_outside_lungs_and_heart():
  masks = np.zeros((1, 64, 64, 3), np.float32)
  masks[0, :, :20, 0] = 1.0   # left part: 20 of 32 columns of cell column 0 -> kept
  masks[0, :8, 32:, 2] = 1.0  # 8 of 32 rows of the right cells -> below 0.5, dropped
  pooled = fw.pooled_mask(jnp.asarray(masks), (2, 2))
  np.testing.assert_array_equal(pooled[0, ..., 0], [[1, 0], [1, 0]])
  soft = fw.pooled_mask(jnp.asarray(masks), (2, 2), binarize=False)
  np.testing.assert_allclose(soft[0, ..., 0], [[20 / 32, 8 / 32], [20 / 32, 0]])
  model = build_model(ml_collections.ConfigDict({
      'name': 'densenet121', 'growth_rate': 4, 'block_config': (1, 1, 1, 1),
      'num_init_features': 8, 'input_attention': 'multiscale', 'feature_weighting': True}),
      num_classes=3)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 64, 64, 3)), jnp.float32)
  variables = jax.jit(model.init)(jax.random.key(0), x, masks=masks)
  logits, state = jax.jit(lambda v, x, m: model.apply(v, x, masks=m, mutable=['intermediates'])
                          )(variables, x, masks)
  inter = state['intermediates']
  f_l, f_g = inter['features'][0], inter['global_features'][0]
  np.testing.assert_array_equal(f_l[0, :, 1], 0.0)
  np.testing.assert_allclose(f_l[0, :, 0], f_g[0, :, 0])
  assert 0 < float(f_g.min()) and float(f_g.max()) < 1  # the released code's sigmoid
  # The head sees F_l: CAM and Grad-CAM explain what the classifier used.
  from cxr_jax.models.densenet import head_fn
  np.testing.assert_allclose(head_fn(model, variables)(f_l), logits, rtol=1e-5, atol=1e-6)


def test_table3_boxes_never_see_the_ground_truth(tmp_path, monkeypatch):
  from cxr_jax import inference, layout
  from cxr_jax.explain import boxes as boxes_lib
  from cxr_jax.stages import localize
  assert 'boxes' not in inspect.signature(inference.predict_boxes).parameters
  model = build_model(ml_collections.ConfigDict({
      'name': 'densenet121', 'growth_rate': 4, 'block_config': (1, 1, 1, 1),
      'num_init_features': 8, 'input_attention': 'multiscale'}), num_classes=2)
  x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  variables = jax.device_get(jax.jit(model.init)(jax.random.key(0), x[:1]))
  info = inference.ModelInfo(image_shape=(64, 64, 3), class_names=('Mass', 'Nodule'),
                             model={'name': 'densenet121'})
  predictor = inference.Predictor(tmp_path, 'train_classifier', model, variables, info,
                                  inference.OperatingPoint(np.full(2, 0.5), 'scalar'))
  seen = []
  real = boxes_lib.heatmap_to_boxes
  monkeypatch.setattr(boxes_lib, 'heatmap_to_boxes',
                      lambda heat, settings: seen.append(np.array(heat)) or real(heat, settings))
  cfg = ml_collections.ConfigDict({
      'boxes': {'threshold': 0.5, 'normalize': 'minmax', 'mode': 'largest', 'min_area': 0.0,
                'connectivity': 8, 'thresholds': (0.2, 0.7)},
      'iou_thresholds': (0.1, 0.5), 'require_prediction': False, 'batch_size': 2,
      'num_overlays': 0, 'method': 'cam', 'split': 'bbox'})

  def examples(shift):
    return [{'image_id': f'i{i}', 'image': x[i], 'labels': np.ones(2, np.float32),
             'boxes': np.array([[0.1 + shift, 0.1, 0.4 + shift, 0.5]], np.float32),
             'box_classes': ['Mass']} for i in range(2)]

  first = localize.localize_model(predictor, examples(0.0), cfg, layout.Run(tmp_path), 'FE')
  maps_first, seen[:] = list(seen), []
  records_first = (tmp_path / 'localize' / 'train_classifier' / 'records.jsonl').read_text()
  second = localize.localize_model(predictor, examples(0.4), cfg, layout.Run(tmp_path), 'FE')
  records = [json.loads(line) for line in (
      tmp_path / 'localize' / 'train_classifier' / 'records.jsonl').read_text().splitlines()]
  # Moving the experts' boxes changes the IoU, never the heat maps or the predicted boxes.
  assert len(maps_first) == len(seen) == 2
  for a, b in zip(maps_first, seen, strict=True):
    np.testing.assert_array_equal(a, b)
  assert [r['pred'] for r in records] == [json.loads(line)['pred']
                                          for line in records_first.splitlines()]
  assert first['num_boxes'] == second['num_boxes'] == 2


def test_report_prints_paper004_tables_and_writes_roc(tmp_path, capsys):
  from cxr_jax import evaluate, layout, report
  from cxr_jax.explain import localization
  from cxr_jax.io_utils import atomic_write_json
  from cxr_jax.labels import NIH_CLASSES
  rng = np.random.default_rng(0)
  dirs = []
  for name, label in (('lh_densenet121', 'CheXNet'), ('lh_msa_densenet', 'Ours w/o F_l')):
    run = layout.Run(tmp_path / name)
    atomic_write_json(run.config_file, {'name': name,
                                        'report_models': [['train_classifier', label]]})
    y = (rng.random((30, 14)) < 0.4).astype(np.float32)
    y[:2] = [[0] * 14, [1] * 14]
    p = np.clip(0.3 * y + 0.7 * rng.random(y.shape), 0, 1).astype(np.float32)
    run.write_metrics('train_classifier', 'test', evaluate.compute_metrics(y, p, NIH_CLASSES))
    run.write_predictions('train_classifier', 'test', [str(i) for i in range(30)], y, p)
    recs = [{'image_id': 'a', 'class': 'Mass', 'gt': [0, 0, 4, 4], 'pred': [[0, 0, 2, 4]],
             'prob': 0.7, 'predicted': True, 'iou': 0.5, 'iobb': 1.0}]
    run.write_localization('train_classifier', localization.localization_metrics(
        recs, ['Mass'], iou_thresholds=(0.3,)), recs)
    dirs.append(str(run.root))
  out = tmp_path / 'cmp'
  code = report.main([f'--workdirs={",".join(dirs)}', '--reference=paper004', f'--out={out}'])
  text = capsys.readouterr().out
  assert code == 0
  assert 'Paper 004 Table 2' in text and '| Class | CheXNet | Ours w/o F_l |' in text
  row = next(line for line in text.splitlines() if line.startswith('| Average |') and
             '0.8335' in line)
  assert '0.7934' in row and '0.8105' in row and '0.8222' in row
  t3 = [line for line in text.splitlines() if line.startswith('| paper: FE')]
  assert '0.2870' in t3[0] and '0.3014' in t3[0] and '0.2312' in t3[1] and '0.2437' in t3[1]
  assert any(line.startswith('| ours: Ours w/o F_l | n/a | n/a | n/a | n/a | 0.5000')
             for line in text.splitlines())
  assert (out / 'roc.png').stat().st_size > 10_000
  # A segmentation run is not a classifier column.
  atomic_write_json(tmp_path / 'unet' / 'config.json',
                    {'name': 'u', 'report_models': [], 'data': {'target': 'masks'}})
  assert report.main([f'--workdirs={tmp_path / "unet"}']) == 2
  assert 'a segmentation run' in capsys.readouterr().err
