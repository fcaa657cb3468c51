"""Runs the tiny config's stages in a fresh process, optionally killing itself (SIGKILL) at a
named point: what a crash, an OOM kill or a pulled plug does to a run (tests/test_preemption.py).

  python tests/stage_worker.py WORKDIR DATA_DIR KILL_POINT

KILL_POINT: 'none'; 'step:N' (the N-th train step of this process, dispatched, not finished);
'checkpoint:N' (while the checkpoint of step N is being written, asynchronously);
'evaluation:N' (the N-th evaluation of this process, after its first batch);
'between_stages' (train_classifier marked done, evaluate not started).
"""

import os
import signal
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


def _die() -> None:
  sys.stdout.flush()
  sys.stderr.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def worker_config(data_dir: str):
  from tiny import tiny_config  # not conftest: it imports torch, not needed here
  config = tiny_config(data_dir)
  config.stages = ('train_classifier', 'evaluate')
  return config


def main(workdir: str, data_dir: str, kill_point: str) -> None:
  from cxr_jax import checkpoints, evaluators, layout, stages, train
  point, _, arg = kill_point.partition(':')
  n = int(arg) if arg else 0
  calls = {'step': 0, 'evaluation': 0}
  if point == 'step':
    make = train.make_train_step

    def make_dying(*args, **kwargs):
      step_fn = make(*args, **kwargs)

      def step(state, batch, key):
        out = step_fn(state, batch, key)
        calls['step'] += 1
        if calls['step'] == n:
          _die()
        return out
      return step
    train.make_train_step = make_dying
  elif point == 'checkpoint':
    save = checkpoints.Checkpoints.save

    def dying_save(self, step, state, meta, *, best=False):
      save(self, step, state, meta, best=best)
      if step == n:
        _die()  # orbax is still writing step n in the background
    checkpoints.Checkpoints.save = dying_save
  elif point == 'evaluation':
    predict = evaluators.ClassificationEvaluator.predict

    def dying_predict(self, variables):
      calls['evaluation'] += 1
      if calls['evaluation'] == n:
        next(iter(self.input))
        _die()
      return predict(self, variables)
    evaluators.ClassificationEvaluator.predict = dying_predict
  elif point == 'between_stages':
    mark_done = layout.Run.mark_done

    def dying_mark_done(self, stage, seconds):
      mark_done(self, stage, seconds)
      if stage == 'train_classifier':
        _die()
    layout.Run.mark_done = dying_mark_done
  elif point != 'none':
    raise SystemExit(f'unknown kill point {kill_point!r}')
  stages.run(worker_config(data_dir), workdir)


if __name__ == '__main__':
  main(*sys.argv[1:4])
