"""From collected predictions to metrics dicts, checkpoint-selection values and reports.

The train loop collects labels and sigmoid outputs on the host (padding already removed with the
eval mask) and calls `compute_metrics`; `select_metric` picks the value that decides the best
checkpoint (paper 000 kept the model with the best validation F1); `write_report` writes the
paper's Table II, per-class AUROC and confusion tables (Fig. 4), and ROC / confusion plots for
one model or several side by side (paper 000: without attention vs attention-guided).
"""

import io
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cxr_jax import metrics as M

# Metric names (last path part) where lower is better: errors. All others are scores.
_LOWER_IS_BETTER = frozenset({'mae', 'loss'})

REPORT_FILES = ('metrics.json', 'report.md', 'roc.png', 'confusion.png')


def _float_or_none(x: float) -> float | None:
  """nan (undefined AUROC) becomes None so that the dict is strict JSON."""
  x = float(x)
  return None if math.isnan(x) else x


def compute_metrics(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    class_names: Sequence[str],
    threshold: float | np.ndarray = 0.5,
    f1_average: str = M.DEFAULT_F1_AVERAGE,
) -> dict[str, Any]:
  """All metrics of one model on one split, as a JSON-serialisable dict.

  Args:
    y_true: [N, K] 0/1 labels of the real (unmasked) examples.
    y_prob: [N, K] sigmoid probabilities.
    class_names: K names, in column order.
    threshold: scalar or [K] decision thresholds (prediction is `y_prob > threshold`).
    f1_average: the averaging reported under 'f1' (all three are reported as f1_<average>).

  Returns:
    {'num_examples', 'num_classes', 'class_names', 'thresholds' [K], 'binary_accuracy', 'f1',
     'f1_average', 'f1_micro', 'f1_macro', 'f1_samples', 'mae', 'loss' (mean BCE),
     'mean_auroc' (None if no class has both labels), 'n_valid_classes',
     'auroc' {class: float|None},
     'per_class' {class: {'precision', 'recall', 'f1', 'support', 'auroc'}},
     'confusion' {class: [[tn, fp], [fn, tp]]}}.
  """
  y_true, y_prob = M.check_inputs(y_true, y_prob)
  n, k = y_true.shape
  class_names = [str(c) for c in class_names]
  if len(class_names) != k:
    raise ValueError(
        f'class_names must have K = {k} entries (columns of y_true), got {len(class_names)}.'
    )
  if len(set(class_names)) != k:
    raise ValueError(f'class_names must be unique, got {class_names}.')
  if f1_average not in M.F1_AVERAGES:
    raise ValueError(f'f1_average must be one of {M.F1_AVERAGES}, got {f1_average!r}.')
  thresholds = M.check_thresholds(threshold, k)

  aurocs = M.per_class_auroc(y_true, y_prob)
  mean, n_valid = M.mean_auroc(y_true, y_prob)
  f1s = {avg: M.f1(y_true, y_prob, thresholds, average=avg) for avg in M.F1_AVERAGES}
  scores = M.per_class_scores(y_true, y_prob, thresholds)
  confusion = M.confusion_matrices(y_true, y_prob, thresholds)
  return {
      'num_examples': int(n),
      'num_classes': int(k),
      'class_names': class_names,
      'thresholds': [float(t) for t in thresholds],
      'binary_accuracy': M.binary_accuracy(y_true, y_prob, thresholds),
      'f1': f1s[f1_average],
      'f1_average': f1_average,
      **{f'f1_{avg}': value for avg, value in f1s.items()},
      'mae': M.mae(y_true, y_prob),
      'loss': M.bce(y_true, y_prob),
      'mean_auroc': _float_or_none(mean),
      'n_valid_classes': n_valid,
      'auroc': {c: _float_or_none(a) for c, a in zip(class_names, aurocs, strict=True)},
      'per_class': {
          c: {
              'precision': float(scores.precision[i]),
              'recall': float(scores.recall[i]),
              'f1': float(scores.f1[i]),
              'support': int(scores.support[i]),
              'auroc': _float_or_none(aurocs[i]),
          }
          for i, c in enumerate(class_names)
      },
      'confusion': {c: confusion[i].tolist() for i, c in enumerate(class_names)},
  }


# Names every `compute_metrics` dict has, whatever the classes; used to check a config's metric
# name before the first evaluation (check_only=True).
SCALAR_METRICS = ('binary_accuracy', 'f1', 'f1_micro', 'f1_macro', 'f1_samples', 'loss', 'mae',
                  'mean_auroc')
PER_CLASS_METRICS = ('precision', 'recall', 'f1', 'auroc')
_NAME_PATTERNS = ('auroc/<class>', 'per_class/<class>/{precision,recall,f1,auroc}')


def metric_names(metrics: Mapping[str, Any]) -> list[str]:
  """Names `select_metric` accepts for this metrics dict, e.g. 'f1', 'auroc/Effusion'."""
  return sorted(_metric_leaves(metrics))


def higher_is_better(name: str) -> bool:
  """Direction of a metric name: False for errors ('mae'), True for scores."""
  return name.rsplit('/', 1)[-1] not in _LOWER_IS_BETTER


def _well_formed(name: str) -> bool:
  """True if `name` is a metric some `compute_metrics` dict has (class names unchecked)."""
  parts = name.split('/')
  if len(parts) == 1:
    return name in SCALAR_METRICS
  if len(parts) == 2:
    return parts[0] == 'auroc' and bool(parts[1])
  return (len(parts) == 3 and parts[0] == 'per_class' and bool(parts[1])
          and parts[2] in PER_CLASS_METRICS)


def _metric_leaves(metrics: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """Flattens the scoring entries of a metrics dict to {'a/b': value}.

  Counts and settings (num_examples, thresholds, support, ...) are not metrics to select by;
  `_well_formed` keeps only the scores.
  """
  out = {}
  for key, value in metrics.items():
    path = f'{prefix}{key}'
    if isinstance(value, Mapping):
      out.update(_metric_leaves(value, prefix=f'{path}/'))
    elif _well_formed(path) and (value is None or isinstance(value, int | float)):
      out[path] = value
  return out


class MetricValue(NamedTuple):
  """A metric chosen for model selection: value (nan if undefined) and its direction."""

  value: float
  higher_is_better: bool

  def is_better(self, best: float | None) -> bool:
    """True if this value beats `best`; see `is_improvement`."""
    return is_improvement(self.value, best, self.higher_is_better)


def is_improvement(value: float, best: float | None, higher_is_better: bool) -> bool:
  """Whether `value` should replace `best` as the best checkpoint's value.

  An undefined value (nan) never wins, and an undefined or missing best (None, nan) loses to
  any defined value; a plain `value > best` would let a nan from a first evaluation with no
  usable class block every later improvement, since comparisons with nan are all False.
  """
  if math.isnan(value):
    return False
  if best is None or math.isnan(best):
    return True
  return value > best if higher_is_better else value < best


def select_metric(
    metrics: Mapping[str, Any], name: str, check_only: bool = False
) -> MetricValue:
  """Looks up a validation metric by name for choosing the best checkpoint.

  Args:
    metrics: a dict from `compute_metrics`.
    name: a top-level metric ('f1', 'mean_auroc', 'mae', 'binary_accuracy', 'f1_macro', ...)
      or a nested one joined with '/' ('auroc/Effusion', 'per_class/Mass/f1').
    check_only: only check that `name` is well formed (before any evaluation, `metrics` may be
      empty); the value is then nan.

  Returns:
    MetricValue(value, higher_is_better), a 2-tuple; value is nan where the metric is undefined
    (e.g. mean_auroc when no class has both labels); `is_improvement` handles that.

  Raises:
    ValueError: unknown name, listing the available ones.
  """
  leaves = {} if check_only else _metric_leaves(metrics)
  if not _well_formed(name) or not (check_only or name in leaves):
    # Per-class names are summarised by pattern: listing 5 names for each of 14 classes hides
    # the handful of scalar metrics one usually wants.
    classes = f' (<class> in {", ".join(metrics["auroc"])})' if 'auroc' in metrics else ''
    raise ValueError(
        f'Unknown metric {name!r}; available: {", ".join(SCALAR_METRICS)}, '
        f'{", ".join(_NAME_PATTERNS)}{classes}.'
    )
  if check_only:
    return MetricValue(float('nan'), higher_is_better(name))
  value = leaves[name]
  return MetricValue(float('nan') if value is None else float(value), higher_is_better(name))


def _fmt(x: float | None, digits: int = 3) -> str:
  return 'n/a' if x is None or (isinstance(x, float) and math.isnan(x)) else f'{x:.{digits}f}'


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """A GitHub markdown table; the first column (names) left-aligned, numbers right-aligned."""
  rule = ['---'] + ['---:'] * (len(header) - 1)
  lines = ['| ' + ' | '.join(line) + ' |' for line in (header, rule, *rows)]
  return '\n'.join(lines)


def _threshold_note(thresholds: Sequence[float], short: bool = False) -> str:
  if len(set(thresholds)) == 1:
    return f'{thresholds[0]:g}'
  if short:
    return 'per class'
  return 'per class (' + ', '.join(f'{t:.3g}' for t in thresholds) + ')'


def render_markdown(
    results: Mapping[str, Mapping[str, Any]], class_names: Sequence[str], title: str
) -> str:
  """The report as markdown: Table II, per-class AUROC, per-class confusion tables (Fig. 4).

  Args:
    results: {model name: dict from `compute_metrics`}, in display order.
    class_names: K names; each model's metrics must use the same.
    title: first heading.
  """
  parts = [f'# {title}', '', '## Table II: Summary of the classification results', '']
  parts.append(
      _md_table(
          ['Model', 'Binary Accuracy', 'F1-Score', 'Average AUC', 'MAE'],
          [
              [name, *(_fmt(m[key]) for key in ('binary_accuracy', 'f1', 'mean_auroc', 'mae'))]
              for name, m in results.items()
          ],
      )
  )
  parts.append('')
  for name, m in results.items():
    parts.append(
        f'- {name}: {m["num_examples"]} examples, threshold {_threshold_note(m["thresholds"])}, '
        f'F1 {m["f1_average"]}-averaged (micro {_fmt(m["f1_micro"])}, macro '
        f'{_fmt(m["f1_macro"])}, samples {_fmt(m["f1_samples"])}), Average AUC over '
        f'{m["n_valid_classes"]}/{m["num_classes"]} classes with both labels present.'
    )

  parts += ['', '## Per-class AUROC', '']
  rows = [[c] + [_fmt(m['auroc'][c]) for m in results.values()] for c in class_names]
  rows.append(['**Mean**'] + [f'**{_fmt(m["mean_auroc"])}**' for m in results.values()])
  parts.append(_md_table(['Class', *results], rows))

  parts += ['', '## Per-class confusion matrices (Fig. 4)', '']
  parts.append('Rows are classes; TN/FP/FN/TP count test images at the thresholds above.')
  for name, m in results.items():
    parts += ['', f'### {name}', '']
    rows = []
    for c in class_names:
      (tn, fp), (fn, tp) = m['confusion'][c]
      pc = m['per_class'][c]
      rows.append(
          [c, str(tn), str(fp), str(fn), str(tp), _fmt(pc['precision']), _fmt(pc['recall']),
           _fmt(pc['f1']), _fmt(pc['auroc'])]
      )
    parts.append(
        _md_table(['Class', 'TN', 'FP', 'FN', 'TP', 'Precision', 'Recall', 'F1', 'AUROC'], rows)
    )
  return '\n'.join(parts) + '\n'


def _class_colors(k: int) -> list[Any]:
  from matplotlib import colormaps  # Imported here: only the plots need the colour tables.

  cmap = colormaps['tab20' if k > 10 else 'tab10']
  return [cmap(i % cmap.N) for i in range(k)]


def plot_roc(
    y_true_by_model: Mapping[str, np.ndarray],
    y_prob_by_model: Mapping[str, np.ndarray],
    class_names: Sequence[str],
) -> Figure:
  """Per-class ROC curves, one panel per model, legend with each class's AUROC.

  Args:
    y_true_by_model, y_prob_by_model: {model: [N_m, K]} labels and probabilities.
    class_names: K names.
  """
  models = list(y_prob_by_model)
  colors = _class_colors(len(class_names))
  fig = Figure(figsize=(6.2 * len(models), 6.2), layout='constrained')
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(models), squeeze=False)[0]
  grid = np.linspace(0, 1, 201)
  for ax, model in zip(axes, models, strict=True):
    curves = M.roc_curves(y_true_by_model[model], y_prob_by_model[model])
    mean, n_valid = M.mean_auroc(y_true_by_model[model], y_prob_by_model[model])
    tprs = []
    for c, curve, color in zip(class_names, curves, colors, strict=True):
      if curve is None:
        # Keep the class in the legend so a missing curve is explained, not silently absent.
        ax.plot([], [], color=color, label=f'{c} (n/a: one label value)')
        continue
      ax.plot(curve.fpr, curve.tpr, color=color, lw=1.2, label=f'{c} ({curve.auroc:.3f})')
      tprs.append(np.interp(grid, curve.fpr, curve.tpr))
    if tprs:
      ax.plot(grid, np.mean(tprs, axis=0), color='black', lw=2.5,
              label=f'mean curve; mean AUROC {mean:.3f} ({n_valid} classes)')
    ax.plot([0, 1], [0, 1], color='grey', lw=0.8, ls='--')
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel='False positive rate', ylabel='True positive rate',
           title=model, aspect='equal')
    ax.grid(alpha=0.3)
    ax.legend(loc='lower right', fontsize=7, title='class (AUROC)', title_fontsize=7)
  return fig


def plot_confusion(results: Mapping[str, Mapping[str, Any]], class_names: Sequence[str]) -> Figure:
  """Grid of per-class 2x2 confusion matrices (paper 000 Fig. 4), one block per model.

  Cells show counts; colour is the row-normalised rate, so that rare classes, whose counts are
  dominated by true negatives, still show how their positives are split.

  Args:
    results: {model: dict from `compute_metrics`}.
    class_names: K names.
  """
  k = len(class_names)
  cols = min(k, 5)
  rows = math.ceil(k / cols)
  fig = Figure(figsize=(2.5 * cols, (2.5 * rows + 0.5) * len(results)), layout='constrained')
  FigureCanvasAgg(fig)
  subfigs = np.atleast_1d(fig.subfigures(len(results), 1))
  for subfig, (model, m) in zip(subfigs, results.items(), strict=True):
    note = _threshold_note(m['thresholds'], short=True)
    subfig.suptitle(f'{model}: confusion matrices (threshold {note})')
    axes = subfig.subplots(rows, cols, squeeze=False).ravel()
    for ax, c in zip(axes, class_names, strict=False):
      counts = np.asarray(m['confusion'][c], dtype=np.int64)
      rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
      ax.imshow(rates, cmap='Blues', vmin=0, vmax=1)
      for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, f'{n}\n{rates[i, j]:.0%}', ha='center', va='center', fontsize=8,
                color='white' if rates[i, j] > 0.6 else 'black')
      ax.set_xticks([0, 1], ['pred 0', 'pred 1'], fontsize=7)
      ax.set_yticks([0, 1], ['true 0', 'true 1'], fontsize=7)
      ax.set_title(c, fontsize=9)
    for ax in axes[k:]:
      ax.axis('off')
  return fig


def _save_png(fig: Figure) -> bytes:
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=110)
  return buf.getvalue()


def _write_atomically(report_dir: Path, producers: Mapping[str, Callable[[], bytes]]) -> None:
  """Produces every file into a temp file in report_dir, then renames them all into place.

  Nothing is renamed until every producer has succeeded, so a failure (a plot raising, a full
  disk) leaves the previous report untouched; os.replace within one directory is atomic, so a
  reader never sees a half-written file.
  """
  staged: list[tuple[Path, Path]] = []
  try:
    for name, produce in producers.items():
      fd, tmp = tempfile.mkstemp(dir=report_dir, prefix=f'.{name}.', suffix='.tmp')
      staged.append((Path(tmp), report_dir / name))
      # mkstemp creates 0600 files; a report is meant to be read by others, as open() would allow.
      os.fchmod(fd, 0o644)
      with os.fdopen(fd, 'wb') as f:
        f.write(produce())
        f.flush()
        os.fsync(f.fileno())
    for tmp, final in staged:
      os.replace(tmp, final)
  finally:
    for tmp, _ in staged:
      tmp.unlink(missing_ok=True)


def write_report(
    report_dir: str | os.PathLike[str],
    results: Mapping[str, Mapping[str, Any]],
    y_true_by_model: Mapping[str, np.ndarray] | np.ndarray,
    y_prob_by_model: Mapping[str, np.ndarray],
    class_names: Sequence[str],
    title: str,
) -> dict[str, Path]:
  """Writes metrics.json, report.md, roc.png and confusion.png into report_dir, atomically.

  Args:
    report_dir: created if missing; existing report files are replaced only if all succeed.
    results: {model name: dict from `compute_metrics`}; one model or several, in table order.
    y_true_by_model: {model: [N_m, K]} labels, or one [N, K] array shared by every model (the
      usual case: all models evaluated on the same test split).
    y_prob_by_model: {model: [N_m, K]} probabilities (for the ROC curves).
    class_names: K names, as used by every entry of results.
    title: report heading.

  Returns:
    {file name: path written}.
  """
  if not results:
    raise ValueError('results must hold at least one model.')
  class_names = [str(c) for c in class_names]
  models = list(results)
  if not isinstance(y_true_by_model, Mapping):
    y_true_by_model = {m: y_true_by_model for m in models}
  for arg, d in (('y_true_by_model', y_true_by_model), ('y_prob_by_model', y_prob_by_model)):
    if set(d) != set(models):
      raise ValueError(f'{arg} must have the models of results {models}, got {list(d)}.')
  for m, r in results.items():
    if list(r['class_names']) != class_names:
      raise ValueError(f'results[{m!r}] is for classes {r["class_names"]}, not {class_names}.')
  y_prob_by_model = {m: y_prob_by_model[m] for m in models}

  report_dir = Path(report_dir)
  report_dir.mkdir(parents=True, exist_ok=True)
  payload = {'title': title, 'class_names': class_names, 'models': {m: results[m] for m in models}}
  producers = {
      # allow_nan=False: fail here rather than write NaN, which strict JSON readers reject.
      'metrics.json': lambda: (json.dumps(payload, indent=2, allow_nan=False) + '\n').encode(),
      'report.md': lambda: render_markdown(results, class_names, title).encode(),
      'roc.png': lambda: _save_png(plot_roc(y_true_by_model, y_prob_by_model, class_names)),
      'confusion.png': lambda: _save_png(plot_confusion(results, class_names)),
  }
  _write_atomically(report_dir, producers)
  return {name: report_dir / name for name in REPORT_FILES}
