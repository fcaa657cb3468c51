r"""Compare finished runs side by side: paper 001's Table 1 (per-class AUROC) across workdirs.

  python -m cxr_jax.report \
      --workdirs=workdir/bsl,workdir/bsl_fam,workdir/bsl_fam_sam,workdir/ma \
      [--labels=BSL,BSL+FAM,BSL+FAM+SAM,MA] [--split=test] [--out=reports/multi_attention] \
      [--all-models] [--reference=paper004]

Each workdir is a run of `python -m cxr_jax.main` whose `evaluate` stage has finished: the
metrics of a model are those its evaluate stage wrote for the split (file layout:
cxr_jax/layout.py), for the stages of the run's saved config's `report_models` ([[stage,
label], ...]). By default a run
contributes one column, its LAST report_models entry (the method's own model; earlier entries
are its baselines); --all-models gives one column per entry, labelled
'<workdir label>: <model label>' (workdir label = the workdir's folder name).

Column labels default to the model labels of report_models (e.g. 'MA'); columns that would
share one are labelled by their workdir's folder name instead. --labels overrides them: one
label per column or, with --all-models, one per workdir (used as the workdir label).

Printed to stdout (Markdown):
- Table 1: one row per class (the union of the runs' classes, in the first run's order; '—'
  where a run lacks the class, 'n/a' where its AUROC is undefined), one column per model,
  AUROC to 4 decimals, then 'Average' (the run's mean_auroc: mean over its classes with a
  defined AUROC). The best value of each row is bold (ties: all bold).
- Summary metrics in a second table: F1 and binary accuracy at the models' thresholds.
- Localisation tables (`cxr_jax.reporting.localization_markdown`) for the columns whose
  localize stage ran, after paper 002's Table 4 (AUROC on the eight box classes and their
  mean) when any column has them.

--reference=paper004 appends paper 004's published Table 2 (AUROC of DCNN, CheXNet, Ours w/o
F_l, Ours) beside our columns and its Table 3 (mean CAM IoU of FE, FE w/o MA; the means of its
rows and those of its text) beside our localisation results.

With --out=DIR, also written (all or nothing, after everything has been computed):
- DIR/roc.png: per-class ROC curves of every column on the split (paper 004's Fig. 3), from the
  predictions the evaluate stages wrote;
- DIR/comparison.md: the Markdown above;
- DIR/comparison.csv: long format, header run,class,metric,value: one 'auroc' row per (run,
  class) and one row per summary metric (class empty; metrics of evaluate.SCALAR_METRICS and
  num_examples); an undefined value is an empty cell; floats at full precision;
- DIR/localization.csv (`reporting.localization_csv`) when some column has localisation results;
  a stale one from an earlier comparison is removed otherwise, so that DIR is consistent.

Exit status: 0 done; 2 usage errors (one line on stderr naming the file and what was expected):
missing workdir, saved config or metrics file, malformed JSON, wrong --labels count, an --out
that is no writable folder; 1 the disk filled up or failed while writing (nothing replaced).
"""

import argparse
import csv
import dataclasses
import errno
import io
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cxr_jax import evaluate, layout, reporting
from cxr_jax.io_utils import atomic_write_files

CSV_HEADER = ('run', 'class', 'metric', 'value')
SUMMARY_CSV_METRICS = (*evaluate.SCALAR_METRICS, 'num_examples')
MISSING = '—'  # a class the run's data set does not have
UNDEFINED = 'n/a'  # the class is there but its AUROC is undefined (one label value only)
# Keys `load_run` needs in a metrics file: what the tables read.
_REQUIRED_METRICS = ('auroc', 'mean_auroc', 'f1', 'binary_accuracy')
_DIGITS = 4  # paper 001 Table 1 reports AUROC to 4 decimals


class ReportError(ValueError):
  """A bad invocation or a missing / malformed input file: exit status 2, one line."""


@dataclasses.dataclass(frozen=True)
class Column:
  """One model of one run: a column of the comparison.

  Attributes:
    label: the column heading (unique among the columns of a comparison).
    workdir: the run folder, as given.
    run_label: the run's label (its folder name unless --labels names the runs).
    stage: the report_models stage whose metrics these are.
    model_label: the stage's label in the run's report_models.
    metrics: the `evaluate.compute_metrics` dict read from `metrics_path`.
    metrics_path: where `metrics` was read from.
    localization: the run's localisation results for this stage, or None if it has none.
  """

  label: str
  workdir: str
  run_label: str
  stage: str
  model_label: str
  metrics: Mapping[str, Any]
  metrics_path: str
  localization: Mapping[str, Any] | None = None

  @property
  def classes(self) -> list[str]:
    """The run's class names in its column order: 'class_names' (the metrics JSON files are
    written with sorted keys, so the 'auroc' dict's order is alphabetical)."""
    names = self.metrics.get('class_names')
    return list(names) if isinstance(names, list) else list(self.metrics['auroc'])


# ------------------------------------------------------------------------------ loading
def _read_json(path: Path, what: str) -> Any:
  """Parses a JSON file; every failure becomes a one-line ReportError naming the file."""
  try:
    text = path.read_text(encoding='utf-8')
  except FileNotFoundError:
    raise ReportError(f'{path}: not found; expected {what}.') from None
  except (OSError, UnicodeDecodeError) as e:
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    raise ReportError(f'{path}: cannot read it ({reason}); expected {what}.') from None
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ReportError(f'{path}: malformed JSON ({e}); expected {what}.') from None


def _report_models(config: Any, path: Path) -> list[tuple[str, str]]:
  """The saved config's report_models as [(stage, label)], checked."""
  entries = config.get('report_models') if isinstance(config, dict) else None
  ok = isinstance(entries, list) and entries and all(
      isinstance(e, list) and len(e) == 2 and all(isinstance(s, str) and s for s in e)
      for e in entries)
  if not ok:
    raise ReportError(f'{path}: expected a run config with report_models = [[stage, label], '
                      f'...] (non-empty), got {entries!r}.')
  return [(stage, label) for stage, label in entries]


def _check_metrics(metrics: Any, path: Path) -> None:
  """Checks that a metrics file holds what the tables read (else a one-line ReportError)."""
  expected = ('expected a metrics dict from cxr_jax.evaluate.compute_metrics with '
              + ', '.join(_REQUIRED_METRICS))
  if not isinstance(metrics, dict):
    raise ReportError(f'{path}: {expected}; got a JSON {type(metrics).__name__}.')
  missing = [k for k in _REQUIRED_METRICS if k not in metrics]
  if missing:
    raise ReportError(f'{path}: {expected}; missing {", ".join(missing)}.')
  if not isinstance(metrics['auroc'], dict):
    raise ReportError(f'{path}: {expected}; auroc is not a {{class: value}} object.')
  values = {f'auroc/{c}': v for c, v in metrics['auroc'].items()}
  values.update({k: metrics[k] for k in _REQUIRED_METRICS[1:]})
  bad = [k for k, v in values.items()
         if v is not None and (isinstance(v, bool) or not isinstance(v, int | float))]
  if bad:
    raise ReportError(f'{path}: {expected}; not numbers: {", ".join(bad)}.')


def load_run(workdir: str | os.PathLike[str], split: str = 'test',
             all_models: bool = False) -> list[Column]:
  """The columns one run contributes: its last report_models entry, or all of them.

  Args:
    workdir: a run folder of `python -m cxr_jax.main` (its config and evaluate stage).
    split: the eval split name.
    all_models: one column per report_models entry instead of the last one only.

  Returns:
    Columns labelled by their model label (all_models: '<folder name>: <model label>'); see
    `assign_labels` for collisions and overrides.

  Raises:
    ReportError: a missing workdir, saved config or metrics file, or malformed JSON.
  """
  root = Path(workdir)
  if not root.is_dir():
    raise ReportError(f'{root}: no such run folder; expected a workdir of python -m cxr_jax.main.')
  run = layout.Run(root)
  config_path = Path(run.config_file)
  if not config_path.is_file():
    raise ReportError(f'{config_path}: not found; expected the config that '
                      f'python -m cxr_jax.main writes into its workdir.')
  config = _read_json(config_path, 'the run config (JSON object)')
  if isinstance(config, dict) and not config.get('report_models') and isinstance(
      config.get('data'), dict) and config['data'].get('target') == 'masks':
    raise ReportError(f'{root}: a segmentation run (U-Net, config.data.target=\'masks\'), not a '
                      f'classifier; its Dice and Jaccard are in {run.report_dir}/metrics.json. '
                      'Compare classifier runs here.')
  entries = _report_models(config, config_path)
  if not all_models:
    entries = entries[-1:]  # the method's own model; earlier entries are its baselines
  run_label = _basename(workdir)
  columns = []
  for stage, model_label in entries:
    path = Path(run.metrics_file(stage, split))
    if not path.is_file():
      raise ReportError(
          f'{path}: not found; expected the {split!r} metrics of stage {stage!r}; '
          f'`python -m cxr_jax.main --config=CONFIG --workdir={workdir} --stages=evaluate` '
          f'makes it.')
    metrics = _read_json(path, f'the {split!r} metrics of stage {stage!r}')
    _check_metrics(metrics, path)
    loc_path = Path(run.localization_file(stage))
    localization = None
    if loc_path.exists():
      localization = _read_json(loc_path, f'the localisation results of stage {stage!r}')
      if not isinstance(localization, dict):
        raise ReportError(f'{loc_path}: expected a JSON object from '
                          f'localization.localization_metrics.')
    label = f'{run_label}: {model_label}' if all_models else model_label
    columns.append(Column(label=label, workdir=str(workdir), run_label=run_label, stage=stage,
                          model_label=model_label, metrics=metrics, metrics_path=str(path),
                          localization=localization))
  return columns


def _basename(workdir: str | os.PathLike[str]) -> str:
  return os.path.basename(os.path.normpath(os.fspath(workdir))) or os.fspath(workdir)


def _dedupe(labels: Sequence[str], fallbacks: Sequence[Sequence[str]]) -> list[str]:
  """Unique labels: each group of equal labels takes the first fallback that tells its members
  apart (and clashes with no other label), else is numbered 'label (1)', 'label (2)', ...

  Args:
    labels: N labels.
    fallbacks: lists of N alternatives each, in order of preference.
  """
  out = list(labels)
  for label in dict.fromkeys(labels):
    group = [i for i, lab in enumerate(labels) if lab == label]
    if len(group) == 1:
      continue
    others = {lab for i, lab in enumerate(out) if i not in group}
    for options in fallbacks:
      alts = [options[i] for i in group]
      if len(set(alts)) == len(alts) and not others & set(alts):
        break
    else:  # the same run given twice: still tell the columns apart
      alts = [f'{label} ({n})' for n in range(1, len(group) + 1)]
    for i, alt in zip(group, alts, strict=True):
      out[i] = alt
  return out


def assign_labels(columns: Sequence[Column], labels: Sequence[str] | None = None,
                  all_models: bool = False) -> list[Column]:
  """Final, unique column labels.

  Args:
    columns: from `load_run`, runs in order.
    labels: --labels: one per column, or (all_models) one per run, used as the run label
      ('<label>: <model label>'); per column wins where both counts agree. None: defaults
      (model labels; colliding ones become the workdir's folder name, then its path).
    all_models: whether the columns came from `load_run(..., all_models=True)`.

  Raises:
    ReportError: a wrong number of labels, or empty / repeated ones.
  """
  columns = list(columns)
  if labels is not None:
    labels = list(labels)
    runs = list(dict.fromkeys(c.workdir for c in columns))  # the runs, in order
    n_runs = len(runs)
    if any(not lab for lab in labels):
      raise ReportError(f'--labels: empty label in {",".join(labels)!r}.')
    if len(labels) == len(columns):
      new = labels
    elif all_models and len(labels) == n_runs:
      by_run = dict(zip(runs, labels, strict=True))
      new = [f'{by_run[c.workdir]}: {c.model_label}' for c in columns]
      columns = [dataclasses.replace(c, run_label=by_run[c.workdir]) for c in columns]
    else:
      per_run = f' or one per workdir ({n_runs})' if all_models else ''
      raise ReportError(f'--labels: got {len(labels)} label(s) ({",".join(labels)}); expected '
                        f'one per column ({len(columns)}: {", ".join(c.label for c in columns)})'
                        f'{per_run}.')
    if len(set(new)) != len(new):
      raise ReportError(f'--labels: labels must be unique, got {",".join(new)}.')
    return [dataclasses.replace(c, label=lab) for c, lab in zip(columns, new, strict=True)]
  if all_models:
    fallbacks = [[f'{os.path.normpath(c.workdir)}: {c.model_label}' for c in columns]]
  else:
    fallbacks = [[c.run_label for c in columns], [os.path.normpath(c.workdir) for c in columns]]
  new = _dedupe([c.label for c in columns], fallbacks)
  return [dataclasses.replace(c, label=lab) for c, lab in zip(columns, new, strict=True)]


def load_columns(workdirs: Sequence[str], split: str = 'test', all_models: bool = False,
                 labels: Sequence[str] | None = None) -> list[Column]:
  """`load_run` over every workdir, then `assign_labels`."""
  if not workdirs:
    raise ReportError('--workdirs: expected a comma-separated list of run folders, got none.')
  columns = [col for w in workdirs for col in load_run(w, split, all_models)]
  return assign_labels(columns, labels, all_models)


# ------------------------------------------------------------------------------ tables
def all_classes(columns: Sequence[Column]) -> list[str]:
  """Union of the columns' classes: the first run's order, then newcomers as met."""
  return list(dict.fromkeys(c for col in columns for c in col.classes))


def _is_number(x: Any) -> bool:
  return x is not None and not (isinstance(x, float) and math.isnan(x))


def _bold_best_row(name: str, values: Sequence[Any], missing: Sequence[bool],
                   fmt: str) -> list[str]:
  """One table row: formatted values, the best (as displayed) in bold when 2+ are defined."""
  shown = [MISSING if miss else (format(v, fmt) if _is_number(v) else UNDEFINED)
           for v, miss in zip(values, missing, strict=True)]
  # Compare the rounded values, as the reader sees them: two columns both showing 0.7627
  # are a tie and both bold.
  numbers = [float(s) for s, v, miss in zip(shown, values, missing, strict=True)
             if not miss and _is_number(v)]
  if len(numbers) >= 2:
    best = max(numbers)
    shown = [f'**{s}**' if s not in (MISSING, UNDEFINED) and float(s) == best else s
             for s in shown]
  return [name, *shown]


def auroc_table(columns: Sequence[Column]) -> str:
  """Paper 001 Table 1: per-class AUROC, one column per model, then the Average row."""
  rows = []
  for c in all_classes(columns):
    values = [col.metrics['auroc'].get(c) for col in columns]
    missing = [c not in col.metrics['auroc'] for col in columns]
    rows.append(_bold_best_row(c, values, missing, f'.{_DIGITS}f'))
  rows.append(_bold_best_row('Average', [col.metrics['mean_auroc'] for col in columns],
                             [False] * len(columns), f'.{_DIGITS}f'))
  return reporting.md_table(['Class', *(col.label for col in columns)], rows)


def summary_table(columns: Sequence[Column]) -> str:
  """F1 and binary accuracy (at each model's thresholds), one column per model."""
  averages = {col.metrics.get('f1_average') for col in columns}
  f1_name = f'F1 ({averages.pop()})' if len(averages) == 1 and None not in averages else 'F1'
  rows = [
      _bold_best_row(name, [col.metrics[key] for col in columns], [False] * len(columns),
                     f'.{_DIGITS}f')
      for name, key in ((f1_name, 'f1'), ('Binary accuracy', 'binary_accuracy'))
  ]
  return reporting.md_table(['Metric', *(col.label for col in columns)], rows)


def _column_note(col: Column) -> str:
  m = col.metrics
  facts = [f'{m["num_examples"]} images' if 'num_examples' in m else None,
           f'F1 {m["f1_average"]}-averaged' if 'f1_average' in m else None,
           f'Average over {m["n_valid_classes"]}/{len(col.classes)} classes'
           if 'n_valid_classes' in m else None]
  facts_text = ', '.join(f for f in facts if f)
  return f'- {col.label}: `{col.workdir}`, stage `{col.stage}`' + (
      f': {facts_text}.' if facts_text else '.')


def comparison_table(columns: Sequence[Column], split: str = 'test') -> str:
  """The whole comparison as Markdown: Table 1, the summary table, localisation tables."""
  columns = list(columns)
  parts = [f'# Comparison on the {split} split', '',
           f'## Table 1: per-class AUROC on the {split} split', '', auroc_table(columns), '',
           f'Best value of each row in bold. {MISSING}: the run has no such class; '
           f'{UNDEFINED}: AUROC undefined (only one label value in the split). Average: mean over '
           f'the classes with a defined AUROC (mean_auroc).', '',
           '## Summary metrics (at the models\' thresholds)', '', summary_table(columns), '',
           '## Columns', '', *(_column_note(col) for col in columns), '']
  located = _localization_results(columns)
  if located:
    from cxr_jax.labels import BOX_CLASSES
    parts += ['## Table 4: AUROC on the eight classes with boxes (paper 002)', '',
              reporting.box_class_auroc_markdown({col.label: col.metrics for col in columns},
                                                 BOX_CLASSES), '']
    absent = [col.label for col in columns if col.localization is None]
    if absent:
      parts += [f'No localisation results for: {", ".join(absent)}.', '']
    # localization_markdown brings its own '##' headings (accuracy at T(IoU), mean IoU, T(IoBB)).
    parts += [reporting.localization_markdown(located).rstrip('\n'), '']
  return '\n'.join(parts)


def _localization_results(columns: Sequence[Column]) -> dict[str, Mapping[str, Any]]:
  return {col.label: col.localization for col in columns if col.localization is not None}


def _csv_value(x: Any) -> str:
  """'' for undefined; counts as integers; floats by repr, which parses back to the same float."""
  if not _is_number(x):
    return ''
  return str(x) if isinstance(x, int) else repr(float(x))


def comparison_csv(columns: Sequence[Column]) -> str:
  """Long-format CSV: run,class,metric,value; per-class 'auroc' rows, then summary metrics."""
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator='\n')
  writer.writerow(CSV_HEADER)
  for col in columns:
    for c in col.classes:
      writer.writerow([col.label, c, 'auroc', _csv_value(col.metrics['auroc'].get(c))])
    for name in SUMMARY_CSV_METRICS:
      if name in col.metrics:
        writer.writerow([col.label, '', name, _csv_value(col.metrics[name])])
  return buf.getvalue()


def localization_csv(columns: Sequence[Column]) -> str | None:
  """`reporting.localization_csv` of the columns that have localisation results, else None."""
  located = _localization_results(columns)
  if not located:
    return None

  return reporting.localization_csv(located)


def roc_png(columns: Sequence[Column], split: str = 'test') -> bytes | None:
  """Per-class ROC curves, one panel per column (paper 004's Fig. 3), from the predictions
  each run's evaluate stage wrote for `split`; None when a run has none (metrics copied
  without predictions)."""
  labels, probs, classes = {}, {}, all_classes(columns)
  for col in columns:
    try:
      _, y, p = layout.Run(col.workdir).read_predictions(col.stage, split)
    except FileNotFoundError:
      return None
    if list(col.classes) != classes:
      raise ReportError(f'{col.workdir}: classes {col.classes} differ from the first run\'s '
                        f'{classes}; ROC curves need the same classes in every run.')
    labels[col.label], probs[col.label] = y, p
  return reporting.png(reporting.plot_roc(labels, probs, classes))


def write_outputs(out_dir: str | os.PathLike[str], files: Mapping[str, str | bytes | None]
                  ) -> list[Path]:
  """Writes {name: text or bytes} into out_dir all or nothing; None removes a stale file.

  Every file is staged first and renamed into place only when all are written
  (cxr_jax/io_utils.py), so a failure leaves the previous comparison untouched.
  """
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  texts = {name: text for name, text in files.items() if text is not None}
  atomic_write_files({out / name: text for name, text in texts.items()})
  for name, text in files.items():
    if text is None:
      (out / name).unlink(missing_ok=True)
  return [out / name for name in texts]


# ------------------------------------------------------------------------------ CLI
def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  """The CLI's arguments (argv without the program name)."""
  parser = argparse.ArgumentParser(
      prog='python -m cxr_jax.report',
      description="Compare finished runs: paper 001's Table 1 (per-class AUROC) and more.")
  parser.add_argument('--workdirs', required=True,
                      help='comma-separated run folders of python -m cxr_jax.main, in column '
                      'order')
  parser.add_argument('--labels', default=None,
                      help='comma-separated column labels (default: the report_models labels)')
  parser.add_argument('--split', default='test', help='eval split to compare (default: test)')
  parser.add_argument('--out', default=None,
                      help='folder to write comparison.md, comparison.csv, localization.csv')
  parser.add_argument('--all-models', '--all_models', dest='all_models', action='store_true',
                      help="one column per report_models entry, not only each run's last")
  parser.add_argument('--reference', default='', choices=('', 'paper004'),
                      help="append a paper's published tables beside ours (paper004: Fang et "
                      'al. Table 2 and Table 3)')
  return parser.parse_args(list(argv))


def _split_list(value: str) -> list[str]:
  return [s.strip() for s in value.split(',')]


def main(argv: Sequence[str]) -> int:
  """Runs the CLI on argv (without the program name); returns the exit status."""
  try:
    args = parse_args(argv)
  except SystemExit as e:  # argparse: usage error (2) or --help (0)
    return int(e.code or 0)
  try:
    workdirs = [w for w in _split_list(args.workdirs) if w]
    if not workdirs:
      raise ReportError(f'--workdirs: expected a comma-separated list of run folders, got '
                        f'{args.workdirs!r}.')
    labels = None if args.labels is None else _split_list(args.labels)
    columns = load_columns(workdirs, args.split, args.all_models, labels)
    # Everything is computed before anything is written: a failure writes nothing.
    markdown = comparison_table(columns, args.split)
    if args.reference == 'paper004':
      markdown += '\n' + reporting.paper004_reference_markdown(
          {col.label: col.metrics for col in columns}, _localization_results(columns))
    files = {'comparison.md': markdown, 'comparison.csv': comparison_csv(columns),
             'localization.csv': localization_csv(columns)}
    if args.out:
      files['roc.png'] = roc_png(columns, args.split)
  except ReportError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if args.out:
    try:
      written = write_outputs(args.out, files)
    except OSError as e:  # e.g. --out names a file, no permission, disk full: nothing replaced
      # A full or failing disk is a runtime error (1), not a wrong --out (2).
      runtime = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO)
      print(f'error: {e.filename or args.out}: cannot write the comparison there '
            f'({e.strerror or e}); '
            + ('the previous files in --out are untouched.' if runtime
               else 'expected a writable folder.'), file=sys.stderr)
      return 1 if runtime else 2
    note = (' (no roc.png: a run has no predictions_<split>.npz)'
            if files.get('roc.png', b'') is None else '')
    print(f'wrote {", ".join(str(p) for p in written)}{note}', file=sys.stderr)
  sys.stdout.write(markdown)
  sys.stdout.flush()
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
