"""The training loop and stage runner on the tiny phantom: resume, skip, subset, errors."""

import jax
import numpy as np
import pytest
from conftest import tiny_config
from etils import epath

from cxr_jax import checkpoints, layout, stages, train


def _final_state(config, workdir):
  """The latest train state written under workdir/train, restored into a fresh target."""
  from cxr_jax import optim, parallel
  from cxr_jax.models import build_model
  model = build_model(config.model, num_classes=len(config.data.classes))
  tx = optim.build_optimizer(config.optimizer, config.num_train_steps)
  target = train.create_train_state(model, tx, (64, 64, 3), jax.random.key(1),
                                    parallel.make_mesh())
  ckpt = checkpoints.Checkpoints(epath.Path(workdir) / 'train_classifier')
  try:
    state, meta = ckpt.restore_latest(target)
  finally:
    ckpt.close()
  return jax.device_get(state), meta


def test_kill_and_resume_ends_with_same_parameters(phantom_data_dir, tmp_path, monkeypatch):
  config = tiny_config(phantom_data_dir)
  stages.run(config, tmp_path / 'straight', only=['train_classifier'])
  straight, meta_a = _final_state(config, tmp_path / 'straight')
  assert int(straight.step) == 6

  # Second run: the process "dies" in step 5, after the step-4 checkpoint.
  real_make_step = train.make_train_step

  def dying_make_step(*args, **kwargs):
    step_fn = real_make_step(*args, **kwargs)
    calls = {'n': 0}

    def step(state, batch, key):
      calls['n'] += 1
      if calls['n'] == 5:
        raise KeyboardInterrupt('simulated kill')
      return step_fn(state, batch, key)
    return step

  monkeypatch.setattr(train, 'make_train_step', dying_make_step)
  with pytest.raises(KeyboardInterrupt):
    stages.run(config, tmp_path / 'killed', only=['train_classifier'])
  assert not layout.Run(tmp_path / 'killed').is_done('train_classifier')
  assert checkpoints.Checkpoints(tmp_path / 'killed' / 'train_classifier').latest_step() == 4
  monkeypatch.setattr(train, 'make_train_step', real_make_step)

  stages.run(config, tmp_path / 'killed', only=['train_classifier'])  # resumes from step 4
  resumed, meta_b = _final_state(config, tmp_path / 'killed')
  assert int(resumed.step) == 6
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
    np.testing.assert_array_equal(a, b)
  assert meta_a == meta_b  # best value/step and plateau bookkeeping survive the restart


def test_stage_runner_skips_finished_and_runs_subsets(phantom_data_dir, tmp_path, caplog):
  config = tiny_config(phantom_data_dir)
  config.num_train_steps = 2
  config.eval_every_steps = 2
  config.stages = ('train_classifier', 'evaluate', 'report')  # explain: see test_demo.py
  workdir = tmp_path / 'run'
  stages.run(config, workdir)
  for stage in ('train_classifier', 'evaluate', 'report'):
    assert layout.Run(workdir).is_done(stage)
  for name in ('metrics.json', 'report.md', 'roc.png', 'confusion.png'):
    assert (workdir / 'report' / name).exists(), name
  assert (workdir / 'evaluate' / 'train_classifier' / 'predictions_test.npz').exists()
  report_mtime = (workdir / 'report' / 'report.md').stat().st_mtime_ns

  caplog.set_level('INFO')
  caplog.set_level('INFO', logger='absl')  # absl keeps its own level (a CLI may lower it)
  stages.run(config, workdir)
  assert caplog.text.count('already finished') == 3
  assert (workdir / 'report' / 'report.md').stat().st_mtime_ns == report_mtime

  caplog.clear()
  stages.run(config, workdir, only=['report'], rerun=True)
  assert 'Stage report done' in caplog.text and 'Stage train_classifier' not in caplog.text

  with pytest.raises(ValueError, match=r"--stages: \['explain'\] not in this config's stages"):
    stages.run(config, workdir, only=['explain'])


def test_missing_data_dir_is_a_clear_error(tmp_path):
  config = tiny_config(str(tmp_path / 'empty_tfds'))
  config.data.name = 'nih_chest_xray14/patient13-224'
  with pytest.raises(FileNotFoundError, match='nih_chest_xray14'):
    stages.run(config, tmp_path / 'run', only=['train_classifier'])


def test_missing_imported_weights_is_a_clear_error(phantom_data_dir, tmp_path):
  config = tiny_config(phantom_data_dir)
  config.init_from.checkpoint = str(tmp_path / 'weights' / 'torchvision_resnet101')
  with pytest.raises(FileNotFoundError, match='config.init_from.checkpoint=.*import_weights'):
    train.train_and_evaluate(config, epath.Path(tmp_path / 'run' / 'train_classifier'))
  assert not (tmp_path / 'run' / 'train_classifier' / 'checkpoints').exists()


def test_a_stage_ends_when_its_work_ends(phantom_data_dir, tmp_path, caplog):
  """Wall time minus the steps, evaluations and checkpoint saves stays small (it was 53 s of
  idling at the end of the README demo's attention stage before evaluators kept their input)."""
  config = tiny_config(phantom_data_dir)
  config.num_train_steps = 6
  config.eval_every_steps = 2  # three evaluations: the input pipeline must be built once
  caplog.set_level('INFO', logger='absl')
  timing = train.train_and_evaluate(config, epath.Path(tmp_path / 'train_classifier'))
  work = timing['steps'] + timing['evaluation'] + timing['checkpoints']
  assert timing['wrap_up'] < 3.0, timing
  assert timing['total'] - work - timing['setup'] < 1.0, timing
  assert timing['setup'] < 20.0, timing  # data pipeline, model init, checkpoint manager
  assert 'wrap-up' in caplog.text
