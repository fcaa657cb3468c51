"""The `fit_ood` stage: the viewer's out-of-distribution gate, one per model of the run.

For each stage of `config.ood.stages` (default: the stages of `config.report_models`) the gate
of cxr_jax/ood.py is fitted on up to `config.ood.max_images` images of the training split and
thresholded on the validation split for `config.ood.false_alarm_rate`; the false-alarm rate on
the test split (held-out X-rays) is measured and stored in the gate's summary
(`layout.Run.ood_summary_file`). `python -m cxr_jax.serve` warns when an upload scores above the
threshold.
"""

import ml_collections
import numpy as np
from absl import logging
from etils import epath

from cxr_jax import inference, layout
from cxr_jax.inference import ood as ood_lib
from cxr_jax.stages.base import STAGES, is_chief


def gate_stages(config: ml_collections.ConfigDict) -> list[str]:
  """The training stages that get a gate."""
  stages = tuple(config.ood.stages) if 'ood' in config else ()
  return list(stages or dict(config.report_models))


@STAGES.register('fit_ood')
def fit_ood_stage(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """Fits, thresholds and stores the OOD gate of every model in `gate_stages(config)`."""
  if not is_chief():
    return
  run = layout.Run(workdir)
  for stage in gate_stages(config):
    predictor = inference.load_predictor(workdir, stage)
    gate, summary = ood_lib.fit_gate(predictor)
    test_split = config.data.eval_splits.get('test')
    if test_split:
      cfg = ood_lib.ood_settings(predictor)
      inputs = ood_lib.gate_inputs(
          predictor, inference.training_images(predictor, int(cfg['max_images']), test_split),
          features=gate.uses_features, batch_size=int(cfg['batch_size']))
      scores = gate.score(inputs)
      summary.update(test_split=test_split, num_test=int(len(scores)),
                     false_alarm_rate_test=float(np.mean(scores > gate.threshold)))
    run.write_ood_gate(stage, gate.to_arrays(), summary)
    logging.info('fit_ood %s: threshold %.3f, false alarms %.1f%% validation, %s test '
                 '(%d PCA components, features: %s)', stage, gate.threshold,
                 100 * summary['false_alarm_rate_validation'],
                 f"{100 * summary['false_alarm_rate_test']:.1f}%"
                 if 'false_alarm_rate_test' in summary else 'no', summary['pca_components'],
                 summary['uses_features'])
