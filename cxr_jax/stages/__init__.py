"""A method is an ordered list of stages; this package runs them.

Each stage is a function `(config, workdir) -> None` registered by name in `STAGES` that writes
under the workdir and reads what earlier stages wrote there (file layout: cxr_jax/layout.py). A
stage that finished is marked done last, so a rerun skips it; an interrupted training stage
resumes from its own checkpoints.

- training.py: `train_classifier`, `train_attention`, `train_hard_examples` (the loop).
- evaluation.py: `evaluate` (metrics, predictions, per-class thresholds), `mine_hard_examples`.
- localize.py, explain.py: heat maps against the experts' boxes; PDA figures.
- ood.py: `fit_ood`, the viewer's out-of-distribution gate of each model.
- cross_validation.py: `cross_validate` (paper 003: k folds, each a run of its own).
- activations.py: `activations` (paper 003's filter, activation and heat map figures).
- segmentation.py: paper 004's `evaluate_segmentation` (Dice/Jaccard) and `segment` (the
  mask cache a classifier reads); `train_segmenter` is in training.py.
- alignment.py, disease_masks.py: paper 002's anchor, alignment and disease-mask stages.
- report.py: the report of everything above, written in one go.
"""

import copy
import json
import time
from collections.abc import Sequence

import jax
import ml_collections
from absl import logging
from etils import epath

from cxr_jax import errors, layout, preemption
from cxr_jax.config_lib import expand_workdir, stage_config
from cxr_jax.stages import (
  activations,
  alignment,
  cross_validation,
  disease_masks,
  evaluation,
  explain,
  localize,
  ood,
  report,
  segmentation,
  training,
)
from cxr_jax.stages.base import STAGES, StageFn, is_chief

__all__ = ['STAGES', 'StageFn', 'activations', 'alignment', 'cross_validation', 'disease_masks',
           'evaluation', 'explain', 'is_chief', 'localize', 'ood', 'report', 'run',
           'segmentation', 'stage_config', 'training']


def _config_diff(old: dict, new: dict, prefix: str = '') -> list[str]:
  diffs = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k), new.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      diffs += _config_diff(a, b, f'{prefix}{k}.')
    elif a != b:
      diffs.append(f'{prefix}{k}: {a!r} -> {b!r}')
  return diffs


def _resolve_mask_cache(config: ml_collections.ConfigDict, run_dir: layout.Run
                        ) -> ml_collections.ConfigDict:
  """config.data.mask_cache 'segment' (this run's segment stage) -> its folder."""
  if config.data.get('mask_cache') != segmentation.SEGMENT_STAGE:
    return config
  if segmentation.SEGMENT_STAGE not in config.stages:
    raise ValueError("config.data.mask_cache='segment' reads this run's segment stage, which is "
                     f'not in config.stages {list(config.stages)}: add it, or name the folder '
                     'of a mask cache.')
  config = copy.deepcopy(config)
  with config.unlocked():
    config.data.mask_cache = str(run_dir.mask_cache_dir)
  return config


def run(config: ml_collections.ConfigDict, workdir: str | epath.Path,
        only: Sequence[str] | None = None, rerun: bool = False) -> None:
  """Runs `config.stages` (or the subset `only`, in config order), skipping finished ones."""
  workdir = epath.Path(workdir)
  config = expand_workdir(config, workdir)  # '{workdir}' in config strings -> this run
  run_dir = layout.Run(workdir)
  unknown = [s for s in (only or []) if s not in config.stages]
  if unknown:
    raise ValueError(f'--stages: {unknown} not in this config\'s stages {list(config.stages)}.')
  fns = [(name, STAGES.get(name)) for name in config.stages]
  workdir.mkdir(parents=True, exist_ok=True)
  config_json = json.loads(config.to_json_best_effort())
  if run_dir.has_config():
    diffs = _config_diff(run_dir.read_config_json(), config_json)
    if diffs:
      logging.warning('Config differs from the one %s was started with; finished stages are '
                      'not rerun (use --rerun):\n  %s', workdir, '\n  '.join(diffs))
  if is_chief():
    run_dir.write_config_json(config_json)
  config = _resolve_mask_cache(config, run_dir)
  with preemption.watch():
    for name, fn in fns:
      if only and name not in only:
        continue
      if run_dir.is_done(name) and not rerun:
        logging.info('Stage %s already finished (%s); skipping.', name, run_dir.done_file(name))
        continue
      signal_name = preemption.requested_anywhere()
      if signal_name:
        raise errors.Preempted(f'{signal_name} before stage {name}: the stages before it are '
                               'done; run the same command again to go on.')
      logging.info('=== Stage %s -> %s', name, run_dir.stage_dir(name))
      t0 = time.time()
      run_dir.stage_dir(name).mkdir(parents=True, exist_ok=True)
      fn(config, workdir)
      if is_chief():
        run_dir.mark_done(name, time.time() - t0)
      _barrier(f'stage {name}')
      logging.info('=== Stage %s done in %.1fs.', name, time.time() - t0)


def _barrier(name: str) -> None:
  """Every process waits here: a stage run by process 0 alone (localize, explain, report) has
  written its files before any process starts the next stage."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
