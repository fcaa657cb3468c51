"""Tests for cxr_jax.evaluate (metrics dicts, checkpoint-metric selection) and the
classification report of cxr_jax.reporting written atomically by cxr_jax.io_utils."""

import json
import math
import os
import pathlib

import numpy as np
import pytest

from cxr_jax import evaluate as E
from cxr_jax import metrics as M
from cxr_jax import reporting
from cxr_jax.io_utils import atomic_write_files

REPORT_FILES = {'metrics': 'metrics.json', 'markdown': 'report.md', 'roc': 'roc.png',
                'confusion': 'confusion.png'}


def write_report(report_dir, results, y_true, y_prob, classes, title):
  """The classification report's files in report_dir, all or nothing (as the report stage)."""
  produced = reporting.classification_files(results, y_true, y_prob, classes, title)
  files = {os.path.join(report_dir, name): produced[kind] for kind, name in REPORT_FILES.items()}
  atomic_write_files(files)
  return {name: pathlib.Path(report_dir) / name for name in REPORT_FILES.values()}

CLASSES = ('Atelectasis', 'Cardiomegaly', 'Effusion', 'Hernia')


def _data(seed: int, n: int = 60, strength: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
  """[n, 4] labels whose last class (Hernia) has no positive, and probabilities."""
  rng = np.random.default_rng(seed)
  y = (rng.random((n, len(CLASSES))) < 0.3).astype(np.float32)
  y[0, :3], y[1, :3] = 1, 0
  y[:, 3] = 0
  p = 1 / (1 + np.exp(-(rng.normal(size=y.shape) + strength * (2 * y - 1))))
  return y, p


@pytest.fixture
def two_models():
  y, p_base = _data(0, strength=0.5)
  _, p_att = _data(1, strength=2.0)
  probs = {'Without Attention': p_base, 'Attention-guided': p_att}
  results = {name: E.compute_metrics(y, p, CLASSES) for name, p in probs.items()}
  return y, probs, results


def _strict_json(text: str):
  def reject(constant):
    raise ValueError(f'non-standard JSON constant {constant}')

  return json.loads(text, parse_constant=reject)


def test_compute_metrics_matches_metric_functions():
  y, p = _data(2)
  t = np.array([0.4, 0.5, 0.6, 0.5])
  m = E.compute_metrics(y, p, CLASSES, threshold=t)
  assert m['num_examples'] == 60 and m['num_classes'] == 4
  assert m['class_names'] == list(CLASSES)
  assert m['thresholds'] == pytest.approx(t.tolist())
  assert m['binary_accuracy'] == pytest.approx(M.binary_accuracy(y, p, t))
  assert m['f1_average'] == 'micro'
  assert m['f1'] == m['f1_micro'] == pytest.approx(M.f1(y, p, t, 'micro'))
  assert m['f1_macro'] == pytest.approx(M.f1(y, p, t, 'macro'))
  assert m['f1_samples'] == pytest.approx(M.f1(y, p, t, 'samples'))
  assert m['mae'] == pytest.approx(M.mae(y, p))
  mean, n_valid = M.mean_auroc(y, p)
  assert m['mean_auroc'] == pytest.approx(mean)
  assert m['n_valid_classes'] == n_valid == 3
  aurocs = M.per_class_auroc(y, p)
  for i, c in enumerate(CLASSES[:3]):
    assert m['auroc'][c] == pytest.approx(aurocs[i])
    assert m['per_class'][c]['auroc'] == pytest.approx(aurocs[i])
  # Hernia has no positive: AUROC undefined is None (strict JSON has no NaN).
  assert m['auroc']['Hernia'] is None
  scores = M.per_class_scores(y, p, t)
  cms = M.confusion_matrices(y, p, t)
  for i, c in enumerate(CLASSES):
    assert m['per_class'][c]['precision'] == pytest.approx(scores.precision[i])
    assert m['per_class'][c]['recall'] == pytest.approx(scores.recall[i])
    assert m['per_class'][c]['f1'] == pytest.approx(scores.f1[i])
    assert m['per_class'][c]['support'] == scores.support[i]
    assert m['confusion'][c] == cms[i].tolist()
  assert _strict_json(json.dumps(m, allow_nan=False)) == m


def test_compute_metrics_other_f1_default():
  y, p = _data(3)
  m = E.compute_metrics(y, p, CLASSES, f1_average='samples')
  assert m['f1'] == m['f1_samples'] and m['f1_average'] == 'samples'


def test_compute_metrics_validation():
  y, p = _data(3)
  with pytest.raises(ValueError, match='class_names must have K = 4 entries'):
    E.compute_metrics(y, p, CLASSES[:3])
  with pytest.raises(ValueError, match='class_names must be unique'):
    E.compute_metrics(y, p, ('a', 'a', 'b', 'c'))
  with pytest.raises(ValueError, match='f1_average must be one of'):
    E.compute_metrics(y, p, CLASSES, f1_average='weighted')
  with pytest.raises(ValueError, match=r'y_prob must have the shape of y_true'):
    E.compute_metrics(y, p[:, :3], CLASSES)


def test_select_metric_values_and_directions():
  y, p = _data(4)
  m = E.compute_metrics(y, p, CLASSES)
  assert E.select_metric(m, 'f1') == (m['f1'], True)
  assert E.select_metric(m, 'mean_auroc') == (m['mean_auroc'], True)
  assert E.select_metric(m, 'mae') == (m['mae'], False)
  assert E.select_metric(m, 'auroc/Effusion') == (m['auroc']['Effusion'], True)
  assert E.select_metric(m, 'per_class/Atelectasis/f1').value == m['per_class']['Atelectasis']['f1']
  value, higher = E.select_metric(m, 'auroc/Hernia')
  assert math.isnan(value) and higher
  names = E.metric_names(m)
  assert 'f1_macro' in names and 'auroc/Hernia' in names
  # Counts and settings are not selectable.
  assert not {'num_examples', 'n_valid_classes', 'per_class/Hernia/support'} & set(names)
  with pytest.raises(ValueError, match=r"Unknown metric 'auc'; available: .*mean_auroc.*"
                     r'auroc/<class>.*<class> in Atelectasis, Cardiomegaly, Effusion, Hernia'):
    E.select_metric(m, 'auc')
  for bad in ('num_examples', 'auroc/Mass', 'per_class/Hernia/support'):
    with pytest.raises(ValueError, match='Unknown metric'):
      E.select_metric(m, bad)


def test_select_metric_check_only():
  assert E.select_metric({}, 'f1', check_only=True).higher_is_better
  assert not E.select_metric({}, 'mae', check_only=True).higher_is_better
  assert E.select_metric({}, 'per_class/Mass/recall', check_only=True).higher_is_better
  assert math.isnan(E.select_metric({}, 'auroc/Mass', check_only=True).value)
  assert not E.select_metric({}, 'loss', check_only=True).higher_is_better
  for bad in ('val_loss', 'per_class/Mass/support', 'auroc/', 'f1/x'):
    with pytest.raises(ValueError, match=r'available: binary_accuracy, f1.*auroc/<class>'):
      E.select_metric({}, bad, check_only=True)


def test_is_improvement():
  assert E.is_improvement(0.5, None, True)
  assert E.is_improvement(0.6, 0.5, True) and not E.is_improvement(0.5, 0.5, True)
  assert E.is_improvement(0.1, 0.2, False) and not E.is_improvement(0.3, 0.2, False)
  # nan never wins, and a nan best (first evaluation undefined) does not block later ones.
  assert not E.is_improvement(float('nan'), None, True)
  assert E.is_improvement(0.1, float('nan'), True)
  assert E.MetricValue(0.4, False).is_better(0.5)


def _table(md: str, first_header: str) -> list[list[str]]:
  """Rows (cells) of the first markdown table after the header line starting with first_header."""
  lines = md.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith(f'| {first_header} |'))
  rows = []
  for line in lines[start:]:
    if not line.startswith('|'):
      break
    rows.append([cell.strip() for cell in line.strip('|').split('|')])
  assert set(''.join(rows[1])) <= set('-: ')
  return [rows[0], *rows[2:]]


def test_write_report_two_models(tmp_path, two_models):
  y, probs, results = two_models
  paths = write_report(tmp_path / 'report', results, y, probs, CLASSES, 'Paper 000')
  assert sorted(paths) == sorted(REPORT_FILES.values())
  for path in paths.values():
    assert path.is_file() and path.stat().st_size > 0
  assert not [f for f in os.listdir(tmp_path / 'report') if f.endswith('.tmp')]

  saved = _strict_json(paths['metrics.json'].read_text())
  assert saved['title'] == 'Paper 000' and saved['class_names'] == list(CLASSES)
  assert saved['models'] == results
  assert list(saved['models']) == ['Without Attention', 'Attention-guided']

  md = paths['report.md'].read_text()
  assert md.startswith('# Paper 000\n')
  table2 = _table(md, 'Model')
  assert table2[0] == ['Model', 'Binary Accuracy', 'F1-Score', 'Average AUC', 'MAE']
  assert [row[0] for row in table2[1:]] == list(results)
  for row, m in zip(table2[1:], results.values(), strict=True):
    expected = [m['binary_accuracy'], m['f1'], m['mean_auroc'], m['mae']]
    assert [float(x) for x in row[1:]] == pytest.approx(expected, abs=5e-4)

  auroc = _table(md, 'Class')
  assert auroc[0] == ['Class', *results]
  assert [row[0] for row in auroc[1:]] == [*CLASSES, '**Mean**']
  for j, m in enumerate(results.values(), start=1):
    for row, c in zip(auroc[1:4], CLASSES[:3], strict=True):
      assert float(row[j]) == pytest.approx(m['auroc'][c], abs=5e-4)
    assert auroc[4][j] == 'n/a'
    assert float(auroc[5][j].strip('*')) == pytest.approx(m['mean_auroc'], abs=5e-4)

  # One confusion table per model: TN FP FN TP per class, as Fig. 4.
  for name, m in results.items():
    section = md[md.index(f'### {name}'):]
    table = _table(section, 'Class')
    assert table[0][:5] == ['Class', 'TN', 'FP', 'FN', 'TP']
    for row, c in zip(table[1:], CLASSES, strict=True):
      (tn, fp), (fn, tp) = m['confusion'][c]
      assert row[0] == c and [int(x) for x in row[1:5]] == [tn, fp, fn, tp]

  for name in ('roc.png', 'confusion.png'):
    assert paths[name].read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_write_report_single_model_per_model_labels(tmp_path):
  y, p = _data(5, n=40)
  t = M.best_thresholds(y, p)
  results = {'MobileNet': E.compute_metrics(y, p, CLASSES, threshold=t)}
  paths = write_report(tmp_path, results, {'MobileNet': y}, {'MobileNet': p}, CLASSES, 'One')
  md = paths['report.md'].read_text()
  assert len(_table(md, 'Model')) == 2
  assert 'threshold per class (' in md


def test_write_report_argument_checks(tmp_path, two_models):
  y, probs, results = two_models
  with pytest.raises(ValueError, match='y_prob_by_model must have the models of results'):
    write_report(tmp_path, results, y, {'Attention-guided': probs['Attention-guided']},
                   CLASSES, 't')
  with pytest.raises(ValueError, match='is for classes'):
    write_report(tmp_path, results, y, probs, ('a', 'b', 'c', 'd'), 't')
  with pytest.raises(ValueError, match='at least one model'):
    write_report(tmp_path, {}, y, {}, CLASSES, 't')


def test_write_report_failure_keeps_previous_report(tmp_path, two_models, monkeypatch):
  y, probs, results = two_models
  write_report(tmp_path, results, y, probs, CLASSES, 'First')
  before = {name: (tmp_path / name).read_bytes() for name in REPORT_FILES.values()}

  def broken_plot(*args, **kwargs):
    raise RuntimeError('plotting failed')

  monkeypatch.setattr(reporting, 'plot_roc', broken_plot)
  other = {name: E.compute_metrics(y, 1 - p, CLASSES) for name, p in probs.items()}
  with pytest.raises(RuntimeError, match='plotting failed'):
    write_report(tmp_path, other, y, probs, CLASSES, 'Second')
  # Neither the files produced before the failure (json, md) nor later ones were replaced.
  assert {name: (tmp_path / name).read_bytes() for name in REPORT_FILES.values()} == before
  assert sorted(os.listdir(tmp_path)) == sorted(REPORT_FILES.values())
