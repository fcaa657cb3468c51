"""Every table and figure cxr_jax writes: Markdown and CSV tables, ROC and confusion plots.

The report stage (cxr_jax/stages/report.py) and `python -m cxr_jax.report` render here and
write the result in one go (cxr_jax/io_utils.py); nothing here reads or writes files.

- Classification (paper 000's Table II, per-class AUROC, Fig. 4 confusion tables), one model or
  several side by side: `classification_markdown`, `plot_roc`, `plot_confusion`.
- Operating points: `thresholds_markdown` (per-class thresholds and the metrics at them next to
  the scalar threshold's), `thresholds_csv`.
- Localisation (papers 001/002/004): `localization_markdown`, `localization_csv`.
- Primitives: `md_table`, `fmt`, `csv_text`, `png`.
"""

import csv
import io
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cxr_jax import metrics as M
from cxr_jax.explain import localization


def fmt(x: float | None, digits: int = 3) -> str:
  """A number to `digits` decimals; 'n/a' for None or NaN (undefined metrics)."""
  return 'n/a' if x is None or (isinstance(x, float) and math.isnan(x)) else f'{x:.{digits}f}'


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
  """A GitHub markdown table; the first `left` columns (names) left-aligned, numbers right."""
  rule = ['---'] * left + ['---:'] * (len(header) - left)
  lines = ['| ' + ' | '.join(line) + ' |' for line in (header, rule, *rows)]
  return '\n'.join(lines)


def _threshold_note(thresholds: Sequence[float], short: bool = False) -> str:
  if len(set(thresholds)) == 1:
    return f'{thresholds[0]:g}'
  if short:
    return 'per class'
  return 'per class (' + ', '.join(f'{t:.3g}' for t in thresholds) + ')'


def classification_markdown(
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
      md_table(
          ['Model', 'Binary Accuracy', 'F1-Score', 'Average AUC', 'MAE'],
          [
              [name, *(fmt(m[key]) for key in ('binary_accuracy', 'f1', 'mean_auroc', 'mae'))]
              for name, m in results.items()
          ],
      )
  )
  parts.append('')
  for name, m in results.items():
    parts.append(
        f'- {name}: {m["num_examples"]} examples, threshold {_threshold_note(m["thresholds"])}, '
        f'F1 {m["f1_average"]}-averaged (micro {fmt(m["f1_micro"])}, macro '
        f'{fmt(m["f1_macro"])}, samples {fmt(m["f1_samples"])}), Average AUC over '
        f'{m["n_valid_classes"]}/{m["num_classes"]} classes with both labels present.'
    )

  parts += ['', '## Per-class AUROC', '']
  rows = [[c] + [fmt(m['auroc'][c]) for m in results.values()] for c in class_names]
  rows.append(['**Mean**'] + [f'**{fmt(m["mean_auroc"])}**' for m in results.values()])
  parts.append(md_table(['Class', *results], rows))

  parts += ['', '## Per-class confusion matrices (Fig. 4)', '']
  parts.append('Rows are classes; TN/FP/FN/TP count test images at the thresholds above.')
  for name, m in results.items():
    parts += ['', f'### {name}', '']
    rows = []
    for c in class_names:
      (tn, fp), (fn, tp) = m['confusion'][c]
      pc = m['per_class'][c]
      rows.append(
          [c, str(tn), str(fp), str(fn), str(tp), fmt(pc['precision']), fmt(pc['recall']),
           fmt(pc['f1']), fmt(pc['auroc'])]
      )
    parts.append(
        md_table(['Class', 'TN', 'FP', 'FN', 'TP', 'Precision', 'Recall', 'F1', 'AUROC'], rows)
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


def png(fig: Figure) -> bytes:
  """A figure rendered to PNG bytes."""
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=110)
  return buf.getvalue()


def csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """CSV text ('\\n' line ends) of a header and rows; None becomes an empty cell."""
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator='\n')
  writer.writerow(header)
  for row in rows:
    writer.writerow(['' if v is None else v for v in row])
  return buf.getvalue()


SUMMARY_KEYS = ('binary_accuracy', 'f1', 'mean_auroc', 'mae')


def thresholds_markdown(results: Mapping[str, Mapping[str, Any]],
                        thresholds: Mapping[str, Mapping[str, Any]],
                        class_names: Sequence[str]) -> str:
  """Per-class operating points: the thresholds each model chose on validation, and Table II
  at those thresholds next to Table II at the scalar threshold (where they differ).

  Args:
    results: {model: `compute_metrics` dict at the per-class thresholds, with its
      'scalar_threshold' summary ({'threshold', 'binary_accuracy', 'f1', 'mean_auroc', 'mae'})}.
    thresholds: {model: {'rule', 'split', 'thresholds': {class: t}}} (evaluate stage).
    class_names: the K classes, in table order.
  """
  models = [m for m in results if m in thresholds]
  if not models:
    return ''
  first = thresholds[models[0]]
  parts = ['## Operating points', '',
           f'Per-class thresholds chosen on the {first["split"]!r} split by '
           f'{", ".join(sorted({thresholds[m]["rule"] for m in models}))} and applied to this '
           'split (Table II above); below, the same models at the scalar threshold.', '']
  rows = [[c, *(fmt(thresholds[m]['thresholds'][c]) for m in models)] for c in class_names]
  parts += [md_table(['Class', *models], rows), '']
  rows = []
  for m in models:
    scalar = results[m].get('scalar_threshold')
    if scalar is None:
      continue
    rows.append([f'{m} (per class)', *(fmt(results[m][k]) for k in SUMMARY_KEYS)])
    rows.append([f'{m} (threshold {scalar["threshold"]:g})',
                 *(fmt(scalar[k]) for k in SUMMARY_KEYS)])
  if rows:
    parts += [md_table(['Model', 'Binary Accuracy', 'F1-Score', 'Average AUC', 'MAE'], rows),
              '']
  return '\n'.join(parts)


def thresholds_csv(thresholds: Mapping[str, Mapping[str, Any]]) -> str:
  """model,class,rule,split,threshold rows of the per-class operating points."""
  rows = [[m, c, t['rule'], t['split'], repr(float(v))]
          for m, t in thresholds.items() for c, v in t['thresholds'].items()]
  return csv_text(['model', 'class', 'rule', 'split', 'threshold'], rows)


def classification_files(
    results: Mapping[str, Mapping[str, Any]],
    y_true_by_model: Mapping[str, np.ndarray] | np.ndarray,
    y_prob_by_model: Mapping[str, np.ndarray],
    class_names: Sequence[str],
    title: str,
) -> dict[str, Callable[[], bytes | str]]:
  """The classification report of one model or several, as producers by kind.

  Args:
    results: {model name: dict from `compute_metrics`}; one model or several, in table order.
    y_true_by_model: {model: [N_m, K]} labels, or one [N, K] array shared by every model (the
      usual case: all models evaluated on the same test split).
    y_prob_by_model: {model: [N_m, K]} probabilities (for the ROC curves).
    class_names: K names, as used by every entry of results.
    title: report heading.

  Returns:
    {'metrics': JSON text, 'markdown': report text, 'roc': PNG, 'confusion': PNG}, each a
    function producing the content (called when written, so a failing plot cancels the
    whole write; cxr_jax/io_utils.py).
  """
  from cxr_jax.io_utils import json_text

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
  payload = {'title': title, 'class_names': class_names, 'models': {m: results[m] for m in models}}
  return {
      'metrics': lambda: json_text(payload, sort_keys=False),
      'markdown': lambda: classification_markdown(results, class_names, title),
      'roc': lambda: png(plot_roc(y_true_by_model, y_prob_by_model, class_names)),
      'confusion': lambda: png(plot_confusion(results, class_names)),
  }


# ------------------------------------------------------------------------------ localisation
def _loc_columns(results: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[str], str]:
  """Classes with boxes in any model (first-seen order), their column heads, and a note on
  the abbreviations ('' when full names are used)."""
  classes: list[str] = []
  for m in results.values():
    classes += [c for c in m['class_names'] if c not in classes]
  if classes and all(c in localization.ABBREVIATIONS for c in classes):
    abbreviations = localization.ABBREVIATIONS
    note = 'Abbreviations: ' + ', '.join(f'{abbreviations[c]} = {c}' for c in classes) + '.'
    return classes, [abbreviations[c] for c in classes], note
  return classes, list(classes), ''


def _boxes_note(results: Mapping[str, Mapping[str, Any]]) -> str:
  parts = []
  for name, m in results.items():
    scope = ', a box of a class the model did not predict counts as a miss' if m.get(
        'require_prediction') else ''
    groups = m['mean'].get('num_groups')
    maps = '' if groups is None else (
        f' in {groups} heat maps, {m["mean"]["num_pred_boxes"]} predicted boxes')
    parts.append(f'{name}: {m["num_boxes"]} boxes{maps}{scope}')
  return '; '.join(parts) + '.'


def _accuracy_table(results: Mapping[str, Mapping[str, Any]], thresholds: Sequence[float],
                    metric: str) -> str:
  classes, heads, note = _loc_columns(results)
  label = 'IoU' if metric == 'acc_iou' else 'IoBB'
  afp_key = 'afp_iou' if metric == 'acc_iou' else 'afp_iobb'
  # Results written before AFP existed have none: no column unless some model has it.
  with_afp = any(afp_key in m['mean'] for m in results.values())
  rows = []
  for t in thresholds:
    key = localization.threshold_key(t)
    for i, (name, m) in enumerate(results.items()):
      values = [m['per_class'][c][metric].get(key) if c in m['per_class'] else None
                for c in classes]
      mean = m['mean'][metric].get(key)
      row = [key if i == 0 else '', name, *(fmt(v, 2) for v in values), fmt(mean, 2)]
      if with_afp:
        row.append(fmt(m['mean'].get(afp_key, {}).get(key), 3))
      rows.append(row)
  header = [f'T({label})', 'Model', *heads, 'Mean', *(['AFP'] if with_afp else [])]
  lines = [md_table(header, rows, left=2), '']
  text = (f'A ground-truth box counts as localised when its best {label} with a predicted '
          f'box is > T; Mean is the mean over classes.')
  if with_afp:
    text += (f' AFP: average false positives (Wang et al.), predicted boxes whose {label} with '
             f'every ground-truth box of their image and class is <= T, per heat map (image '
             f'and class), mean over classes.')
  lines.append(f'{text} {note}'.rstrip())
  lines.append(_boxes_note(results))
  return '\n'.join(lines)


def _mean_iou_table(results: Mapping[str, Mapping[str, Any]]) -> str:
  classes, heads, note = _loc_columns(results)
  rows = []
  for name, m in results.items():
    values = [m['per_class'][c]['mean_iou'] if c in m['per_class'] else None for c in classes]
    rows.append([name, *(fmt(v, 4) for v in values), fmt(m['mean']['mean_iou'], 4),
                 fmt(m.get('pooled', {}).get('mean_iou'), 4)])
  lines = [md_table(['Model', *heads, 'Mean', 'All boxes'], rows), '']
  lines.append('Mean IoU of each ground-truth box with its best predicted box (0 when none). '
               'Mean: over classes; All boxes: over all boxes (paper 004\'s "average IoU"). '
               f'{note}'.rstrip())
  lines.append(_boxes_note(results))
  return '\n'.join(lines)


def localization_markdown(results: Mapping[str, Mapping[str, Any]], *,
                    thresholds: Sequence[float] = (0.3, 0.5, 0.7)) -> str:
  """Localisation tables for several models side by side, in the papers' layouts.

  results: {model label: `localization_metrics` dict}, in display order. Gives accuracy at
  T(IoU) (paper 002 Table 1), mean IoU per class (paper 004 Table 3), and accuracy at T(IoBB)
  (Wang et al.), each under a '##' heading; the accuracy tables end with the class-mean AFP
  at the same T (Wang et al. Table 3 pairs them), so more boxes cannot look better for free.
  """
  if not results:
    raise ValueError('localization_markdown needs at least one model')
  parts = ['## Localisation accuracy, T(IoU) (paper 002, Table 1)', '',
           _accuracy_table(results, thresholds, 'acc_iou'), '',
           '## Mean IoU per class (paper 004, Table 3)', '', _mean_iou_table(results), '',
           '## Localisation accuracy, T(IoBB) (Wang et al.)', '',
           _accuracy_table(results, thresholds, 'acc_iobb')]
  return '\n'.join(parts) + '\n'


def localization_csv(results: Mapping[str, Mapping[str, Any]]) -> str:
  """All numbers of `results` ({model: localization_metrics dict}) as long-format CSV rows
  model,class,metric,threshold,value; class 'Mean' is the mean over classes, 'All boxes' the
  pooled one; metrics num_boxes, mean_iou, mean_iobb, num_groups, num_pred_boxes (threshold
  empty), then acc_iou, acc_iobb, afp_iou, afp_iobb at each threshold; value empty for None."""
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator='\n')
  writer.writerow(['model', 'class', 'metric', 'threshold', 'value'])
  for name, m in results.items():
    groups = [*((c, m['per_class'][c]) for c in m['class_names']), ('Mean', m['mean'])]
    if 'pooled' in m:
      groups.append(('All boxes', m['pooled']))
    for cls, summary in groups:
      # AFP keys are absent from results written before AFP existed.
      for key in ('num_boxes', 'mean_iou', 'mean_iobb', 'num_groups', 'num_pred_boxes'):
        if key in summary:
          writer.writerow([name, cls, key, '', _loc_csv_value(summary[key])])
      for key in ('acc_iou', 'acc_iobb', 'afp_iou', 'afp_iobb'):
        for t, v in summary.get(key, {}).items():
          writer.writerow([name, cls, key, t, _loc_csv_value(v)])
  return buf.getvalue()


def _loc_csv_value(v: Any) -> str:
  return '' if v is None else repr(v) if isinstance(v, float) else str(v)


# ------------------------------------------------------------------------------ segmentation
# Published Jaccard of lungs / heart on JSRT-SCR (paper 004's issue anchors): SCR's second human
# observer (van Ginneken et al. 2006) and InvertedNet (Novikov et al. 2018).
SEGMENTATION_ANCHORS = {'SCR human observer': {'lungs': 0.946, 'heart': 0.878},
                        'InvertedNet': {'lungs': 0.950, 'heart': 0.882}}


def segmentation_summary(metrics: Mapping[str, Any]) -> dict[str, Any]:
  """Flat means of one split ('dice_left_lung', ..., 'jaccard_heart', 'dice_mean',
  'dice_loss') with its split and image count: what a report's metrics.json leads with."""
  from cxr_jax import segmentation_metrics
  return {**segmentation_metrics.flat_summary(metrics), 'split': metrics.get('split'),
          'num_examples': metrics['num_examples']}


def segmentation_markdown(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
  """Dice and Jaccard per structure, mean +- sd over images, for each stage and split.

  results: {stage: {split key ('validation', 'test'): `segmentation_metrics.summarize` dict}}.
  """
  parts = []
  for stage, splits in results.items():
    for key, m in splits.items():
      rows = [[s, f'{fmt(m["dice"][s], 4)} ± {fmt(m["dice_sd"][s], 4)}',
               f'{fmt(m["jaccard"][s], 4)} ± {fmt(m["jaccard_sd"][s], 4)}',
               fmt(m['dice_min'][s], 4)] for s in m['structures']]
      rows.append(['**mean of channels**', f'**{fmt(m["mean_dice"], 4)}**',
                   f'**{fmt(m["mean_jaccard"], 4)}**', ''])
      split = f' ({m["split"]})' if m.get('split') else ''
      parts += [f'## {stage}: {key} split{split}, {m["num_examples"]} images', '',
                md_table(['Structure', 'Dice (mean ± sd)', 'Jaccard (mean ± sd)', 'Dice min'],
                         rows), '',
                f'Masks binarised at {m["threshold"]:g}; sd over images; `lungs` = both lungs '
                'together, `global` = paper 004\'s M_g (every structure). Soft Dice loss (the '
                f'checkpoint criterion): {fmt(m["dice_loss"], 4)}.', '']
  anchors = '; '.join(f'{name} lungs {v["lungs"]:.3f}, heart {v["heart"]:.3f}'
                      for name, v in SEGMENTATION_ANCHORS.items())
  parts.append(f'Published Jaccard on JSRT/SCR for comparison: {anchors}.')
  return '\n'.join(parts) + '\n'


# ------------------------------------------------------------------------------ paper 004
_NIH14 = ('Atelectasis', 'Cardiomegaly', 'Effusion', 'Infiltration', 'Mass', 'Nodule',
          'Pneumonia', 'Pneumothorax', 'Consolidation', 'Edema', 'Emphysema', 'Fibrosis',
          'Pleural_Thickening', 'Hernia')
# Fang et al. Table 2 (test AUROC, benchmark split): the columns our configs reproduce, with the
# paper's Average row.
PAPER004_TABLE2 = {
    'DCNN': (0.7837, 0.8937, 0.8704, 0.6826, 0.7875, 0.7125, 0.7110, 0.8232, 0.7895, 0.8673,
             0.8398, 0.7656, 0.7398, 0.8406, 0.7934),
    'CheXNet': (0.7919, 0.9038, 0.8744, 0.6942, 0.8142, 0.7286, 0.7477, 0.8431, 0.7933, 0.8777,
                0.8726, 0.7986, 0.7528, 0.8545, 0.8105),
    'Ours w/o F_l': (0.8151, 0.9100, 0.8779, 0.6923, 0.8290, 0.7553, 0.7401, 0.8516, 0.8038,
                     0.8858, 0.8849, 0.8077, 0.7573, 0.8995, 0.8222),
    'Ours': (0.8073, 0.9069, 0.8401, 0.7901, 0.8131, 0.8377, 0.7465, 0.8728, 0.7831, 0.8575,
             0.8605, 0.8494, 0.8123, 0.8915, 0.8335),
}
# Fang et al. Table 3 (mean CAM IoU on the box set), and the means its text gives (which differ
# from the means of its own rows).
PAPER004_TABLE3 = {
    'FE': (0.1713, 0.5515, 0.3242, 0.3819, 0.1768, 0.0460, 0.3097, 0.3345),
    'FE w/o MA': (0.1212, 0.4430, 0.3258, 0.2783, 0.1429, 0.0418, 0.2328, 0.2640),
}
PAPER004_TABLE3_TEXT_MEANS = {'FE': 0.3014, 'FE w/o MA': 0.2437}


def paper004_reference_markdown(aurocs: Mapping[str, Mapping[str, Any]],
                                localization_results: Mapping[str, Mapping[str, Any]]) -> str:
  """Our runs beside paper 004's published Table 2 and Table 3.

  Args:
    aurocs: {column label: `compute_metrics` dict} of our runs (test split).
    localization_results: {column label: `localization_metrics` dict} of the runs that have
      them (Table 3: msa_densenet = FE, densenet121 = FE w/o MA).
  """
  header = [*(f'ours: {c}' for c in aurocs), *(f'paper: {c}' for c in PAPER004_TABLE2)]
  rows = []
  for i, c in enumerate((*_NIH14, 'Average')):
    ours = [m['mean_auroc'] if c == 'Average' else m['auroc'].get(c) for m in aurocs.values()]
    rows.append([c, *(fmt(v, 4) for v in ours),
                 *(f'{v[i]:.4f}' for v in PAPER004_TABLE2.values())])
  parts = ['## Paper 004 Table 2: per-class AUROC, ours beside the paper\'s', '',
           md_table(['Class', *header], rows), '',
           'Paper columns: Fang et al. Table 2 (NIH ChestX-ray14 benchmark split, 25,596 test '
           'images); ours: the runs above on their own data (a phantom demo is not comparable).',
           '']
  from cxr_jax.labels import BOX_CLASSES
  t3_rows = []
  for label, m in localization_results.items():
    values = [m['per_class'][c]['mean_iou'] if c in m['per_class'] else None for c in BOX_CLASSES]
    # The mean of the per-class values, as for the paper's rows (the run's own mean pools the
    # boxes of all classes, which weighs the frequent classes more).
    defined = [v for v in values if v is not None and not np.isnan(v)]
    t3_rows.append([f'ours: {label}', *(fmt(v, 4) for v in values),
                    fmt(float(np.mean(defined)) if defined else None, 4), ''])
  for label, values in PAPER004_TABLE3.items():
    t3_rows.append([f'paper: {label}', *(f'{v:.4f}' for v in values),
                    f'{np.mean(values):.4f}', f'{PAPER004_TABLE3_TEXT_MEANS[label]:.4f}'])
  parts += ['## Paper 004 Table 3: mean CAM IoU per class on the box split', '',
            md_table(['Model', *BOX_CLASSES, 'Mean of rows', 'Mean (paper text)'], t3_rows), '',
            'FE = the multi-scale attention DenseNet (msa_densenet), FE w/o MA = the plain '
            'DenseNet (densenet121). Ours: GT-blind boxes from the CAM (cxr_jax/explain/boxes.py)'
            '; the paper\'s released code instead places boxes of the ground-truth size at CAM '
            'peaks and keeps the best IoU. The paper\'s text gives means (0.3014 vs 0.2437) '
            'that differ from the means of its own rows (0.2870 vs 0.2312); both are shown.', '']
  return '\n'.join(parts)

# ------------------------------------------------------------------------------ paper 002
def display_image(image: np.ndarray) -> np.ndarray:
  """A model input [H, W, C] (any normalisation) -> grey [H, W] in [0, 1] for figures."""
  grey = np.asarray(image, np.float64).mean(axis=-1) if np.ndim(image) == 3 else np.asarray(
      image, np.float64)
  lo, hi = float(grey.min()), float(grey.max())
  return (grey - lo) / (hi - lo) if hi > lo else np.zeros_like(grey)


def anchor_figure(anchor: np.ndarray, used: int, requested: int) -> Figure:
  """The anchor image (paper 002, Fig. 5): the mean of `used` 'No Finding' images."""
  fig = Figure(figsize=(3.6, 3.9), layout='constrained')
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  ax.imshow(display_image(anchor), cmap='gray')
  ax.set_title(f'anchor: mean of {used} normal images' +
               (f'\n(asked for {requested})' if used < requested else ''), fontsize=9)
  ax.axis('off')
  return fig


def alignment_figure(anchor: np.ndarray, originals: np.ndarray, aligned: np.ndarray,
                     ids: Sequence[str]) -> Figure:
  """Paper 002 Fig. 4: (a) original images, (b) the same aligned; the anchor on the left.

  originals, aligned: [N, H, W, C] model inputs; the anchor [H, W, C]. Each image has the
  anchor's outline (its edges) drawn over it in red so that the alignment can be judged.
  """
  n = len(originals)
  fig = Figure(figsize=(2.1 * (n + 1), 4.6), layout='constrained')
  FigureCanvasAgg(fig)
  axes = fig.subplots(2, n + 1, squeeze=False)
  a = display_image(anchor)
  edges = np.hypot(*np.gradient(a))
  outline = np.ma.masked_less(edges, np.percentile(edges, 90))
  for row, (images, label) in enumerate(((originals, '(a) original'), (aligned, '(b) aligned'))):
    axes[row, 0].imshow(a, cmap='gray')
    axes[row, 0].set_title('anchor' if row == 0 else '', fontsize=8)
    axes[row, 0].set_ylabel(label)
    for i in range(n):
      ax = axes[row, i + 1]
      ax.imshow(display_image(images[i]), cmap='gray')
      ax.imshow(outline, cmap='autumn', alpha=0.5)
      if row == 0:
        ax.set_title(str(ids[i])[:22], fontsize=6)
    for ax in axes[row]:
      ax.set_xticks([])
      ax.set_yticks([])
  axes[0, 0].set_ylabel('(a) original')
  axes[1, 0].set_ylabel('(b) aligned')
  return fig


def disease_masks_figure(masks: np.ndarray, classes: Sequence[str], counts: Sequence[int | None],
                         background: np.ndarray | None, title: str) -> Figure:
  """Paper 002 Fig. 3 (or Fig. 7 for pseudo masks): one panel per class with a mask, the mask
  in jet over the anchor; the title gives the number of images that entered it."""
  shown = [k for k in range(len(classes)) if np.any(masks[k] > 0)] or list(range(len(classes)))
  ncols = min(4, len(shown))
  nrows = -(-len(shown) // ncols)
  fig = Figure(figsize=(2.8 * ncols, 3.0 * nrows + 0.4), layout='constrained')
  FigureCanvasAgg(fig)
  for i, k in enumerate(shown):
    ax = fig.add_subplot(nrows, ncols, i + 1)
    if background is not None:
      ax.imshow(display_image(background), cmap='gray')
    ax.imshow(np.ma.masked_equal(masks[k], 0), cmap='jet', vmin=0, vmax=1,
              alpha=0.55 if background is not None else 1.0)
    n = counts[k]
    ax.set_title(f'{classes[k]}' + ('' if n is None or n < 0 else f' (n={n})'), fontsize=9)
    ax.axis('off')
  fig.suptitle(title, fontsize=10)
  return fig


def alignment_markdown(summary: Mapping[str, Any]) -> str:
  """The align stage's numbers: anchor-to-image error before/after, transform statistics."""
  e = summary['error']
  rows = [[name, fmt(e['before'][key], 4), fmt(e['after'][key], 4),
           fmt(e['after'][key] - e['before'][key], 4)]
          for key, name in (('sharp', 'sharp images'), ('smoothed', 'smoothed, B(G(.))'))]
  stats = summary['params']
  prow = [[n, fmt(stats[n]['mean'], 3), fmt(stats[n]['std'], 3), fmt(stats[n]['min'], 3),
           fmt(stats[n]['max'], 3)] for n in stats]
  return '\n'.join([
      f'Anchor-to-image error on the {summary["error_split"]!r} split ({e["num_images"]} '
      'images): mean over images of the per-pixel L2 distance to the anchor (eq. 8 divided by '
      'the number of pixels), before and after the alignment.', '',
      md_table(['', 'before', 'after', 'change'], rows), '',
      f'Transform parameters over {summary["num_images"]} images ({", ".join(summary["splits"])}):',
      '', md_table(['parameter', 'mean', 'std', 'min', 'max'], prow), ''])


def disease_masks_markdown(summary: Mapping[str, Any]) -> str:
  """How many images entered each class's mask, and what happened to classes without one."""
  rows = []
  for c, s in summary['per_class'].items():
    rows.append([c, str(s.get('positives', '—')), str(s.get('images', '—')),
                 fmt(s.get('mask_mean'), 3), fmt(s.get('mask_area'), 3), s.get('note', '')])
  return '\n'.join([
      md_table(['Class', 'positives', 'images in the mask (N_c)', 'mean psi', 'area psi > 0',
                'note'], rows), ''])


def box_class_auroc_markdown(results: Mapping[str, Mapping[str, Any]],
                             box_classes: Sequence[str]) -> str:
  """Paper 002 Table 4: AUROC on the eight classes with boxes, one row per model, and their
  mean (over the classes with a defined AUROC)."""
  present = [c for c in box_classes if any(c in m['auroc'] for m in results.values())]
  heads = [localization.ABBREVIATIONS.get(c, c) for c in present]
  rows = []
  for name, m in results.items():
    values = [m['auroc'].get(c) for c in present]
    defined = [v for v in values if v is not None and not math.isnan(v)]
    rows.append([name, *(fmt(v, 2) for v in values),
                 fmt(float(np.mean(defined)) if defined else None, 2)])
  return md_table(['Model', *heads, 'Mean'], rows)
