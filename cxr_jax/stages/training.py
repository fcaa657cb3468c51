"""Training stages: each trains `config.model` with the loop of cxr_jax/train.py in its folder."""

import copy

import ml_collections
from absl import logging
from etils import epath

from cxr_jax import config_lib, layout, train
from cxr_jax.stages import disease_masks
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


# Paper 002: the ResNet-50 trained first on the unaligned data, whose features the alignment's
# perceptual loss uses (config.stage_overrides.train_loss_network holds its data settings).
@STAGES.register('train_loss_network')
def train_loss_network_stage(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """Trains the loss network in train_loss_network/, unless config.align.loss_network names
  another one (then this stage has nothing to do)."""
  if config.align.loss_network != 'train_loss_network':
    logging.info('train_loss_network: skipped, config.align.loss_network=%r.',
                 config.align.loss_network)
    return
  _train_stage('train_loss_network')(config, workdir)


@STAGES.register('train_dm')
def train_dm_stage(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """Paper 002: retrains the classifier with DM attention (f'_c = psi_c f + f) in train_dm/,
  psi from the artefact of `config.disease_masks.attention_from` (stages/disease_masks.py)."""
  train.train_and_evaluate(disease_masks.dm_train_config(config, workdir),
                           layout.Run(workdir).stage_dir('train_dm'))
