"""Stages that run trained models over whole splits: `evaluate` and paper 001's
`mine_hard_examples`."""

import jax
import ml_collections
from absl import logging
from etils import epath

from cxr_jax import hard_examples, inference, layout, parallel
from cxr_jax.evaluators import EVALUATORS, PER_CLASS, Predictions
from cxr_jax.stages.base import STAGES, is_chief
from cxr_jax.train_step import make_predict_fn

# The scalar threshold a 'per_class' run is also reported at (the papers' 0.5).
SCALAR_THRESHOLD = 0.5


def _restore_on_mesh(stage_dir: epath.Path, mesh: jax.sharding.Mesh):
  model, variables, info = inference.restore_model(stage_dir)
  return model, jax.device_put(variables, parallel.replicated(mesh)), info


@STAGES.register('evaluate')
def evaluate_stage(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """Runs the best checkpoint of every `config.report_models` stage on every eval split.

  With `config.threshold = 'per_class'`, thresholds are chosen on the validation split by
  `config.threshold_rule`, stored with the run (`layout.Run.write_thresholds`), and every split's
  metrics are computed at them; each metrics file then also holds the metrics at the scalar
  threshold 0.5 ('scalar_threshold') so the report can show both.
  """
  run = layout.Run(workdir)
  mesh = parallel.make_mesh()
  splits = dict(config.data.eval_splits.items())
  per_class = isinstance(config.threshold, str) and config.threshold == PER_CLASS
  if per_class and 'validation' not in splits:
    raise ValueError("config.threshold='per_class' needs a 'validation' entry in "
                     f'config.data.eval_splits to choose thresholds on; got {sorted(splits)}.')
  order = sorted(splits, key=lambda name: name != 'validation')  # thresholds before use
  inputs = {}
  for stage, _ in config.report_models:
    model, variables, info = _restore_on_mesh(run.stage_dir(stage), mesh)
    predict_fn = make_predict_fn(model, info.output)
    thresholds = config.threshold
    for name in order:
      evaluator = EVALUATORS.get(config.evaluator)(
          predict_fn, config.data, splits[name], batch_size=config.eval_batch_size, mesh=mesh,
          class_names=info.class_names, threshold=config.threshold,
          threshold_rule=config.threshold_rule, eval_input=inputs.get(name))
      preds = evaluator.predict(variables)
      inputs[name] = evaluator.input
      if per_class and name == 'validation':
        thresholds = evaluator.choose_thresholds(preds)
        if is_chief():
          run.write_thresholds(stage, {
              'rule': config.threshold_rule, 'split': splits[name],
              'thresholds': dict(zip(info.class_names, map(float, thresholds), strict=True))})
      result = evaluator.metrics(preds, threshold=thresholds)
      if per_class:
        result['scalar_threshold'] = evaluator.scalar_summary(preds, SCALAR_THRESHOLD)
      if is_chief():
        run.write_predictions(stage, name, preds.image_ids, preds.labels, preds.probs)
        run.write_metrics(stage, name, result)
      logging.info('%s on %s (%s): AUROC %s, F1 %s on %d images.', stage, name, splits[name],
                   result.get('mean_auroc', result.get('auroc')), result['f1'],
                   result['num_examples'])


@STAGES.register('mine_hard_examples')
def mine_hard_examples_stage(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """Paper 001 stage 1 -> 2: scores the train split with `config.hard_examples.source_stage`'s
  best model (eval preprocessing) and writes set B (cxr_jax/hard_examples.py) to
  the run (`layout.Run.hard_examples_file`)."""
  cfg = config.hard_examples
  run = layout.Run(workdir)
  mesh = parallel.make_mesh()
  model, variables, info = _restore_on_mesh(run.stage_dir(cfg.source_stage), mesh)
  evaluator = EVALUATORS.get(config.evaluator)(
      make_predict_fn(model, info.output), config.data, config.data.train_split,
      batch_size=config.eval_batch_size, mesh=mesh, class_names=info.class_names)
  preds: Predictions = evaluator.predict(variables)
  hard = hard_examples.hard_positives(preds.labels, preds.probs, cfg.threshold)
  copies = hard_examples.extra_copies(preds.image_ids, hard, cfg.copies)
  result = hard_examples.summary(preds.image_ids, preds.labels, hard, info.class_names, copies,
                                 threshold=cfg.threshold, mode=cfg.copies)
  if is_chief():
    run.write_hard_examples(result)
  if jax.process_count() > 1:  # stage 2 on every host reads the file the chief just wrote
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices('mine_hard_examples')
  lines = [f'{c}: {v["hard"]}/{v["positives"]}' for c, v in result['per_class'].items()]
  logging.info('Hard positives (missed/positives) per class on %s (%d images): %s. Set B: %d '
               'images; set C: %d examples.', config.data.train_split, len(preds.image_ids),
               ', '.join(lines), result['num_images_b'], result['num_examples_c'])



