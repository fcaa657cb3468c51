"""Per-class operating points: chosen on validation by the evaluate stage, stored with the run,
applied to the test split, the report, `predict` and every Predictor."""

import json

import numpy as np
import pytest
from conftest import tiny_config
from PIL import Image

from cxr_jax import config_lib, inference, layout, metrics, predict, stages


@pytest.fixture(scope='module')
def per_class_run(phantom_data_dir, tmp_path_factory):
  config = tiny_config(phantom_data_dir)
  config.num_train_steps = 3
  config.threshold = 'per_class'
  config.threshold_rule = 'youden'
  config.stages = ('train_classifier', 'evaluate', 'report')
  config_lib.validate(config, stage_names=stages.STAGES)
  workdir = tmp_path_factory.mktemp('per_class')
  stages.run(config, workdir)
  return config, workdir


def test_thresholds_chosen_on_validation_and_applied_to_test(per_class_run):
  config, workdir = per_class_run
  run = layout.Run(workdir)
  saved = run.read_thresholds('train_classifier')
  assert saved['rule'] == 'youden' and saved['split'] == 'validation'
  classes = list(config.data.classes)
  assert sorted(saved['thresholds']) == sorted(classes)
  # The thresholds are Youden's on the validation predictions the stage wrote ...
  _, y_val, p_val = run.read_predictions('train_classifier', 'validation')
  np.testing.assert_allclose([saved['thresholds'][c] for c in classes],
                             metrics.youden_thresholds(y_val, p_val))
  # ... and the test metrics use them, with the scalar threshold's next to them.
  test = run.read_metrics('train_classifier', 'test')
  np.testing.assert_allclose(test['thresholds'], [saved['thresholds'][c] for c in classes])
  assert test['scalar_threshold']['threshold'] == 0.5
  _, y, p = run.read_predictions('train_classifier', 'test')
  assert test['scalar_threshold']['f1'] == pytest.approx(metrics.f1(y, p, 0.5))
  assert test['f1'] == pytest.approx(metrics.f1(y, p, np.asarray(test['thresholds'])))
  md = run.report_file('markdown').read_text()
  assert '## Operating points' in md and 'youden' in md and '(threshold 0.5)' in md
  assert run.report_file('thresholds').read_text().startswith('model,class,rule,split,threshold')


def test_predict_and_predictor_use_the_runs_thresholds(per_class_run, tmp_path):
  config, workdir = per_class_run
  saved = layout.Run(workdir).read_thresholds('train_classifier')
  predictor = inference.load_predictor(workdir)
  np.testing.assert_allclose(predictor.thresholds,
                             [saved['thresholds'][c] for c in config.data.classes])
  assert predictor.operating.source == 'per_class (youden on validation)'
  Image.fromarray(np.full((64, 64), 120, np.uint8)).save(tmp_path / 'x.png')
  assert predict.main(['predict', f'--workdir={workdir}', f'--output={tmp_path / "out"}',
                       '--explain=none', str(tmp_path / 'x.png')]) == 0
  record = json.loads((tmp_path / 'out' / 'x.png.json').read_text())
  assert record['thresholds'] == pytest.approx(saved['thresholds'])
  assert record['threshold_source'].startswith('per_class')
  assert set(record['findings']) == {c for c, q in record['probabilities'].items()
                                     if q > saved['thresholds'][c]}


def test_per_class_before_the_evaluate_stage_falls_back_to_half(per_class_run, tmp_path):
  _, workdir = per_class_run
  info = inference.read_model_info(layout.Run(workdir).stage_dir('train_classifier'))
  assert info.threshold == 'per_class'
  point = inference.operating_point(tmp_path, 'train_classifier', info)  # no evaluate output
  np.testing.assert_array_equal(point.thresholds, np.full(len(info.class_names), 0.5))
  assert 'run the evaluate stage' in point.source


@pytest.mark.parametrize('value, match', [
    ('per-class', "config.threshold='per-class': expected a probability in \\(0, 1\\) or "
                  "'per_class'"),
    (1.5, 'config.threshold=1.5'),
])
def test_bad_threshold_values(phantom_data_dir, value, match):
  config = tiny_config(phantom_data_dir)
  config.threshold = value
  with pytest.raises(ValueError, match=match):
    config_lib.validate(config)
  config = tiny_config(phantom_data_dir)
  config.threshold_rule = 'f2'
  with pytest.raises(ValueError, match="config.threshold_rule: 'f2'; valid"):
    config_lib.validate(config)
