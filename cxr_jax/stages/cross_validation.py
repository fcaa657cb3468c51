"""The `cross_validate` stage: k-fold, patient-level, stratified cross-validation of a
single-label classifier (config.cv; folds from cxr_jax/data/folds.py).

Each fold is a whole run of its own under the workdir (`layout.Run.cv_fold`): its config is this
one with `data.split_ids` naming the fold's split file, `cv.folds = 0` and `stages =
cv.stages` (train_classifier + evaluate by default), so every tool that reads a run (predict,
report, the viewer) reads a fold too, and an interrupted cross-validation resumes fold by fold
(finished folds are skipped, a fold's training resumes from its checkpoints). Afterwards the
summary (`layout.Run.cv_summary_file`) holds each fold's test metrics (at the operating point
chosen on that fold's validation split), their mean and sd, and the metrics of the pooled
out-of-fold predictions with bootstrap intervals; the `report` stage renders it.
"""

import copy
import time

import ml_collections
import numpy as np
from absl import logging
from etils import epath

from cxr_jax import layout, single_label
from cxr_jax.data import folds as folds_lib
from cxr_jax.stages.base import STAGES, is_chief


def fold_config(config: ml_collections.ConfigDict, split_ids: epath.Path
                ) -> ml_collections.ConfigDict:
  """The config of one fold's run."""
  cfg = copy.deepcopy(config)
  with cfg.unlocked():
    cfg.cv.folds = 0
    cfg.data.split_ids = str(split_ids)
    cfg.stages = tuple(config.cv.stages)
    cfg.report_models = tuple((s, label) for s, label in config.report_models
                              if s in cfg.stages)
  return cfg


def summarize(run: layout.Run, config: ml_collections.ConfigDict, k: int) -> dict:
  """Per-fold test metrics, mean +- sd over folds, pooled out-of-fold metrics (first model)."""
  models = {}
  for stage, label in config.report_models:
    if stage not in config.cv.stages:
      continue
    per_fold, ids, labels, probs = [], [], [], []
    for i in range(k):
      fold = run.cv_fold(i)
      per_fold.append(fold.read_metrics(stage, 'test'))
      fold_ids, fold_labels, fold_probs = fold.read_predictions(stage, 'test')
      ids += fold_ids
      labels.append(fold_labels)
      probs.append(fold_probs)
    labels_all, probs_all = np.concatenate(labels), np.concatenate(probs)
    names = per_fold[0]['class_names']
    # Pooled out of fold: AUROC of the pooled scores; accuracy, sensitivity, ... of each fold's
    # own decisions (at the threshold chosen on its validation split), pooled.
    scores = single_label.compute_metrics(labels_all, probs_all, names, threshold=0.5)
    decided = np.concatenate([_decisions(p, m) for p, m in zip(probs, per_fold, strict=True)])
    pooled = single_label.compute_metrics(labels_all, decided, names, threshold=0.5)
    pooled['auroc'], pooled['ci']['auroc'] = scores['auroc'], scores['ci']['auroc']
    pooled['threshold'] = [m['threshold'] for m in per_fold]
    pooled['loss'] = scores['loss']
    models[label] = {
        'stage': stage, 'folds': per_fold, 'aggregate': single_label.aggregate_folds(per_fold),
        'pooled': pooled, 'image_ids': ids,
        'num_examples': int(len(labels_all))}
  return {'folds': k, 'seed': int(config.cv.seed), 'pool': config.cv.pool,
          'data': config.data.name, 'models': models}


def _decisions(probs: np.ndarray, metrics: dict) -> np.ndarray:
  """A fold's decisions at its threshold as 0/1 'probabilities' in the predictions' layout
  (K = 1: [N, 1]; K = 2: [N, 2]); K > 2: one-hot argmax."""
  k = probs.shape[1]
  if k > 2:
    return np.eye(k)[np.argmax(probs, 1)]
  positive = (single_label.positive_scores(probs) > metrics['threshold']).astype(np.float64)
  return positive[:, None] if k == 1 else np.stack([1 - positive, positive], 1)


@STAGES.register('cross_validate')
def cross_validate_stage(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """Runs `config.cv.stages` once per fold in cv/fold_<i>/ and writes the summary."""
  from cxr_jax import stages  # the runner; imported here, it imports this module
  k = int(config.cv.folds)
  run = layout.Run(workdir)
  examples = folds_lib.list_examples(config.data, config.cv.pool)
  fold = folds_lib.assign_folds(examples['label'], examples['patient_id'], k, config.cv.seed)
  timings = []
  for i in range(k):
    t0 = time.time()
    if is_chief():
      run.write_split_ids(i, folds_lib.fold_splits(examples, fold, i, k, config.cv.pool))
    logging.info('=== Cross-validation fold %d/%d -> %s', i + 1, k, run.cv_fold(i).root)
    stages.run(fold_config(config, run.split_ids_file(i)), run.cv_fold(i).root)
    timings.append(round(time.time() - t0, 1))
  summary = summarize(run, config, k)
  summary['fold_seconds'] = timings
  if is_chief():
    run.write_cv_summary(summary)
  for label, m in summary['models'].items():
    agg = m['aggregate']
    logging.info('%s, %d-fold CV: accuracy %.3f +- %.3f, AUROC %s', label, k,
                 agg['accuracy']['mean'], agg['accuracy']['sd'] or 0.0, agg['auroc']['mean'])
