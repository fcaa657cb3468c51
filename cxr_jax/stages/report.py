"""The `report` stage: everything the earlier stages left, in the papers' format, in one go.

One column (or row) per `config.report_models` entry, e.g. paper 000's Table II with the model
without attention and the attention-guided one side by side. The report's Markdown is composed
whole from what the stages wrote (evaluate: metrics, predictions, per-class thresholds;
localize: localisation tables and overlays; explain: heat maps) and every file of the report
folder is written together (cxr_jax/io_utils.py): a failure leaves the previous report as it
was, and nothing is ever appended to a file already written.
"""

from typing import Any

import ml_collections
from etils import epath

from cxr_jax import layout, reporting
from cxr_jax.io_utils import atomic_write_files, json_text
from cxr_jax.stages import disease_masks
from cxr_jax.stages.base import STAGES, is_chief


def _localization_section(config: ml_collections.ConfigDict, run: layout.Run,
                          files: dict[epath.Path, Any]) -> str:
  results = {}
  for stage, label in config.report_models:
    found = run.read_localization(stage)
    if found is not None:
      results[label] = found
  if not results:
    return ''
  files[run.report_file('localization_json')] = json_text({'models': results})
  files[run.report_file('localization_csv')] = reporting.localization_csv(results)
  first = next(iter(results.values()))
  boxes = first['boxes']
  lines = ['', f'# Localisation on the {first["split"]!r} split ({first["method"]}, boxes: '
           f'{boxes.get("mode")} at {boxes.get("threshold")}, {boxes.get("normalize")} '
           'normalisation)', '', reporting.localization_markdown(results), '']
  folder = run.report_file('localization_overlays')
  for stage, label in config.report_models:
    overlays_dir = run.localize_overlays_dir(stage)
    if label in results and overlays_dir.exists():
      for png in sorted(overlays_dir.glob('*.png')):
        name = f'{stage}.{png.name}'
        files[folder / name] = png.read_bytes()
        lines.append(f'![{label}: {png.name}]({folder.name}/{name})')
  return '\n'.join(lines) + '\n'


def _heatmaps_section(run: layout.Run, files: dict[epath.Path, Any]) -> str:
  index = run.read_explain_index()
  if index is None:
    return ''
  folder = run.report_file('heatmaps')
  split = index.get('split')
  where = f' on {split!r} split images (never trained on or selected with)' if split else ''
  lines = ['', f'## Heat maps (Prediction Difference Analysis, {index["level"]} level){where}',
           '', 'Red boxes: ground truth. Colour: weight of evidence for the class in bits '
           '(positive = speaks for it). Attention figures show the recurrent attention weights '
           'of each step.', '']
  for record in index['images']:
    for name in record['files']:
      files[folder / name] = (run.explain_dir / name).read_bytes()
      lines.append(f'![{name}]({folder.name}/{name})')
    lines.append('')
  return '\n'.join(lines)


@STAGES.register('report')
def report_stage(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """Tables in the papers' format, metrics (JSON) and ROC curves of the test split in report/."""
  if not is_chief():
    return
  run = layout.Run(workdir)
  results, labels, probs, thresholds = {}, {}, {}, {}
  for stage, label in config.report_models:
    results[label] = run.read_metrics(stage, 'test')
    _, labels[label], probs[label] = run.read_predictions(stage, 'test')
    saved = run.read_thresholds(stage)
    if saved is not None:
      thresholds[label] = saved
  classes = tuple(config.data.classes)
  produced = reporting.classification_files(
      results, labels, probs, classes, title=f'{config.name}: {config.data.name} test split')
  files: dict[epath.Path, Any] = {run.report_file(kind): produced[kind]
                                  for kind in ('metrics', 'roc', 'confusion')}
  sections = [_localization_section(config, run, files), _heatmaps_section(run, files),
              disease_masks.report_section(config, run, results, files)]
  if thresholds:
    files[run.report_file('thresholds')] = reporting.thresholds_csv(thresholds)
    sections.insert(0, '\n' + reporting.thresholds_markdown(results, thresholds, classes))
  files[run.report_file('markdown')] = lambda: produced['markdown']() + ''.join(sections)
  atomic_write_files(files)
