"""Surviving faults: SIGKILL at random points, SIGTERM/SIGINT (checkpoint + status 75), and
non-finite losses (config.nan_policy)."""

import os
import random
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, tiny_config
from etils import epath

from cxr_jax import checkpoints, errors, inference, layout, stages, train

WORKER = ROOT / 'tests' / 'stage_worker.py'


def _worker(workdir, data_dir, kill_point) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(WORKER), str(workdir), data_dir, kill_point],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)


def _latest_variables(stage_dir):
  info = inference.read_model_info(stage_dir)
  model = inference.build(info)
  variables, meta = checkpoints.restore_variables(
      stage_dir, inference.abstract_variables(model, info.image_shape), which='latest')
  return variables, meta


def _assert_same_variables(a, b):
  # Separate processes: XLA:CPU's matmul fusions (conv_impl 'matmul' on the CPU) may split a
  # reduction differently from one process to the next, so equal means equal to float32
  # rounding, scaled to each array's magnitude (one run here differed by 1e-6 relative).
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(y).max())))


def _approx(tree):
  """Metrics equal up to float32 rounding (see _assert_same_variables), structure exact."""
  if isinstance(tree, dict):
    return {k: _approx(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return [_approx(v) for v in tree]
  if isinstance(tree, float):
    return pytest.approx(tree, rel=1e-5, abs=1e-6, nan_ok=True)
  return tree


def test_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run(phantom_data_dir,
                                                                            tmp_path):
  import stage_worker  # the same config, run here uninterrupted (same devices, same program)
  straight = tmp_path / 'straight'
  stages.run(stage_worker.worker_config(phantom_data_dir), straight)
  # Several kills of one run, each resumed by the same command; the points are drawn at random
  # (seeded, so a failure reproduces) inside each kind of work.
  rng = random.Random(15)
  points = [f'step:{rng.randint(1, 5)}', f'checkpoint:{rng.choice([2, 4])}',
            f'evaluation:{rng.randint(1, 2)}', 'between_stages']
  killed = tmp_path / 'killed'
  run = layout.Run(killed)
  for point in points:
    out = _worker(killed, phantom_data_dir, point)
    assert out.returncode == -signal.SIGKILL, (point, out.stderr[-3000:])
    assert not run.is_done('evaluate'), point
    # A checkpoint orbax had not finished is never picked up (no step beyond the last one
    # written in full); the run resumes from a complete one.
    ckpt = checkpoints.Checkpoints(run.stage_dir('train_classifier'))
    try:
      latest = ckpt.latest_step()
    finally:
      ckpt.close()
    assert latest is None or latest % 2 == 0, (point, latest)
  out = _worker(killed, phantom_data_dir, 'none')
  assert out.returncode == 0, out.stderr[-3000:]
  a, meta_a = _latest_variables(layout.Run(straight).stage_dir('train_classifier'))
  b, meta_b = _latest_variables(run.stage_dir('train_classifier'))
  _assert_same_variables(a, b)
  assert meta_a == meta_b
  want = layout.Run(straight).read_metrics('train_classifier', 'test')
  assert _approx(run.read_metrics('train_classifier', 'test')) == want


def test_sigterm_saves_a_checkpoint_and_exits_75_then_resumes(phantom_data_dir, tmp_path):
  args = [sys.executable, '-m', 'cxr_jax.main', '--config=configs/mobilenet_baseline.py:demo',
          '--config.data.name=cxr_phantom/tiny', f'--config.data.data_dir={phantom_data_dir}',
          '--config.data.drop_no_finding=False', '--config.batch_size=8',
          '--config.eval_batch_size=8', '--config.num_train_steps=60',
          '--config.eval_every_steps=1000', '--config.checkpoint_every_steps=1000',
          '--config.log_every_steps=1', '--stages=train_classifier']
  workdir = tmp_path / 'run'
  proc = subprocess.Popen([*args, f'--workdir={workdir}'], cwd=ROOT, stderr=subprocess.PIPE,
                          text=True, env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'})
  lines = []
  for line in proc.stderr:
    lines.append(line)
    if 'step 5/60' in line:
      proc.send_signal(signal.SIGTERM)
      break
  lines += proc.stderr.readlines()
  assert proc.wait(timeout=300) == errors.EXIT_PREEMPTED, ''.join(lines[-30:])
  text = ''.join(lines)
  assert 'SIGTERM received: checkpoint saved at step' in text
  assert 'preempted: SIGTERM at step' in text
  stage_dir = layout.Run(workdir).stage_dir('train_classifier')
  _, meta = _latest_variables(stage_dir)
  assert 5 <= meta['step'] < 60
  assert not layout.Run(workdir).is_done('train_classifier')
  out = subprocess.run([*args, f'--workdir={workdir}'], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f'Resumed {stage_dir} from step {meta["step"]}' in out.stderr
  assert layout.Run(workdir).is_done('train_classifier')


def _nan_after(step_bad: int):
  """A make_train_step whose batch at step `step_bad` holds a NaN image."""
  make = train.make_train_step

  def make_nan(*args, **kwargs):
    step_fn = make(*args, **kwargs)
    calls = {'n': 0}

    def step(state, batch, key):
      calls['n'] += 1
      if calls['n'] == step_bad:
        batch = {**batch, 'image': batch['image'] * np.nan}
      return step_fn(state, batch, key)
    return step
  return make_nan


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(
    phantom_data_dir, tmp_path, monkeypatch):
  config = tiny_config(phantom_data_dir)
  config.num_train_steps = 8
  config.eval_every_steps = 4
  config.checkpoint_every_steps = 2
  config.log_every_steps = 4
  monkeypatch.setattr(train, 'make_train_step', _nan_after(5))
  stage_dir = epath.Path(tmp_path / 'train_classifier')
  with pytest.raises(errors.NonFiniteError,
                     match='non-finite loss or gradient at step 5: training stopped; the last '
                           'good checkpoint is step 4'):
    train.train_and_evaluate(config, stage_dir)
  ckpt = checkpoints.Checkpoints(stage_dir)
  try:
    assert ckpt.latest_step() == 4 and ckpt.best_step() <= 4
  finally:
    ckpt.close()
  variables, _ = _latest_variables(stage_dir)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables))


def test_nan_policy_skip_skips_and_counts(phantom_data_dir, tmp_path, monkeypatch, caplog):
  config = tiny_config(phantom_data_dir)
  config.num_train_steps = 6
  config.eval_every_steps = 6
  config.nan_policy = 'skip'
  monkeypatch.setattr(train, 'make_train_step', _nan_after(3))
  caplog.set_level('WARNING', logger='absl')
  stage_dir = epath.Path(tmp_path / 'train_classifier')
  train.train_and_evaluate(config, stage_dir)
  variables, meta = _latest_variables(stage_dir)
  assert meta['step'] == 6
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables))
  assert '1 step(s) with a non-finite loss or gradient skipped so far (the first at step 3)' \
      in caplog.text


def test_sigint_in_process_raises_preempted_after_a_checkpoint(phantom_data_dir, tmp_path,
                                                               monkeypatch):
  config = tiny_config(phantom_data_dir)
  config.num_train_steps = 6
  make = train.make_train_step

  def make_signalled(*args, **kwargs):
    step_fn = make(*args, **kwargs)
    calls = {'n': 0}

    def step(state, batch, key):
      calls['n'] += 1
      if calls['n'] == 3:
        os.kill(os.getpid(), signal.SIGINT)
      return step_fn(state, batch, key)
    return step

  monkeypatch.setattr(train, 'make_train_step', make_signalled)
  with pytest.raises(errors.Preempted, match='SIGINT at step 3/6 of train_classifier'):
    stages.run(config, tmp_path / 'run', only=['train_classifier'])
  _, meta = _latest_variables(layout.Run(tmp_path / 'run').stage_dir('train_classifier'))
  assert meta['step'] == 3
  # The handlers are gone after the run: a later SIGINT is a KeyboardInterrupt again.
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
