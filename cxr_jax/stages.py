"""A method is an ordered list of stages; this module runs them.

Each stage is a function `(config, workdir) -> None` registered by name that writes under
`workdir/<stage>/` and reads what earlier stages wrote there. A stage that finished writes
`workdir/<stage>/DONE.json` last, so a rerun skips it; an interrupted stage resumes from its
own checkpoints.
"""

import copy
import json
import time
from collections.abc import Callable, Sequence

import jax
import ml_collections
from absl import logging
from etils import epath

from cxr_jax import evaluate, hard_examples, train
from cxr_jax.evaluators import EVALUATORS, Predictions
from cxr_jax.io_utils import atomic_write_json, atomic_write_text
from cxr_jax.registry import Registry

StageFn = Callable[[ml_collections.ConfigDict, epath.Path], None]
STAGES: Registry[StageFn] = Registry('stage')

DONE = 'DONE.json'


def _is_chief() -> bool:
  return jax.process_index() == 0


def stage_config(config: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
  """`config` with the top-level fields in `config.stage_overrides.<stage>` replaced wholesale.

  A method with two training stages keeps stage 1's settings at the top level and lists what
  stage 2 changes under its name, e.g. `config.stage_overrides.train_attention.model`.
  """
  overrides = config.stage_overrides.get(stage)
  if not overrides:
    return config
  cfg = copy.deepcopy(config)
  with cfg.unlocked():
    for key, value in overrides.items():
      if key not in cfg or key == 'stage_overrides':
        raise ValueError(f'config.stage_overrides.{stage}.{key}: not a config field that a '
                         'stage can override.')
      cfg[key] = copy.deepcopy(value)
  return cfg


def _train_stage(name: str) -> StageFn:
  def run_stage(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
    train.train_and_evaluate(stage_config(config, name), workdir / name)
  run_stage.__doc__ = (f'Trains the model of `config` (+ `config.stage_overrides.{name}`) '
                       f'in {name}/.')
  return run_stage


# Stage 1 of every method; paper 000 adds the recurrent attention branch as stage 2.
STAGES.register('train_classifier')(_train_stage('train_classifier'))
STAGES.register('train_attention')(_train_stage('train_attention'))


@STAGES.register('mine_hard_examples')
def mine_hard_examples_stage(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """Paper 001 stage 1 -> 2: hard positives of the train split (cxr_jax/hard_examples.py)."""
  hard_examples.mine_stage(config, workdir)


@STAGES.register('train_hard_examples')
def train_hard_examples_stage(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """Paper 001 stage 2: trains on C = A + B (the mined hard positives repeated) in
  train_hard_examples/; from scratch unless `config.stage_overrides.train_hard_examples.init_from`
  says otherwise."""
  cfg = stage_config(config, 'train_hard_examples')
  if cfg is config:
    cfg = copy.deepcopy(config)
  with cfg.unlocked():
    cfg.data.extra_copies = str(workdir / 'mine_hard_examples' / hard_examples.HARD_EXAMPLES)
  train.train_and_evaluate(cfg, workdir / 'train_hard_examples')


@STAGES.register('evaluate')
def evaluate_stage(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """Runs the best checkpoint of every `config.report_models` stage on every eval split."""
  mesh = train.parallel.make_mesh()
  for stage, _ in config.report_models:
    model, variables = train.restore_best_variables(workdir / stage)
    info = train.load_model_info(workdir / stage)
    out = workdir / 'evaluate' / stage
    for name, split in config.data.eval_splits.items():
      evaluator = EVALUATORS.get(config.evaluator)(
          train.make_predict_fn(model), config.data, split, batch_size=config.eval_batch_size,
          mesh=mesh, class_names=tuple(info['class_names']), threshold=info['threshold'])
      metrics, preds = evaluator.run(variables)
      if _is_chief():
        preds.save(str(out / f'predictions_{name}.npz'))
        atomic_write_json(str(out / f'metrics_{name}.json'), metrics)
      logging.info('%s on %s (%s): mean AUROC %s, F1 %.4f on %d images.', stage, name, split,
                   metrics['mean_auroc'], metrics['f1'], metrics['num_examples'])


@STAGES.register('explain')
def explain_stage(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """PDA heat maps (and attention maps) of every reported model: paper 000 Fig. 2/3."""
  from cxr_jax.explain import pda_figures  # imports TF-side data code only when used
  pda_figures.explain_stage(config, workdir)


@STAGES.register('localize')
def localize_stage(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """CAM / Grad-CAM boxes of every reported model against the experts' boxes (papers 001, 002,
  004): IoU, IoBB, accuracy at T(IoU), in localize/<stage>/."""
  from cxr_jax.explain import localize  # imports matplotlib and TF-side data code when used
  localize.localize_stage(config, workdir)


@STAGES.register('report')
def report_stage(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """Tables in the papers' format, metrics.json and ROC curves of the test split in `report/`.

  One column (or row) per `config.report_models` entry, e.g. paper 000's Table II with the
  model without attention and the attention-guided one side by side.
  """
  results, labels, probs = {}, {}, {}
  for stage, label in config.report_models:
    src = workdir / 'evaluate' / stage
    preds = Predictions.load(str(src / 'predictions_test.npz'))
    results[label] = json.loads((src / 'metrics_test.json').read_text())
    labels[label], probs[label] = preds.labels, preds.probs
  if _is_chief():
    report_dir = workdir / 'report'
    evaluate.write_report(str(report_dir), results, labels, probs, tuple(config.data.classes),
                          title=f'{config.name}: {config.data.name} test split')
    _add_localization(config, workdir, report_dir)
    _add_heatmaps(workdir / 'explain', report_dir)


def _add_localization(config: ml_collections.ConfigDict, workdir: epath.Path,
                      report_dir: epath.Path) -> None:
  """Localisation tables (papers 002/004 formats) of the models the localize stage ran."""
  results = {}
  for stage, label in config.report_models:
    path = workdir / 'localize' / stage / 'localization.json'
    if path.exists():
      results[label] = json.loads(path.read_text())
  if not results:
    return
  from cxr_jax.explain import localization
  atomic_write_json(str(report_dir / 'localization.json'), {'models': results})
  atomic_write_text(str(report_dir / 'localization.csv'), localization.csv_table(results))
  first = next(iter(results.values()))
  lines = ['', f'# Localisation on the {first["split"]!r} split ({first["method"]}, boxes: '
           f'{first["boxes"]})', '', localization.markdown_tables(results), '']
  for stage, label in config.report_models:
    overlays_dir = workdir / 'localize' / stage / 'overlays'
    if label in results and overlays_dir.exists():
      (report_dir / 'localization').mkdir(parents=True, exist_ok=True)
      for png in sorted(overlays_dir.glob('*.png')):
        name = f'{stage}.{png.name}'
        png.copy(report_dir / 'localization' / name, overwrite=True)
        lines.append(f'![{label}: {png.name}](localization/{name})')
  report_md = report_dir / 'report.md'
  atomic_write_text(str(report_md), report_md.read_text() + '\n'.join(lines) + '\n')


def _add_heatmaps(explain_dir: epath.Path, report_dir: epath.Path) -> None:
  """Copies the explain stage's figures into report/heatmaps/ and links them in report.md."""
  index_path = explain_dir / 'index.json'
  if not index_path.exists():
    return
  index = json.loads(index_path.read_text())
  (report_dir / 'heatmaps').mkdir(parents=True, exist_ok=True)
  lines = ['', f'## Heat maps (Prediction Difference Analysis, {index["level"]} level)', '',
           'Red boxes: ground truth. Colour: weight of evidence for the class in bits '
           '(positive = speaks for it). Attention figures show the recurrent attention weights '
           'of each step.', '']
  for record in index['images']:
    for name in record['files']:
      (explain_dir / name).copy(report_dir / 'heatmaps' / name, overwrite=True)
      lines.append(f'![{name}](heatmaps/{name})')
    lines.append('')
  report_md = report_dir / 'report.md'
  atomic_write_text(str(report_md), report_md.read_text() + '\n'.join(lines))


def _config_diff(old: dict, new: dict, prefix: str = '') -> list[str]:
  diffs = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k), new.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      diffs += _config_diff(a, b, f'{prefix}{k}.')
    elif a != b:
      diffs.append(f'{prefix}{k}: {a!r} -> {b!r}')
  return diffs


def run(config: ml_collections.ConfigDict, workdir: str | epath.Path,
        only: Sequence[str] | None = None, rerun: bool = False) -> None:
  """Runs `config.stages` (or the subset `only`, in config order), skipping finished ones."""
  workdir = epath.Path(workdir)
  unknown = [s for s in (only or []) if s not in config.stages]
  if unknown:
    raise ValueError(f'--stages: {unknown} not in this config\'s stages {list(config.stages)}.')
  fns = [(name, STAGES.get(name)) for name in config.stages]
  workdir.mkdir(parents=True, exist_ok=True)
  config_json = json.loads(config.to_json_best_effort())
  saved = workdir / 'config.json'
  if saved.exists():
    diffs = _config_diff(json.loads(saved.read_text()), config_json)
    if diffs:
      logging.warning('Config differs from the one %s was started with; finished stages are '
                      'not rerun (use --rerun):\n  %s', workdir, '\n  '.join(diffs))
  if _is_chief():
    atomic_write_json(str(saved), config_json)
  for name, fn in fns:
    if only and name not in only:
      continue
    done = workdir / name / DONE
    if done.exists() and not rerun:
      logging.info('Stage %s already finished (%s); skipping.', name, done)
      continue
    logging.info('=== Stage %s -> %s', name, workdir / name)
    t0 = time.time()
    (workdir / name).mkdir(parents=True, exist_ok=True)
    fn(config, workdir)
    if _is_chief():
      atomic_write_text(str(done), json.dumps({'seconds': round(time.time() - t0, 1),
                                               'finished': time.strftime('%Y-%m-%d %H:%M:%S')}))
    logging.info('=== Stage %s done in %.1fs.', name, time.time() - t0)
