"""The report of a single-label run (config.evaluator = 'single_label_classification'), called
by the `report` stage: test metrics in paper 003's terms with 95 % intervals, ROC, the
cross-validation summary when the run cross-validated, and paper 003's figures (stage
`activations`). Every file of report/ is written together (cxr_jax/io_utils.py)."""

from typing import Any

import ml_collections
import numpy as np
from etils import epath

from cxr_jax import layout
from cxr_jax import reporting_single_label as R
from cxr_jax.io_utils import atomic_write_files, json_text


def _activations_section(run: layout.Run, files: dict[epath.Path, Any]) -> str:
  index = run.read_activations_index()
  if index is None:
    return ''
  folder = run.report_file('activations')
  lines = ['', f'# Filters and salient activations (paper 003, Fig. 2-4; last convolution '
           f'{index["layer"]!r})', '',
           'Fig. 2: filters of ' + ', '.join(index['filter_layers']) + ' (weights where the '
           'input has 1 or 3 channels, else images maximising each channel) and the FC3 class '
           'visualisation. Fig. 3/4: post-ReLU activations of the last convolution scaled to '
           '[0, 1], the strongest channel, and its heat map (discrete jet, red above the '
           'threshold, zero transparent) over the test image the model saw.', '']
  for label, entry in index['models'].items():
    names = [entry['filters']] + [e['file'] for e in entry['images']]
    for name in names:
      files[folder / name] = (run.activations_dir / name).read_bytes()
    lines += [f'## {label}', ''] + R.image_links(names, folder.name) + ['']
  return '\n'.join(lines)


def write_report(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """The Markdown report, metrics JSON and ROC plot (+ per-fold CSV, figures) in report/."""
  run = layout.Run(workdir)
  title = f'{config.name}: {config.data.name}'
  files: dict[epath.Path, Any] = {}
  cv = None
  if config.get('cv') is not None and int(config.cv.folds) > 0:
    cv = run.read_cv_summary()
    results = {label: m['pooled'] for label, m in cv['models'].items()}
    labels, probs = {}, {}
    for label, m in cv['models'].items():
      parts = [run.cv_fold(i).read_predictions(m['stage'], 'test') for i in range(cv['folds'])]
      labels[label] = np.concatenate([p[1] for p in parts])
      probs[label] = np.concatenate([p[2] for p in parts])
    body = R.cv_markdown(cv)
    files[run.report_file('cv_folds')] = R.folds_csv(cv)
    roc_title = f'pooled out-of-fold, {cv["folds"]} folds'
  else:
    results, labels, probs = {}, {}, {}
    for stage, label in config.report_models:
      results[label] = run.read_metrics(stage, 'test')
      _, labels[label], probs[label] = run.read_predictions(stage, 'test')
    body = R.metrics_markdown(results, f'{title}, test split')
    ref = R.reference_line(config.data.name)
    body += f'\n{ref}\n' if ref else ''
    roc_title = 'test split'
  files[run.report_file('metrics')] = json_text(R.metrics_payload(title, results, cv),
                                                sort_keys=False)
  files[run.report_file('roc')] = lambda: R.roc_png(labels, probs, results, roc_title)
  sections = body + '\n![ROC](' + run.report_file('roc').name + ')\n'
  sections += _activations_section(run, files)
  files[run.report_file('markdown')] = sections
  atomic_write_files(files)
