"""Training stages: each trains `config.model` with the loop of cxr_jax/train.py in its folder."""

import copy

import ml_collections
from etils import epath

from cxr_jax import config_lib, layout, train
from cxr_jax.stages.base import STAGES, StageFn


def _train_stage(name: str) -> StageFn:
  def run_stage(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
    train.train_and_evaluate(config_lib.stage_config(config, name),
                             layout.Run(workdir).stage_dir(name))
  run_stage.__doc__ = (f'Trains the model of `config` (+ `config.stage_overrides.{name}`) '
                       f'in {name}/.')
  return run_stage


# Stage 1 of every method; paper 000 adds the recurrent attention branch as stage 2.
STAGES.register('train_classifier')(_train_stage('train_classifier'))
STAGES.register('train_attention')(_train_stage('train_attention'))
# Paper 004's lung/heart U-Net (config.data.target='masks'), alone or before a classifier.
STAGES.register('train_segmenter')(_train_stage('train_segmenter'))


@STAGES.register('train_hard_examples')
def train_hard_examples_stage(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """Paper 001 stage 2: trains on C = A + B (the mined hard positives repeated) in
  train_hard_examples/; from scratch unless `config.stage_overrides.train_hard_examples.init_from`
  says otherwise."""
  cfg = config_lib.stage_config(config, 'train_hard_examples')
  if cfg is config:
    cfg = copy.deepcopy(config)
  run = layout.Run(workdir)
  with cfg.unlocked():
    cfg.data.extra_copies = str(run.hard_examples_file)
  train.train_and_evaluate(cfg, run.stage_dir('train_hard_examples'))
