"""A method is an ordered list of stages; this module runs them.

Each stage is a function `(config, workdir) -> None` registered by name that writes under
`workdir/<stage>/` and reads what earlier stages wrote there. A stage that finished writes
`workdir/<stage>/DONE.json` last, so a rerun skips it; an interrupted stage resumes from its
own checkpoints.
"""

import json
import time
from collections.abc import Callable, Sequence

import jax
import ml_collections
from absl import logging
from etils import epath

from cxr_jax import evaluate, train
from cxr_jax.evaluators import EVALUATORS, Predictions
from cxr_jax.io_utils import atomic_write_json, atomic_write_text
from cxr_jax.registry import Registry

StageFn = Callable[[ml_collections.ConfigDict, epath.Path], None]
STAGES: Registry[StageFn] = Registry('stage')

DONE = 'DONE.json'


def _is_chief() -> bool:
  return jax.process_index() == 0


@STAGES.register('train')
def train_stage(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """Trains the classifier; keeps the best checkpoint by `config.best_metric` on validation."""
  train.train_and_evaluate(config, workdir / 'train')


@STAGES.register('evaluate')
def evaluate_stage(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """Runs the best checkpoint of `train` on every eval split; saves predictions and metrics."""
  model, variables = train.restore_best_variables(config, workdir / 'train')
  out = workdir / 'evaluate'
  for name, split in config.data.eval_splits.items():
    evaluator = EVALUATORS.get(config.evaluator)(
        train.make_predict_fn(model), config.data, split, batch_size=config.eval_batch_size,
        mesh=train.parallel.make_mesh(), class_names=tuple(config.data.classes),
        threshold=config.threshold)
    metrics, preds = evaluator.run(variables)
    if _is_chief():
      preds.save(str(out / f'predictions_{name}.npz'))
      atomic_write_json(str(out / f'metrics_{name}.json'), metrics)
    logging.info('%s (%s): mean AUROC %.4f, F1 %.4f on %d images.', name, split,
                 metrics['mean_auroc'], metrics['f1'], metrics['num_examples'])


@STAGES.register('report')
def report_stage(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """Tables (paper format), metrics.json and ROC curves of the test split in `report/`."""
  preds = Predictions.load(str(workdir / 'evaluate' / 'predictions_test.npz'))
  metrics = json.loads((workdir / 'evaluate' / 'metrics_test.json').read_text())
  label = config.get('report_label', config.name)
  if _is_chief():
    evaluate.write_report(str(workdir / 'report'), {label: metrics}, {label: preds.labels},
                          {label: preds.probs}, tuple(config.data.classes),
                          title=f'{config.name}: {config.data.name} test split')


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
