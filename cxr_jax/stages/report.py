"""The `report` stage: everything the earlier stages left, in the papers' format, in one go.

One column (or row) per `config.report_models` entry, e.g. paper 000's Table II with the model
without attention and the attention-guided one side by side. The report's Markdown is composed
whole from what the stages wrote (evaluate: metrics, predictions, per-class thresholds;
localize: localisation tables and overlays; explain: heat maps) and every file of the report
folder is written together (cxr_jax/io_utils.py): a failure leaves the previous report as it
was, and nothing is ever appended to a file already written.
"""

import json
from typing import Any

import ml_collections
from etils import epath

from cxr_jax import config_lib, layout, reporting
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


def _segmentation_section(config: ml_collections.ConfigDict, run: layout.Run,
                          files: dict[epath.Path, Any]) -> tuple[str, dict[str, Any]]:
  """Paper 004's segmentation results (evaluate_segmentation) -> (Markdown, metrics for
  metrics.json: flat 'dice_<structure>' / 'jaccard_<structure>' test means of the first
  segmentation stage, then every stage's metrics per split)."""
  from cxr_jax.stages.segmentation import segmentation_stages
  results: dict[str, dict[str, Any]] = {}
  for stage in segmentation_stages(config):
    splits = {}
    for name in config_lib.stage_config(config, stage).data.eval_splits:
      found = run.read_segmentation(stage, name)
      if found is not None:
        splits[name] = found
    if splits:
      results[stage] = splits
  if not results:
    return '', {}
  first = next(iter(results.values()))
  summary = reporting.segmentation_summary(first['test']) if 'test' in first else {}
  lines = ['', '# Lung and heart segmentation (paper 004, U-Net)', '',
           reporting.segmentation_markdown(results), '']
  folder = run.report_file('segmentation_overlays')
  for stage in results:
    overlays_dir = run.segmentation_overlays_dir(stage)
    if overlays_dir.exists():
      for png in sorted(overlays_dir.glob('*.png')):
        name = f'{stage}.{png.name}'
        files[folder / name] = png.read_bytes()
        lines.append(f'![{stage}: {png.name}]({folder.name}/{name})')
  return '\n'.join(lines) + '\n', {**summary, 'segmentation': results}


@STAGES.register('report')
def report_stage(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """Tables in the papers' format, metrics (JSON) and ROC curves of the test split in report/."""
  if not is_chief():
    return
  if config.evaluator == 'single_label_classification':
    from cxr_jax.stages import single_label_report
    single_label_report.write_report(config, workdir)
    return
  run = layout.Run(workdir)
  files: dict[epath.Path, Any] = {}
  segmentation, seg_metrics = _segmentation_section(config, run, files)
  if not config.report_models:  # a segmentation run (configs/lung_heart_unet.py)
    if not seg_metrics:
      raise ValueError(f'{run.root}: nothing to report: config.report_models is empty and no '
                       'evaluate_segmentation results were found.')
    files[run.report_file('metrics')] = json_text(
        {'title': f'{config.name}: {config.data.name}', **seg_metrics}, sort_keys=False)
    files[run.report_file('markdown')] = f'# {config.name}: {config.data.name}\n' + segmentation
    atomic_write_files(files)
    return
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
  files.update({run.report_file(kind): produced[kind] for kind in ('metrics', 'roc', 'confusion')})
  if seg_metrics:
    files[run.report_file('metrics')] = lambda: json_text(
        {**json.loads(produced['metrics']()), 'segmentation': seg_metrics}, sort_keys=False)
  sections = [_localization_section(config, run, files), _heatmaps_section(run, files),
              segmentation, disease_masks.report_section(config, run, results, files)]
  if thresholds:
    files[run.report_file('thresholds')] = reporting.thresholds_csv(thresholds)
    sections.insert(0, '\n' + reporting.thresholds_markdown(results, thresholds, classes))
  files[run.report_file('markdown')] = lambda: produced['markdown']() + ''.join(sections)
  atomic_write_files(files)
