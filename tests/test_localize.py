"""The localize stage and paper 001's stages end to end (tiny phantom), and localisation on the
real NIH box sample."""

import importlib.util
import json
import pathlib

import jax
import ml_collections
import numpy as np
import pytest

from cxr_jax import config_lib, inference, layout, report, stages
from cxr_jax.data import pipeline
from cxr_jax.explain import boxes as boxes_lib
from cxr_jax.models import build_model
from cxr_jax.stages import localize

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _ma_config(name: str, data_dir: str):
  spec = importlib.util.spec_from_file_location('cfg', ROOT / 'configs' / 'multi_attention' /
                                                f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config('demo')
  config.data.name = 'cxr_phantom/tiny'
  config.data.data_dir = data_dir
  config.model.name = 'resnet18'
  config.model.width = 8
  config.batch_size = 8
  config.eval_batch_size = 8
  config.num_train_steps = 4
  config.optimizer.schedule.boundaries = (3,)
  config.log_every_steps = 2
  config.eval_every_steps = 2
  config.checkpoint_every_steps = 2
  config.localize.batch_size = 3
  config.localize.num_overlays = 2
  # The viewer's gate is tested in test_ood.py and by the README demo test.
  config.stages = tuple(s for s in config.stages if s != 'fit_ood')
  config_lib.validate(config)
  return config


def test_multi_attention_stages_end_to_end(phantom_data_dir, tmp_path, caplog):
  config = _ma_config('ma', phantom_data_dir)
  # Stage 2 continuing from stage 1 (the paper's default is from scratch): the whole model.
  config.stage_overrides.train_hard_examples = ml_collections.ConfigDict(
      {'init_from': {'stage': 'train_classifier', 'target': '', 'checkpoint': '', 'fresh': ()}})
  config_lib.validate(config)
  workdir = tmp_path / 'ma'
  caplog.set_level('INFO', logger='absl')  # absl keeps its own level (a CLI may lower it)
  with caplog.at_level('INFO'):
    stages.run(config, workdir)
  assert 'Initialised the model from the best checkpoint of' in caplog.text
  assert 'Hard positives (missed/positives) per class' in caplog.text

  mined = json.loads(layout.Run(workdir).hard_examples_file.read_text())
  assert mined['num_images_a'] == 24
  assert mined['num_examples_c'] == 24 + sum(mined['copies'].values())
  assert sum(v['hard'] for v in mined['per_class'].values()) == mined['num_hard_pairs'] > 0
  assert (workdir / 'train_hard_examples' / 'best').is_dir()
  info = json.loads((workdir / 'train_hard_examples' / 'model.json').read_text())
  assert info['model']['head'] == 'space_attention' and info['model']['se_reduction'] == 16

  loc = json.loads((workdir / 'localize' / 'train_hard_examples' / 'localization.json')
                   .read_text())
  assert loc['method'] == 'cam' and loc['num_images'] == 8
  assert loc['num_boxes'] == sum(1 for _ in open(workdir / 'localize' / 'train_hard_examples' /
                                                 'records.jsonl'))
  assert 0.0 <= loc['mean']['mean_iou'] <= 1.0
  assert len(list((workdir / 'localize' / 'train_hard_examples' / 'overlays').glob('*.png'))) \
      == 2
  md = (workdir / 'report' / 'report.md').read_text()
  assert 'T(IoU)' in md and '| MA |' in md and '| MA stage 1 (set A) |' in md
  assert (workdir / 'report' / 'localization.csv').exists()

  # The comparison CLI puts this run next to a second one in Table 1's format.
  bsl = _ma_config('bsl', phantom_data_dir)
  bsl.stages = ('train_classifier', 'evaluate')
  stages.run(bsl, tmp_path / 'bsl')
  out = tmp_path / 'cmp'
  assert report.main([f'--workdirs={tmp_path / "bsl"},{workdir}', f'--out={out}']) == 0
  table = (out / 'comparison.md').read_text()
  assert '| BSL | MA |' in table.replace('**', '') or ('BSL' in table and 'MA' in table)
  assert 'Average' in table


def _tiny_predictor(tmp_path, head: str, pp: str) -> inference.Predictor:
  """A randomly initialised ResNet as a Predictor (no training: localisation plumbing only)."""
  model = build_model(ml_collections.ConfigDict(
      {'name': 'resnet18', 'width': 8, 'head': head,
       'replace_stride_with_dilation': (False, True, True)}), num_classes=14)
  variables = model.init(jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32))
  from cxr_jax.labels import NIH_CLASSES

  info = inference.ModelInfo(class_names=NIH_CLASSES, image_shape=(64, 64, 3), pp_eval=pp,
                             model={'name': 'resnet18', 'head': head})
  return inference.Predictor(tmp_path, 'train_classifier', model, variables, info,
                             inference.OperatingPoint(np.full(len(NIH_CLASSES), 0.5), 'scalar'))


@pytest.mark.parametrize('method', ['cam', 'grad_cam'])
def test_predicted_boxes_never_depend_on_ground_truth(phantom_data_dir, tmp_path, method):
  pp = 'decode|grayscale_to_rgb|normalize("imagenet")'
  predictor = _tiny_predictor(tmp_path, 'space_attention', pp)
  data = {'name': 'cxr_phantom/tiny', 'data_dir': phantom_data_dir}
  examples = list(pipeline.iterate_box_split(data, 'bbox', pp))
  cfg = config_lib.base_config().localize
  cfg.method = method
  cfg.num_overlays = 0
  settings = boxes_lib.BoxSettings.from_config(cfg.boxes)
  images = np.stack([ex['image'] for ex in examples])
  # The predictions from images alone ...
  _, _, alone = inference.predict_boxes(predictor, images, method=method, settings=settings)
  classes = list(predictor.class_names)

  def preds_of(exs):
    records = []
    for ex in exs:
      found = inference.predict_boxes(predictor, ex['image'][None], method=method,
                                      settings=settings)
      records += localize.match_records(ex, found[0][0], found[2][0], classes,
                                        predictor.thresholds)[0]
    return records

  with_truth = preds_of(examples)
  # ... equal those recorded next to the ground truth, and moving or shrinking every expert box
  # changes the scores but not one predicted box.
  moved = [{**ex, 'boxes': np.clip(ex['boxes'] * 0.5 + 0.1, 0, 1)} for ex in examples]
  with_moved = preds_of(moved)
  assert len(with_truth) == len(with_moved) == sum(len(ex['boxes']) for ex in examples) > 0
  index = {ex['image_id']: i for i, ex in enumerate(examples)}
  for a, b in zip(with_truth, with_moved, strict=True):
    assert a['pred'] == b['pred'] == [list(x) for x in
                                      alone[index[a['image_id']]][classes.index(a['class'])]]
  assert any(a['iou'] != b['iou'] for a, b in zip(with_truth, with_moved, strict=True))


def test_cam_of_the_space_attention_head_is_its_class_score_map(phantom_data_dir, tmp_path):
  pp = 'decode|grayscale_to_rgb|normalize("imagenet")'
  predictor = _tiny_predictor(tmp_path, 'space_attention', pp)
  x = np.zeros((2, 64, 64, 3), np.float32) + np.linspace(-1, 1, 64)[None, :, None, None]
  _, inter = predictor.forward(x)
  features = inference.find_sown(inter, 'features', ndim=4)
  sown = inference.find_sown(inter, 'class_scores', ndim=4)
  np.testing.assert_allclose(predictor.score_map_fn()(features), sown, rtol=1e-5, atol=1e-5)


def test_localize_on_the_real_nih_box_sample(shared_data, tmp_path):
  import tensorflow_datasets as tfds
  data_dir = str(tmp_path / 'tfds')
  tfds.builder('cxr_samples/nih_bbox-256', data_dir=data_dir).download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(shared_data / 'nih_bbox')))
  pp = 'decode|grayscale_to_rgb|resize(64)|normalize("imagenet")'
  predictor = _tiny_predictor(tmp_path, 'gap_dense', pp)
  data = {'name': 'cxr_samples/nih_bbox-256', 'data_dir': data_dir}
  cfg = config_lib.base_config().localize
  cfg.num_overlays = 1
  cfg.batch_size = 32
  run = layout.Run(tmp_path / 'loc')
  metrics = localize.localize_model(predictor, pipeline.iterate_box_split(data, 'bbox', pp),
                                    cfg, run, 'random ResNet')
  # Every radiologist box of the sample (590, 8 diseases) is scored, in the 64 px input frame.
  assert metrics['num_boxes'] == 590 and metrics['num_boxes_skipped'] == 0
  assert set(metrics['class_names']) == {'Atelectasis', 'Cardiomegaly', 'Effusion',
                                         'Infiltration', 'Mass', 'Nodule', 'Pneumonia',
                                         'Pneumothorax'}
  records = [json.loads(line) for line in run.records_file('train_classifier').open()]
  for r in records:
    x, y, w, h = r['gt']
    assert 0 <= x and 0 <= y and x + w <= 64 + 1e-4 and y + h <= 64 + 1e-4 and w > 0 and h > 0
  assert all(0.0 <= metrics['mean']['acc_iou'][t] <= 1.0 for t in ('0.1', '0.5', '0.7'))
  assert len(list(run.localize_overlays_dir('train_classifier').glob('*.png'))) == 1
