"""Multi-process training proven on one machine: 2 processes x 4 CPU devices (jax.distributed
with a coordinator on 127.0.0.1, gloo collectives) against 1 process x 8 devices on the same
global batches."""

import os
import socket
import subprocess

import jax
import numpy as np
from conftest import ROOT, tiny_config

from cxr_jax import checkpoints, inference, layout, losses, optim, parallel, train_step
from cxr_jax.data import pipeline
from cxr_jax.models import build_model

STEPS = 6


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _config(data_dir: str):
  """What `_overrides` makes of the demo config on the command line.

  SGD, not the demo's Adam, and the 2-block model, not the demo's 13 blocks of 8 channels: the
  processes' all-reduce sums in another order than one process does (float32 rounding), and
  both Adam (whose first steps move a parameter by about lr times the sign of its gradient) and
  a deep, 8-channel-narrow BatchNorm stack (measured: 1 vs 8 devices in one process already
  differ by 1e-4 after one step) amplify that rounding; the comparison must test the
  multi-process step, not float32 conditioning.
  """
  config = tiny_config(data_dir)  # the 2-block MobileNet, as `--config.model.blocks` below
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 0.05
  config.num_train_steps = STEPS
  config.eval_every_steps = 3
  config.checkpoint_every_steps = 3
  return config


def _overrides(data_dir: str) -> list[str]:
  return ['--config=configs/mobilenet_baseline.py:demo', '--config.data.name=cxr_phantom/tiny',
          f'--config.data.data_dir={data_dir}', '--config.data.drop_no_finding=False',
          '--config.model.blocks=((16, 2), (32, 2))',
          '--config.batch_size=8', '--config.optimizer.name=sgd',
          '--config.optimizer.learning_rate=0.05',
          '--config.eval_batch_size=8', f'--config.num_train_steps={STEPS}',
          '--config.eval_every_steps=3', '--config.checkpoint_every_steps=3',
          '--config.log_every_steps=1', '--stages=train_classifier,evaluate,report']


def _reference_params(data_dir: str, monkeypatch):
  """1 process, 8 devices, fed the global batches two hosts would build (host 0's rows first)."""
  config = _config(data_dir)
  iters = []
  with monkeypatch.context() as m:
    m.setattr(jax, 'process_count', lambda: 2)
    for host in (0, 1):
      m.setattr(jax, 'process_index', lambda host=host: host)
      iters.append(pipeline.make_train_iter(config.data, global_batch_size=config.batch_size,
                                            seed=config.seed))
  mesh = parallel.make_mesh()
  model = build_model(config.model, num_classes=len(config.data.classes), dtype=config.dtype,
                      bn_axis_name=parallel.DATA_AXIS)
  tx = optim.build_optimizer(config.optimizer, STEPS, 1.0)
  step_fn = train_step.make_train_step(model, tx, losses.get_loss(config.loss), mesh)
  init_key, step_key = jax.random.split(jax.random.key(config.seed))
  state = None
  for _ in range(STEPS):
    halves = [next(it) for it in iters]
    batch = {k: np.concatenate([h[k] for h in halves]) for k in ('image', 'labels')}
    if state is None:
      state = train_step.create_train_state(model, tx, batch['image'].shape[1:], init_key, mesh)
    state, _ = step_fn(state, parallel.to_global(batch, mesh), step_key)
  return jax.device_get(state.variables())


def test_two_processes_equal_one_process_on_the_same_global_batches(phantom_data_dir, tmp_path,
                                                                    monkeypatch):
  workdir = tmp_path / 'run'
  env = {**os.environ, 'CXR_JAX_COORDINATOR_PORT': str(_free_port()), 'CXR_JAX_CPU_DEVICES': '4',
         'TF_CPP_MIN_LOG_LEVEL': '2'}
  env.pop('XLA_FLAGS', None)
  out = subprocess.run(['bash', str(ROOT / 'launch' / 'local_multiprocess.sh'), '2',
                        'configs/mobilenet_baseline.py:demo', str(workdir),
                        *_overrides(phantom_data_dir)[1:]],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-4000:]
  log = out.stderr
  assert '2 process(es)' in log
  # Each process read its own half of the train split.
  reads = sorted(line.split('reads ')[1].split(' of ')[0] for line in log.splitlines()
                 if 'reads ' in line and 'for training' in line)
  assert len(reads) == 2 and reads[0] != reads[1], reads

  run = layout.Run(workdir)
  stage_dir = run.stage_dir('train_classifier')
  info = inference.read_model_info(stage_dir)
  model = inference.build(info)
  got, meta = checkpoints.restore_variables(
      stage_dir, inference.abstract_variables(model, info.image_shape), which='latest')
  assert meta['step'] == STEPS
  want = _reference_params(phantom_data_dir, monkeypatch)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(a).max())))

  # Evaluation counted every validation image exactly once across the two processes.
  import tensorflow_datasets as tfds
  ids, _, _ = run.read_predictions('train_classifier', 'validation')
  split_ids = [ex['image_id'].decode() for ex in tfds.as_numpy(
      tfds.builder('cxr_phantom/tiny', data_dir=phantom_data_dir).as_dataset(split='validation'))]
  assert sorted(ids) == sorted(split_ids) and len(set(ids)) == len(ids) == 8
  # Only process 0 wrote logs, the report and the metadata.
  assert len(list(run.stage('train_classifier').logs_dir.glob('events.*'))) == 1
  assert run.is_done('train_classifier') and run.report_file('markdown').exists()
