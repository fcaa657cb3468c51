"""`python -m cxr_jax.report`: comparison of finished runs, on fake workdirs (no training)."""

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cxr_jax import evaluate, report, reporting
from cxr_jax.explain import localization
from cxr_jax.io_utils import atomic_write_json

# Not alphabetical: the metrics files are written with sorted keys, the tables keep this order.
CLASSES = ('Mass', 'Atelectasis', 'Effusion', 'Cardiomegaly')


def _metrics(seed: int, classes=CLASSES, n: int = 40, constant: str | None = None) -> dict:
  """compute_metrics on random labels / probabilities; `constant` class gets one label only."""
  rng = np.random.default_rng(seed)
  y_true = (rng.random((n, len(classes))) < 0.4).astype(np.int32)
  y_true[:2] = [[0] * len(classes), [1] * len(classes)]  # both labels in every class
  if constant is not None:
    y_true[:, classes.index(constant)] = 0  # AUROC undefined
  y_prob = np.clip(0.3 * y_true + 0.7 * rng.random(y_true.shape), 0, 1)
  return evaluate.compute_metrics(y_true, y_prob, classes)


def _run(root: Path, name: str, models, split: str = 'test') -> str:
  """A fake workdir: config.json with report_models, evaluate/<stage>/metrics_<split>.json."""
  workdir = root / name
  atomic_write_json(str(workdir / 'config.json'),
                    {'name': name, 'report_models': [[stage, label] for stage, label, _ in models]})
  for stage, _, metrics in models:
    atomic_write_json(str(workdir / 'evaluate' / stage / f'metrics_{split}.json'), metrics)
  return str(workdir)


@pytest.fixture
def runs(tmp_path) -> dict[str, str]:
  """The four paper 001 ablation runs; each has the ResNet baseline stage before its own."""
  out = {}
  for i, (name, label) in enumerate([('bsl', 'BSL'), ('bsl_fam', 'BSL+FAM'),
                                     ('bsl_fam_sam', 'BSL+FAM+SAM'), ('ma', 'MA')]):
    models = [('train_classifier', 'Baseline', _metrics(100 + i))]
    if name != 'bsl':
      models.append(('train_attention', label, _metrics(i)))
    else:
      models = [('train_classifier', label, _metrics(i))]
    out[name] = _run(tmp_path, name, models)
  return out


def _main(capsys, *argv: str) -> tuple[int, str, str]:
  code = report.main(list(argv))
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def _table(markdown: str, heading: str) -> list[list[str]]:
  """Cells of the first Markdown table after the line starting with `heading`."""
  lines = markdown.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith(heading))
  rows = []
  for line in lines[start + 1:]:
    if line.startswith('|'):
      rows.append([cell.strip() for cell in line.strip('|').split('|')])
    elif rows:
      break
  return [rows[0]] + rows[2:]  # drop the alignment rule


def _number(cell: str) -> float | None:
  cell = cell.strip('*')
  return None if cell in (report.MISSING, report.UNDEFINED) else float(cell)


# ------------------------------------------------------------------------------ columns
def test_default_columns_are_each_runs_last_model(runs, capsys):
  code, out, err = _main(capsys, f'--workdirs={",".join(runs.values())}')
  assert code == 0, err
  table = _table(out, '## Table 1')
  assert table[0] == ['Class', 'BSL', 'BSL+FAM', 'BSL+FAM+SAM', 'MA']
  assert [row[0] for row in table[1:]] == [*CLASSES, 'Average']
  ma = json.loads((Path(runs['ma']) / 'evaluate/train_attention/metrics_test.json').read_text())
  for row in table[1:-1]:
    assert _number(row[4]) == pytest.approx(ma['auroc'][row[0]], abs=5e-5)
    assert len(row[4].strip('*').split('.')[1]) == 4  # 4 decimals, as Table 1


def test_labels_override_and_all_models(runs, capsys):
  workdirs = ','.join([runs['bsl'], runs['ma']])
  code, out, _ = _main(capsys, f'--workdirs={workdirs}', '--labels=Baseline R101,Multi-attention')
  assert code == 0
  assert _table(out, '## Table 1')[0] == ['Class', 'Baseline R101', 'Multi-attention']

  code, out, _ = _main(capsys, f'--workdirs={workdirs}', '--all-models')
  assert code == 0
  assert _table(out, '## Table 1')[0] == ['Class', 'bsl: BSL', 'ma: Baseline', 'ma: MA']
  # --all-models with one label per workdir names the runs.
  code, out, _ = _main(capsys, f'--workdirs={workdirs}', '--all-models', '--labels=R,M')
  assert code == 0
  assert _table(out, '## Table 1')[0] == ['Class', 'R: BSL', 'M: Baseline', 'M: MA']
  columns = report.load_columns([runs['bsl'], runs['ma']], all_models=True)
  assert [(c.stage, c.model_label) for c in columns] == [
      ('train_classifier', 'BSL'), ('train_classifier', 'Baseline'), ('train_attention', 'MA')]


def test_colliding_labels_fall_back_to_workdir_names(tmp_path, capsys):
  a = _run(tmp_path / 'x', 'seed0', [('train', 'MA', _metrics(0))])
  b = _run(tmp_path / 'x', 'seed1', [('train', 'MA', _metrics(1))])
  c = _run(tmp_path / 'y', 'seed1', [('train', 'MA', _metrics(2))])
  d = _run(tmp_path, 'other', [('train', 'BSL', _metrics(3))])
  columns = report.load_columns([a, b, d])
  assert [col.label for col in columns] == ['seed0', 'seed1', 'BSL']
  # Same folder name too: the path tells them apart.
  columns = report.load_columns([b, c])
  assert [col.label for col in columns] == [os.path.normpath(b), os.path.normpath(c)]
  # The same run twice still gives distinct columns.
  assert [col.label for col in report.load_columns([d, d])] == ['BSL (1)', 'BSL (2)']


# ------------------------------------------------------------------------------ table 1
def test_average_is_mean_auroc_and_best_is_bold(runs, capsys):
  code, out, _ = _main(capsys, f'--workdirs={",".join(runs.values())}')
  assert code == 0
  table = _table(out, '## Table 1')
  columns = report.load_columns(list(runs.values()))
  average = table[-1]
  for j, col in enumerate(columns, start=1):
    assert _number(average[j]) == pytest.approx(col.metrics['mean_auroc'], abs=5e-5)
    shown = [_number(row[j]) for row in table[1:-1]]
    assert _number(average[j]) == pytest.approx(np.mean(shown), abs=1e-4)
  for row in table[1:]:
    values = [_number(cell) for cell in row[1:]]
    bold = [cell.startswith('**') for cell in row[1:]]
    assert bold == [v == max(values) for v in values], row
  summary = _table(out, '## Summary metrics')
  assert [row[0] for row in summary[1:]] == ['F1 (micro)', 'Binary accuracy']
  for row, key in zip(summary[1:], ('f1', 'binary_accuracy'), strict=True):
    assert [_number(cell) for cell in row[1:]] == pytest.approx(
        [c.metrics[key] for c in columns], abs=5e-5)


def test_ties_are_all_bold_and_single_column_is_plain(tmp_path, capsys):
  same = _metrics(0)
  a = _run(tmp_path, 'a', [('train', 'A', same)])
  b = _run(tmp_path, 'b', [('train', 'B', same)])
  code, out, _ = _main(capsys, f'--workdirs={a},{b}')
  assert code == 0
  for row in _table(out, '## Table 1')[1:]:
    assert all(cell.startswith('**') for cell in row[1:]), row
  code, out, _ = _main(capsys, f'--workdirs={a}')
  assert '**' not in ''.join(sum(_table(out, '## Table 1'), []))


def test_missing_class_and_undefined_auroc(tmp_path, capsys):
  a = _run(tmp_path, 'a', [('train', 'A', _metrics(0, constant='Mass'))])
  b = _run(tmp_path, 'b', [('train', 'B', _metrics(1, classes=('Effusion', 'Mass', 'Hernia')))])
  code, out, _ = _main(capsys, f'--workdirs={a},{b}')
  assert code == 0, out
  table = {row[0]: row[1:] for row in _table(out, '## Table 1')[1:]}
  assert list(table) == [*CLASSES, 'Hernia', 'Average']  # first run's order, then newcomers
  assert table['Atelectasis'][1] == report.MISSING and table['Hernia'][0] == report.MISSING
  assert table['Mass'][0] == report.UNDEFINED
  assert not table['Mass'][1].startswith('**')  # nothing to compare with: plain
  a_metrics = report.load_run(a)[0].metrics
  assert a_metrics['n_valid_classes'] == 3
  assert _number(table['Average'][0]) == pytest.approx(a_metrics['mean_auroc'], abs=5e-5)


# ------------------------------------------------------------------------------ files
def test_out_writes_files_and_csv_round_trips(runs, tmp_path, capsys):
  out_dir = tmp_path / 'reports' / 'multi_attention'
  code, out, err = _main(capsys, f'--workdirs={",".join(runs.values())}', f'--out={out_dir}')
  assert code == 0, err
  assert (out_dir / 'comparison.md').read_text() == out
  assert not (out_dir / 'localization.csv').exists()
  assert sorted(p.name for p in out_dir.iterdir()) == ['comparison.csv', 'comparison.md']
  rows = list(csv.DictReader(io.StringIO((out_dir / 'comparison.csv').read_text())))
  assert list(rows[0]) == list(report.CSV_HEADER)
  columns = report.load_columns(list(runs.values()))
  for col in columns:
    mine = {(r['class'], r['metric']): r['value'] for r in rows if r['run'] == col.label}
    for c, value in col.metrics['auroc'].items():
      assert float(mine[(c, 'auroc')]) == value  # exact: floats written at full precision
    for name in report.SUMMARY_CSV_METRICS:
      assert float(mine[('', name)]) == col.metrics[name]
  assert len(rows) == len(columns) * (len(CLASSES) + len(report.SUMMARY_CSV_METRICS))


def test_csv_undefined_is_empty(tmp_path):
  a = _run(tmp_path, 'a', [('train', 'A', _metrics(0, constant='Mass'))])
  rows = list(csv.DictReader(io.StringIO(report.comparison_csv(report.load_columns([a])))))
  assert [r['value'] for r in rows if r['class'] == 'Mass'] == ['']


def test_failed_run_leaves_previous_comparison_untouched(runs, tmp_path, capsys, monkeypatch):
  out_dir = tmp_path / 'out'
  out_dir.mkdir()
  for name in ('comparison.md', 'comparison.csv', 'localization.csv'):
    (out_dir / name).write_text(f'old {name}\n')
  code, _, err = _main(capsys, f'--workdirs={runs["bsl"]},{tmp_path / "nope"}', f'--out={out_dir}')
  assert code == 2 and 'nope' in err
  # A failure while producing the files (after the tables) does not write either.
  monkeypatch.setattr(report, 'comparison_csv', lambda columns: 1 / 0)
  with pytest.raises(ZeroDivisionError):
    report.main([f'--workdirs={runs["bsl"]}', f'--out={out_dir}'])
  for name in ('comparison.md', 'comparison.csv', 'localization.csv'):
    assert (out_dir / name).read_text() == f'old {name}\n'
  assert sorted(p.name for p in out_dir.iterdir()) == [
      'comparison.csv', 'comparison.md', 'localization.csv']  # no temp files left
  # A successful run replaces them; with no localisation, a stale localization.csv goes.
  monkeypatch.undo()
  assert report.main([f'--workdirs={runs["bsl"]}', f'--out={out_dir}']) == 0
  assert (out_dir / 'comparison.md').read_text().startswith('# Comparison on the test split')
  assert not (out_dir / 'localization.csv').exists()


def test_localization_tables(runs, tmp_path, capsys):
  records = [
      {'image_id': 'a.png', 'class': 'Mass', 'gt': (10, 10, 20, 20), 'pred': [(12, 12, 20, 20)],
       'prob': 0.9, 'predicted': True},
      {'image_id': 'b.png', 'class': 'Effusion', 'gt': (0, 0, 30, 10), 'pred': [],
       'prob': 0.2, 'predicted': False},
  ]
  results = localization.localization_metrics(records, CLASSES)
  loc = {**results, 'method': 'cam', 'boxes': {'threshold': 0.5}}
  atomic_write_json(str(Path(runs['ma']) / 'localize/train_attention/localization.json'), loc)
  # Another stage's results are not this column's.
  atomic_write_json(str(Path(runs['bsl_fam']) / 'localize/train_classifier/localization.json'),
                    loc)
  out_dir = tmp_path / 'out'
  code, out, err = _main(capsys, f'--workdirs={runs["bsl_fam"]},{runs["ma"]}', f'--out={out_dir}')
  assert code == 0, err
  loaded = json.loads(json.dumps(loc))  # as read back: tuples become lists
  assert reporting.localization_markdown({'MA': loaded}).rstrip('\n') in out
  assert 'No localisation results for: BSL+FAM.' in out
  assert (out_dir / 'localization.csv').read_text() == reporting.localization_csv({'MA': loaded})


# ------------------------------------------------------------------------------ errors
def _error(capsys, *argv: str) -> str:
  code, out, err = _main(capsys, *argv)
  assert code == 2, (out, err)
  assert out == '' and 'Traceback' not in err
  assert err.startswith('error: ') and err.count('\n') == 1, err
  return err


def test_errors_exit_2_with_one_line_naming_the_file(runs, tmp_path, capsys):
  missing = tmp_path / 'missing_run'
  assert str(missing) in _error(capsys, f'--workdirs={runs["bsl"]},{missing}')

  no_config = tmp_path / 'no_config'
  no_config.mkdir()
  assert str(no_config / 'config.json') in _error(capsys, f'--workdirs={no_config}')

  (Path(runs['ma']) / 'evaluate/train_attention/metrics_test.json').unlink()
  err = _error(capsys, f'--workdirs={runs["ma"]}')
  assert str(Path(runs['ma']) / 'evaluate/train_attention/metrics_test.json') in err
  assert "'train_attention'" in err and 'python -m cxr_jax.main' in err
  assert '--stages=evaluate' in err
  # Only the stages a column needs are read; --all-models needs the others too.
  bsl_fam = Path(runs['bsl_fam'])
  (bsl_fam / 'evaluate/train_classifier/metrics_test.json').unlink()
  assert _main(capsys, f'--workdirs={bsl_fam}')[0] == 0
  assert "'train_classifier'" in _error(capsys, f'--workdirs={bsl_fam}', '--all-models')
  # Another split is looked up by its name.
  assert 'metrics_validation.json' in _error(capsys, f'--workdirs={runs["bsl"]}',
                                             '--split=validation')

  bad = Path(runs['bsl_fam_sam'])
  (bad / 'config.json').write_text('{"report_models": [["train"')
  err = _error(capsys, f'--workdirs={bad}')
  assert str(bad / 'config.json') in err and 'malformed JSON' in err
  (bad / 'config.json').write_text('{"name": "x"}')
  assert 'report_models' in _error(capsys, f'--workdirs={bad}')

  metrics_path = Path(runs['bsl']) / 'evaluate/train_classifier/metrics_test.json'
  metrics_path.write_text('not json')
  err = _error(capsys, f'--workdirs={runs["bsl"]}')
  assert str(metrics_path) in err and 'malformed JSON' in err
  metrics_path.write_text('{"auroc": {}}')
  assert 'mean_auroc' in _error(capsys, f'--workdirs={runs["bsl"]}')


def test_usage_errors_exit_2(runs, capsys):
  two = f'--workdirs={runs["bsl_fam"]},{runs["ma"]}'
  err = _error(capsys, two, '--labels=A,B,C')
  assert '3 label(s)' in err and 'one per column (2' in err
  assert 'unique' in _error(capsys, two, '--labels=A,A')
  assert 'empty label' in _error(capsys, two, '--labels=A,')
  assert '--workdirs' in _error(capsys, '--workdirs=')
  assert '--workdirs' in _error(capsys, '--workdirs=,')
  not_a_folder = Path(runs['ma']) / 'config.json'
  assert str(not_a_folder) in _error(capsys, two, f'--out={not_a_folder}')
  assert report.main([]) == 2  # argparse: --workdirs is required
  assert report.main(['--help']) == 0


def test_module_entry_point(runs):
  env = {**os.environ, 'PYTHONPATH': str(Path(report.__file__).resolve().parents[1])}
  proc = subprocess.run([sys.executable, '-m', 'cxr_jax.report', f'--workdirs={runs["ma"]}'],
                        capture_output=True, text=True, env=env, check=False)
  assert proc.returncode == 0, proc.stderr
  assert '| Class | MA |' in proc.stdout
  proc = subprocess.run([sys.executable, '-m', 'cxr_jax.report', '--workdirs=/no/such/run'],
                        capture_output=True, text=True, env=env, check=False)
  assert proc.returncode == 2 and proc.stderr.strip().startswith('error: /no/such/run')
  assert 'Traceback' not in proc.stderr
