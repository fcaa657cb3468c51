"""Paper 003 end to end, tiny: the TB recipe on the synthetic phantom (train, evaluate,
activations, report, predict and the figure-set command) and on the team's real Montgomery /
Shenzhen samples (cross-validation report, the lung ROI from real masks, refusals)."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tb_config(arg):
  path = ROOT / 'configs' / 'tb' / 'custom_cnn.py'
  spec = importlib.util.spec_from_file_location('tb_custom_cnn', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _shrink(config, steps=3):
  config.model.widths = (4, 4, 8, 8, 8)
  config.model.hidden = 16
  config.batch_size = 8
  config.eval_batch_size = 8
  config.num_epochs = -1
  config.num_train_steps = steps
  config.log_every_steps = 1
  config.eval_every_steps = steps
  config.checkpoint_every_steps = steps
  config.activations.num_images = 1
  config.activations.num_filters = 2
  config.activations.steps = 2
  return config


def test_phantom_demo_end_to_end_with_predict_and_figure_set(phantom_data_dir, tmp_path):
  from cxr_jax import predict, stages
  from cxr_jax.inference import RunError, load_predictor
  from cxr_jax.inference import activations as act
  from cxr_jax.tools import activation_figures

  config = _shrink(_tb_config('demo'))
  config.data.name = 'cxr_phantom/tiny'
  config.data.data_dir = phantom_data_dir
  config.data.cache = False
  stages.run(config, tmp_path / 'run')
  report = tmp_path / 'run' / 'report'
  metrics = json.loads((report / 'metrics.json').read_text())
  for key in ('accuracy', 'auroc', 'sensitivity', 'specificity', 'f1'):
    assert key in metrics and key in metrics['ci'], key
  assert metrics['models']['tb_custom_cnn']['num_examples'] == 8
  text = (report / 'report.md').read_text()
  assert 'Accuracy' in text and 'Sensitivity' in text and '![ROC](roc.png)' in text
  assert (report / 'roc.png').stat().st_size > 0
  index = json.loads((tmp_path / 'run' / 'activations' / 'activations.json').read_text())
  entry = index['models']['tb_custom_cnn']
  assert (report / 'activations' / entry['filters']).exists()
  assert len(entry['images']) == 1
  # The model: softmax outputs, its layers, conv1's filters found by matching.
  predictor = load_predictor(tmp_path / 'run')
  assert predictor.info.output == 'softmax'
  assert act.map_layers(predictor)[:5] == ['conv1', 'conv2', 'conv3', 'conv4', 'conv5']
  assert act.conv_kernel(predictor, 'conv3').shape == (3, 3, 4, 8)
  with pytest.raises(RunError, match="--layer='fc9'.*valid layers: conv1, conv2"):
    act.check_layer(predictor, 'fc9')
  # A ROI model refuses a user's image (no mask), naming it and what to do.
  image = tmp_path / 'x.png'
  from PIL import Image
  Image.fromarray((np.random.default_rng(0).random((80, 70)) * 65535).astype(np.uint16)
                  ).save(image)
  with pytest.raises(RunError, match='lung ROIs.*--segmentation=UNET_RUN'):
    predict.run(str(tmp_path / 'run'), str(image), explain='activations', predictor=predictor,
                progress=False)
  # With lung masks (from paper 004's U-Net in use; a stand-in with known lungs here, the
  # Segmenter itself is tested in test_segmentation.py) the ROI is cut from them.
  class Lungs:
    workdir, stage = tmp_path / 'unet', 'train_segmenter'

    def masks(self, grey):
      m = np.zeros((*grey.shape, 3), bool)
      m[10:60, 5:30, 0] = m[10:60, 40:65, 1] = True
      return m

  record = predict.predict_image(predictor, str(image), str(tmp_path / 'roi' / 'x'),
                                 explain='activations', segmenter=Lungs())
  assert record['lung_roi']['stage'] == 'train_segmenter'
  assert abs(sum(record['probabilities'].values()) - 1.0) < 1e-5
  grey = np.asarray(Image.open(image), np.float32) / 65535.0
  cut = predictor.preprocess(grey, masks=Lungs().masks(grey))
  outside = np.full_like(grey, 0.5)  # only the lungs' box may matter
  outside[10:60, 5:65] = grey[10:60, 5:65]
  np.testing.assert_array_equal(cut, predictor.preprocess(outside, masks=Lungs().masks(grey)))
  # Without the ROI: predict's activations on a 16-bit PNG, and the figure-set command.
  config = _shrink(_tb_config('demo,roi=none'), steps=1)
  config.data.name, config.data.data_dir = 'cxr_phantom/tiny', phantom_data_dir
  config.stages = ('train_classifier',)
  stages.run(config, tmp_path / 'plain')
  assert predict.main(['predict', '--workdir', str(tmp_path / 'plain'), str(image),
                       '--explain=activations', '--layer=conv4', '--channel=9']) == 2
  out = tmp_path / 'pred'
  assert predict.main(['predict', '--workdir', str(tmp_path / 'plain'), str(image),
                       '--explain=activations', '--layer=conv4', '--channel=7',
                       f'--output={out}']) == 0
  dicom = ROOT.parent / 'shared' / 'data' / 'dicom' / 'RG1_UNCR.dcm'
  if dicom.exists():  # the team's DICOM sample (users' machines lack it)
    assert predict.main(['predict', '--workdir', str(tmp_path / 'plain'), str(dicom),
                         '--explain=activations', f'--output={out}']) == 0
    assert json.loads((out / 'RG1_UNCR.dcm.json').read_text())['image_meta']['format'] == 'dicom'
  record = json.loads((out / 'x.png.json').read_text())
  assert record['activations'] == {'layer': 'conv4', 'channel': 7}
  assert set(record['probabilities']) == {'normal', 'tb'}
  assert abs(sum(record['probabilities'].values()) - 1.0) < 1e-5
  figs = tmp_path / 'figs'
  assert activation_figures.main([str(image), f'--out={figs}', '--steps=2', '--num_filters=2',
                                  f'--run=A={tmp_path / "plain"}',
                                  f'--run=B={tmp_path / "plain"}', '--channels=3,']) == 0
  for name in ('fig2_filters', 'fig3_activations', 'fig4_heatmaps'):
    assert (figs / f'{name}.png').stat().st_size > 0


def _build(data_dir, config_name, folder, shared):
  import tensorflow_datasets as tfds

  import cxr_jax.data  # noqa: F401
  builder = tfds.builder(f'cxr_samples/{config_name}', data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(shared / folder)))
  return builder


def test_real_samples_cross_validation_and_lung_roi(shared_data, tmp_path):
  import tensorflow as tf

  from cxr_jax import stages
  from cxr_jax.data import pipeline

  data_dir = str(tmp_path / 'tfds')
  mont = _build(data_dir, 'montgomery_tb-256', 'montgomery_tb', shared_data)
  splits = {k: v.num_examples for k, v in mont.info.splits.items()}
  assert sum(splits.values()) == 48 and splits['test'] == 4
  shen = _build(data_dir, 'shenzhen_tb-256', 'shenzhen_tb', shared_data)
  # Shenzhen's real lung masks give the ROI crop.
  cfg = _tb_config('').data
  cfg.name, cfg.data_dir = 'cxr_samples/shenzhen_tb-256', data_dir
  cfg.pp_eval = 'lung_roi("crop")|resize(64)|clahe(0.01, 8)|grayscale_to_rgb'
  batch = next(iter(pipeline.make_eval_iter(cfg, 'train', global_batch_size=8)))
  assert batch['image'].shape == (8, 64, 64, 3) and batch['mask'].sum() == 5
  assert shen.info.features['lung_mask'].shape == (256, 256, 1)
  # Montgomery has none: the ROI refuses, naming an image and the option.
  cfg.name = 'cxr_samples/montgomery_tb-256'
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r'(?s)no lung mask for image.*MCUCXR_\d{4}_[01]\.png.*lung_roi'):
    next(iter(pipeline.make_eval_iter(cfg, 'test', global_batch_size=8)))
  # 3-fold cross-validation on the 48 real images (a tiny model, 2 steps per fold).
  config = _shrink(_tb_config('cv,roi=none'), steps=2)
  config.data.name, config.data.data_dir = 'cxr_samples/montgomery_tb-256', data_dir
  config.data.pp_train = config.data.pp_train.replace('resize(1024)', 'resize(128)')
  config.data.pp_eval = config.data.pp_eval.replace('resize(1024)', 'resize(128)')
  config.cv.folds = 3
  stages.run(config, tmp_path / 'cv')
  summary = json.loads((tmp_path / 'cv' / 'cv' / 'cv_summary.json').read_text())
  model = summary['models']['tb_custom_cnn']
  assert [f['num_examples'] for f in model['folds']] == [16, 16, 16]
  labels = json.loads((tmp_path / 'cv' / 'cv' / 'fold_0' / 'split_ids.json').read_text())
  fold0 = labels['splits']
  assert len(fold0['test']) == 16 and len(fold0['validation']) == 16
  assert sum('_1.png' in i for i in fold0['test']) == 8  # stratified: 8 TB of 16
  assert len(set(model['image_ids'])) == 48  # every image tested exactly once
  metrics = json.loads((tmp_path / 'cv' / 'report' / 'metrics.json').read_text())
  for key in ('accuracy', 'auroc', 'sensitivity', 'specificity'):
    assert key in metrics
  agg = metrics['cross_validation']['tb_custom_cnn']['aggregate']
  assert agg['accuracy']['n'] == 3 and len(agg['accuracy']['values']) == 3
  text = (tmp_path / 'cv' / 'report' / 'report.md').read_text()
  assert '3-fold cross-validation' in text and '±' in text and 'Pasa et al.' in text
  assert (tmp_path / 'cv' / 'report' / 'folds.csv').read_text().count('\n') == 4
