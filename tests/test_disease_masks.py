"""Paper 002's disease masks (eq. 1-5), pseudo masks, and its stages end to end (tiny phantom)."""

import importlib.util
import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cxr_jax import config_lib, inference, layout, report, stages
from cxr_jax.attention import disease_masks as dm
from cxr_jax.models import build_model, model_function

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _full_float32_matmuls():
  with jax.default_matmul_precision('highest'):
    yield


def test_eq3_by_hand():
  a = np.array([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0]])
  b = np.array([[4.0, 0.0, 0.0], [0.0, 0.0, 4.0]])
  # Symmetric: H(L) + L, then min-max. a: [[2, 2, 2], [0, 0, 0]] -> [[1, 1, 1], [0, 0, 0]];
  # b: [[4, 0, 4], [4, 0, 4]] -> [[1, 0, 1], [1, 0, 1]]. Mean: [[1, .5, 1], [.5, 0, .5]].
  soft = dm.disease_mask(np.stack([a, b]), symmetric=True, threshold=0.5, binarize=False)
  np.testing.assert_allclose(soft, [[1, 0.5, 1], [0.5, 0, 0.5]])
  hard = dm.disease_mask(np.stack([a, b]), symmetric=True, threshold=0.6, binarize=True)
  np.testing.assert_array_equal(hard, [[1, 0, 1], [0, 0, 0]])
  # Asymmetric (cardiomegaly): no flip. a -> [[0, .5, 1], [0, 0, 0]], b -> [[1, 0, 0], [0, 0, 1]].
  asym = dm.disease_mask(np.stack([a, b]), symmetric=False, threshold=0.0, binarize=False)
  np.testing.assert_allclose(asym, [[0.5, 0.25, 0.5], [0, 0, 0.5]])
  # The order matters: normalising before the flip-sum would give a map in [0, 2].
  assert dm.prepare_maps(np.stack([a]), True).max() == 1.0
  acc = dm.MaskAccumulator(2, (2, 3), [True, False])
  acc.add(0, np.stack([a]))
  acc.add(0, np.stack([b]))
  acc.add(1, np.zeros((0, 2, 3)))
  np.testing.assert_allclose(acc.masks(0.5, False)[0], soft)
  np.testing.assert_array_equal(acc.masks(0.5, False)[1], 0)  # no image: no mask
  assert list(acc.counts) == [2, 0]
  # A constant map normalises to zeros, not NaN.
  np.testing.assert_array_equal(dm.normalize01(np.ones((1, 2, 2))), 0)


def test_area_resize_averages_blocks():
  masks = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
  np.testing.assert_allclose(dm.area_resize(masks, (2, 2))[0], [[2.5, 4.5], [10.5, 12.5]])
  odd = np.random.default_rng(0).random((2, 12, 12)).astype(np.float32)
  np.testing.assert_allclose(dm.area_resize(odd, (5, 5)).mean(axis=(1, 2)),
                             odd.mean(axis=(1, 2)), rtol=0.05)


def test_pseudo_masks_render_rectangles_and_polygons():
  shapes = {'top_left': ('rect', 0.0, 0.0, 0.5, 0.25),
            'triangle': ('polygon', 0.0, 0.0, 1.0, 0.0, 0.0, 1.0)}
  masks = dm.render_pseudo_masks({'Mass': ('top_left',), 'Nodule': ('top_left', 'triangle')},
                                 shapes, ['Atelectasis', 'Mass', 'Nodule'], (8, 8))
  assert masks.shape == (3, 8, 8) and masks[0].sum() == 0
  want = np.zeros((8, 8))
  want[:2, :4] = 1
  np.testing.assert_array_equal(masks[1], want)
  assert masks[2][0, 7] == 1 and masks[2][7, 7] == 0 and masks[2][:2, :4].all()
  with pytest.raises(ValueError, match='no shape'):
    dm.render_pseudo_masks({'Mass': ('heart',)}, shapes, ['Mass'], (8, 8))
  with pytest.raises(ValueError, match='not among the classes'):
    dm.render_pseudo_masks({'Hernia': ('top_left',)}, shapes, ['Mass'], (8, 8))
  with pytest.raises(ValueError, match='normalised'):
    dm.render_shape(('rect', 0, 0, 2, 1), (8, 8))


def _resnet(**kwargs):
  cfg = {'name': 'resnet18', 'width': 4, 'stage_sizes': (1, 1, 1, 1),
         'replace_stride_with_dilation': (False, True, True), **kwargs}
  return build_model(ml_collections.ConfigDict(cfg), num_classes=3)


def test_dm_head_is_eq4_per_class_and_loads_a_classifier_unchanged():
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  plain = _resnet()
  variables = jax.jit(plain.init)(jax.random.key(1, impl='rbg'), x)
  psi = np.random.default_rng(0).random((4, 4, 3)).astype(np.float32)
  psi[..., 2] = 0  # a class without a mask
  with_dm = _resnet(head='disease_masks', disease_masks=psi.tolist())
  # The same parameters (fc kernel and bias): a classifier's checkpoint loads as it is.
  assert jax.tree.map(jnp.shape, jax.eval_shape(with_dm.init, jax.random.key(1), x)) == \
      jax.tree.map(jnp.shape, variables)
  logits, f = with_dm.apply(variables, x, return_features=True)
  w, b = variables['params']['fc']['kernel'], variables['params']['fc']['bias']
  # Eq. 4 per class: logit_c = GAP(psi_c f + f) . w_c + b_c.
  f_prime = (1 + psi[None, :, :, None, :]) * np.asarray(f)[..., None]  # [B, h, w, C, K]
  want = np.einsum('bck,ck->bk', f_prime.mean(axis=(1, 2)), w) + b
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-5)
  # psi = 0 is the classifier itself.
  np.testing.assert_allclose(logits[:, 2], plain.apply(variables, x)[:, 2], rtol=1e-5,
                             atol=1e-6)
  # Eq. 5: S^_c = (1 + psi_c) S_c (+ b), whose mean is the logit; head_fn agrees.
  maps = model_function(with_dm, 'score_map_fn')(with_dm, variables)(f)
  np.testing.assert_allclose(maps, (1 + psi) * (np.asarray(f) @ w) + b, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(maps.mean(axis=(1, 2)), logits, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(model_function(with_dm, 'head_fn')(with_dm, variables)(f), logits,
                             rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match=r'disease masks of shape \(2, 2, 3\)'):
    _resnet(head='disease_masks', disease_masks=psi[:2, :2].tolist()).apply(variables, x)


def _tiny_config(name: str, data_dir: str) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(
      name, ROOT / 'configs' / 'disease_masks' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config('demo')
  for data in (c.data, c.stage_overrides.train_loss_network.data):
    data.name = 'cxr_phantom/tiny'
    data.data_dir = data_dir
  tiny = {'name': 'resnet18', 'width': 4, 'stage_sizes': (1, 1, 1, 1)}
  for model in (c.model, c.stage_overrides.train_dm.model):
    model.update(tiny)
  c.align.model.update(tiny)
  c.batch_size = c.eval_batch_size = c.align.batch_size = 8
  c.num_train_steps = 2
  c.stage_overrides.train_dm.num_train_steps = 1
  c.stage_overrides.train_loss_network.num_train_steps = 2
  c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = 2
  c.align.num_train_steps = 2
  c.align.log_every_steps = c.align.checkpoint_every_steps = 1
  c.align.anchor_images = 30  # the tiny train split has 12 normal images: all are used
  c.align.figure_images = 2
  c.disease_masks.min_prob = 0.05
  c.localize.batch_size = 4
  c.localize.num_overlays = 1
  config_lib.validate(c, stages.STAGES)
  return c


def test_dm_aligned_stages_end_to_end(phantom_data_dir, tmp_path, caplog):
  config = _tiny_config('dm_aligned', phantom_data_dir)
  workdir = tmp_path / 'dm_aligned'
  caplog.set_level('INFO', logger='absl')
  with caplog.at_level(logging.INFO):
    stages.run(config, workdir)
  run = layout.Run(workdir)
  assert 'has only 12 "No Finding" images; the anchor is the mean of all 12' in caplog.text
  anchor = run.read_anchor()
  assert anchor['anchor'].shape == (64, 64, 3) and len(anchor['image_ids']) == 12
  # One transform per image of every split the run reads, each image once.
  ids, matrices = run.read_align_transforms()
  assert len(ids) == len(set(ids)) == 24 + 8 + 8 + 8 and matrices.shape == (48, 2, 3)
  summary = run.read_align_summary()
  assert summary['error']['num_images'] == 8 and summary['loss_network']['kind'] == \
      'trained on the data'
  # Later stages read aligned images: the classifier's eval preprocessing names this run.
  info = inference.read_model_info(workdir / 'train_classifier')
  assert f'align("{workdir.absolute()}")' in info.pp_eval
  masks = run.read_disease_masks('disease_masks')
  assert masks['masks'].shape == (14, 64, 64) and masks['classes'] == list(config.data.classes)
  dm_summary = run.read_disease_masks_summary('disease_masks')
  counts = {c: e['images'] for c, e in dm_summary['per_class'].items()}
  assert set(counts) == set(config.disease_masks.classes)
  assert all(masks['counts'][list(config.data.classes).index(c)] == n for c, n in counts.items())
  # Classes without a qualifying image are named, with the fallback.
  empty = [c for c, n in counts.items() if n == 0]
  assert empty, counts  # the tiny train split lacks some box classes
  assert f"no training image of class {empty[0]!r} has P_c >= 0.05" in caplog.text
  assert 'fallback: no mask' in dm_summary['per_class'][empty[0]]['note']
  # train_dm: psi at the 8 x 8 feature map inside model.json, so the model restores alone.
  predictor = inference.load_predictor(workdir, 'train_dm')
  assert predictor.model.head == 'disease_masks'
  assert np.asarray(predictor.model.disease_masks).shape == (8, 8, 14)
  assert predictor.supports('cam')
  loc = json.loads(run.localization_file('train_dm').read_text())
  assert set(loc['class_names']) <= set(config.disease_masks.classes)
  md = run.report_file('markdown').read_text()
  for heading in ('Table 4: AUROC on the eight classes', 'Anchor image', 'Alignment module',
                  'Disease masks (eq. 3', '| ResNet-50+Alignment+DM |', 'T(IoU)'):
    assert heading in md, heading
  for kind in ('anchor', 'alignment'):
    assert len(run.report_file(kind).read_bytes()) > 1000
  assert (run.report_file('disease_masks') / 'disease_masks.png').exists()

  # A disease-mask artefact for another class list: an error naming both lists.
  other = ml_collections.ConfigDict(config.to_dict())
  other.data.classes = config.data.classes[:8]
  expanded = config_lib.expand_workdir(other, workdir)
  from cxr_jax.stages import disease_masks as dm_stage
  with pytest.raises(ValueError, match=r"for the classes \['Atelectasis'.*'Hernia'\], but this "
                     r"run classifies \['Atelectasis'.*'Pneumothorax'\]"):
    dm_stage.dm_train_config(expanded, workdir)

  # Pseudo-disease masks (Table 2) on the same aligned classifier: the regions of pdm.py drawn
  # at 64 x 64, then area-resized into train_dm's model config (no training needed here).
  pdm = config_lib.expand_workdir(_tiny_config('pdm', config.data.data_dir), workdir)
  stages.STAGES.get('pseudo_disease_masks')(pdm, workdir)
  pseudo = run.read_disease_masks('pseudo_disease_masks')
  k = {c: list(config.data.classes).index(c) for c in ('Cardiomegaly', 'Mass', 'Hernia')}
  assert pseudo['masks'].shape == (14, 64, 64) and str(pseudo['kind']) == 'pseudo'
  assert set(np.unique(pseudo['masks'])) == {0.0, 1.0}
  assert not pseudo['masks'][k['Hernia']].any()  # no region given: psi = 0
  heart, lungs = pseudo['masks'][k['Cardiomegaly']], pseudo['masks'][k['Mass']]
  assert 0.05 < heart.mean() < lungs.mean() < 0.6
  psi = np.asarray(dm_stage.dm_train_config(pdm, workdir).model.disease_masks)
  assert psi.shape == (8, 8, 14)
  np.testing.assert_allclose(psi[..., k['Mass']], lungs.reshape(8, 8, 8, 8).mean(axis=(1, 3)),
                             atol=1e-6)

  # The comparison CLI: Tables 1, 3 and 4 with both models of the run.
  table = report.comparison_table(report.load_columns([str(workdir)], all_models=True))
  assert 'Table 4' in table and 'ResNet-50+Alignment+DM' in table
