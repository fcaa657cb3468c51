"""How errors reach a user of `python -m cxr_jax.main`: one line, a status, the traceback only
in the run's error log or with --verbose."""

import subprocess
import sys

from conftest import ROOT


def _main(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'cxr_jax.main', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def _error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith('error:')]


def test_usage_errors_are_one_line_and_status_2(tmp_path):
  cfg = '--config=configs/mobilenet_baseline.py:demo'
  for args, named in (
      (['--config.no_such_key=1'], '--config.no_such_key: no such config key'),
      (['--config.batch_size=many'], '--config.batch_size=many'),
      (['--config.model.name=vgg_99'], "config.model.name: Unknown model 'vgg_99'"),
      (['--config.threshold=per-class'], "config.threshold='per-class'"),
      (['--stages=nope'], "--stages: ['nope'] not in this config's stages"),
      (['--num_processes=2'], '--coordinator_address, --num_processes and --process_id'),
      (['--config=configs/no_such_method.py'], "No such file or directory: "
                                               "'configs/no_such_method.py'"),
      (['--config=configs/mobilenet_baseline.py:fast'], "Unknown config argument 'fast'"),
  ):
    out = _main(cfg, f'--workdir={tmp_path / "w"}', *args)
    assert out.returncode == 2, (args, out.stderr[-2000:])
    lines = _error_lines(out.stderr)
    assert len(lines) == 1 and named in lines[0], (args, out.stderr[-2000:])
    assert 'Traceback' not in out.stderr, args
  assert not (tmp_path / 'w' / 'train_classifier').exists()


def test_missing_data_names_the_command_that_prepares_it(tmp_path):
  workdir = tmp_path / 'run'
  out = _main('--config=configs/mobilenet_baseline.py', f'--workdir={workdir}',
              f'--config.data.data_dir={tmp_path / "tfds"}')
  assert out.returncode == 1, out.stderr[-2000:]
  (line,) = _error_lines(out.stderr)
  assert ('tfds build nih_chest_xray14 --config=patient13-224 --imports=cxr_jax.data' in line
          and f'--data_dir={tmp_path / "tfds"}' in line), line
  assert 'Traceback' not in out.stderr
  log = (workdir / 'error.log').read_text()
  assert 'Traceback' in log and 'FileNotFoundError' in log and str(workdir / 'error.log') in line
  verbose = _main('--config=configs/mobilenet_baseline.py', f'--workdir={workdir}',
                  f'--config.data.data_dir={tmp_path / "tfds"}', '--verbose')
  assert verbose.returncode == 1 and 'Traceback' in verbose.stderr
