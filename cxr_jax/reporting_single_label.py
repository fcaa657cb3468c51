"""Tables and figures of single-label (TB screening) results, in paper 003's terms.

The paper reports no numbers of its own; the report puts ours beside the reference numbers of
Pasa et al. 2019 (`REFERENCES`) with 95 % bootstrap intervals, and for k-fold cross-validation
the mean ± sd over folds and the pooled out-of-fold results. Nothing here reads or writes files
(cxr_jax/stages/single_label_report.py does).
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from cxr_jax import single_label
from cxr_jax.reporting import fmt, md_table, png

# Published numbers to put ours beside (accuracy, AUROC), by data set name prefix.
REFERENCES = {
    'montgomery_tb': ('Pasa et al. 2019, 5-fold CV (their code\'s README)', 0.761, 0.838),
    'shenzhen_tb': ('Pasa et al. 2019, 5-fold CV', 0.84, 0.90),
}
HEADLINE = ('accuracy', 'auroc', 'sensitivity', 'specificity', 'f1')
NAMES = {'accuracy': 'Accuracy', 'auroc': 'AUC', 'sensitivity': 'Sensitivity',
         'specificity': 'Specificity', 'f1': 'F1', 'precision': 'Precision'}


def with_ci(m: Mapping[str, Any], key: str) -> str:
  """'0.812 [0.700, 0.905]' (value and its bootstrap interval)."""
  ci = m.get('ci', {}).get(key)
  if not ci or ci[0] is None:
    return fmt(m.get(key))
  return f'{fmt(m.get(key))} [{fmt(ci[0])}, {fmt(ci[1])}]'


def reference_line(data_name: str) -> str:
  """The published numbers for the data set `data_name` (e.g. 'cxr_samples/montgomery_tb')."""
  for key, (source, acc, auc) in REFERENCES.items():
    if key in data_name:
      return f'For comparison, {source}: accuracy {acc:.3f}, AUC {auc:.3f}.'
  return ''


def metrics_markdown(results: Mapping[str, Mapping[str, Any]], title: str) -> str:
  """One row per model: accuracy, AUC, sensitivity, specificity, F1 with 95 % intervals."""
  first = next(iter(results.values()))
  header = ['Model'] + [NAMES[k] for k in HEADLINE] + ['Threshold', 'N']
  rows = [[label] + [with_ci(m, k) for k in HEADLINE]
          + [fmt(m['threshold']) if isinstance(m.get('threshold'), float) else 'argmax',
             str(m['num_examples'])] for label, m in results.items()]
  positive = first.get('positive_class')
  lines = [f'# {title}', '',
           f'Positive class: {positive!r} (sensitivity = its recall, specificity = the recall '
           'of the others). Values [95 % percentile bootstrap interval over images, '
           f'{first.get("bootstrap_samples", 0)} resamples]. The decision threshold on '
           f'P({positive}) was chosen on the validation split.' if positive else '',
           '', md_table(header, rows), '']
  for label, m in results.items():
    c = m['confusion']
    if len(c) == 2:
      lines.append(f'{label}: TN {c[0][0]}, FP {c[0][1]}, FN {c[1][0]}, TP {c[1][1]}.')
  return '\n'.join(lines) + '\n'


def cv_markdown(summary: Mapping[str, Any]) -> str:
  """k-fold results: mean ± sd over folds, per-fold rows, pooled out-of-fold with intervals."""
  k = summary['folds']
  lines = [f'# {k}-fold cross-validation on {summary["data"]} (patient-level, stratified, seed '
           f'{summary["seed"]}; each fold tested once, the next fold its validation split)', '']
  header = ['Model'] + [NAMES[m] for m in HEADLINE]
  rows = []
  for label, m in summary['models'].items():
    agg = m['aggregate']
    rows.append([label] + [f'{fmt(agg[x]["mean"])} ± {fmt(agg[x]["sd"])}'
                           + (f' (n={agg[x]["n"]})' if agg[x]['n'] < k else '')
                           for x in HEADLINE])
  lines += ['Mean ± sd over folds (each fold at the threshold chosen on its validation split):',
            '', md_table(header, rows), '']
  rows = [[label] + [with_ci(m['pooled'], x) for x in HEADLINE]
          for label, m in summary['models'].items()]
  lines += [f'Pooled out-of-fold ({next(iter(summary["models"].values()))["num_examples"]} '
            'images; AUC of the pooled scores, the others of the folds\' own decisions; 95 % '
            'bootstrap intervals):', '', md_table(header, rows), '']
  ref = reference_line(summary['data'])
  if ref:
    lines += [ref, '']
  for label, m in summary['models'].items():
    fold_rows = [[str(i), str(f['num_examples']), fmt(f['threshold'])]
                 + [fmt(f.get(x)) for x in HEADLINE] for i, f in enumerate(m['folds'])]
    lines += [f'{label}, per fold:', '',
              md_table(['Fold', 'N', 'Threshold'] + [NAMES[x] for x in HEADLINE], fold_rows),
              '']
  if summary.get('fold_seconds'):
    lines += ['Wall time per fold (s): ' + ', '.join(f'{t:.0f}' for t in
                                                     summary['fold_seconds']), '']
  return '\n'.join(lines)


def folds_csv(summary: Mapping[str, Any]) -> str:
  from cxr_jax.reporting import csv_text
  rows = [[label, i, f['num_examples'], f['threshold']] + [f.get(x) for x in HEADLINE]
          for label, m in summary['models'].items() for i, f in enumerate(m['folds'])]
  return csv_text(['model', 'fold', 'n', 'threshold', *HEADLINE], rows)


def plot_roc(labels_by_model: Mapping[str, np.ndarray], probs_by_model: Mapping[str, np.ndarray],
             results: Mapping[str, Mapping[str, Any]], title: str = '') -> Figure:
  """ROC of the positive-class score, one curve per model, AUC [95 % CI] in the legend, and
  each model's operating point."""
  fig = Figure(figsize=(4.8, 4.6), dpi=110)
  ax = fig.subplots()
  for label, probs in probs_by_model.items():
    fpr, tpr = single_label.roc_curve(labels_by_model[label], probs)
    m = results[label]
    line, = ax.plot(fpr, tpr, lw=1.6, label=f'{label}: AUC {with_ci(m, "auroc")}')
    if m.get('sensitivity') is not None and m.get('specificity') is not None:
      ax.plot([1 - m['specificity']], [m['sensitivity']], 'o', color=line.get_color(), ms=5)
  ax.plot([0, 1], [0, 1], ':', color='grey', lw=1)
  ax.set_xlabel('1 - specificity (false positive rate)')
  ax.set_ylabel('sensitivity (true positive rate)')
  ax.set_xlim(-0.01, 1.01)
  ax.set_ylim(-0.01, 1.01)
  ax.legend(loc='lower right', fontsize=7)
  if title:
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  return fig


def metrics_payload(title: str, results: Mapping[str, Mapping[str, Any]],
                    cv: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """metrics.json: the first model's headline numbers at the top level (accuracy, auroc,
  sensitivity, specificity, f1 with 'ci'), every model under 'models', the CV summary."""
  first = next(iter(results.values()))
  out = {'title': title, **{k: first.get(k) for k in (*HEADLINE, 'threshold', 'num_examples')},
         'ci': first.get('ci', {}), 'models': dict(results)}
  if cv is not None:
    out['cross_validation'] = {label: {'aggregate': m['aggregate'], 'pooled': m['pooled']}
                               for label, m in cv['models'].items()}
    out['folds'] = cv['folds']
  return out


def roc_png(labels: Mapping[str, np.ndarray], probs: Mapping[str, np.ndarray],
            results: Mapping[str, Mapping[str, Any]], title: str = '') -> bytes:
  return png(plot_roc(labels, probs, results, title))


def image_links(files: Sequence[str], folder: str) -> list[str]:
  return [f'![{f}]({folder}/{f})' for f in files]
