"""Train-step images/s per convolution implementation (`conv_impl`) next to torchvision, one run.

For each backbone (ResNet-50, DenseNet-121, VGG-16 by default) and each `conv_impl` of
cxr_jax/models/conv.py ('xla' = before, 'matmul' / 'patches' = the rewrites), the data-parallel
train step of cxr_jax/train_step.py (Adam, sigmoid BCE) and torchvision's train step (Adam, BCE,
all cores) are timed *interleaved*: every round runs one step of each, so that load from other
processes on a shared machine hits all columns alike; each column reports its fastest round.

  python benchmarks/conv_impl.py                                # 224 px, batch 16, fp32
  python benchmarks/conv_impl.py --models=resnet50 --rounds=3 --json out.json
  python benchmarks/conv_impl.py --impls=xla,matmul --no_torch
  python benchmarks/conv_impl.py --models=mobilenet_v1 --impls=xla,matmul
  python benchmarks/conv_impl.py --impls=matmul --cpu_fusions=dot,reduce,individual_dot,eltwise
  python benchmarks/conv_impl.py --impls=xla,matmul --isolate --repeats=2   # fresh processes
  python benchmarks/conv_impl.py --models=densenet121 --impls=matmul@autodiff,matmul@fused
  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=dot \
      python benchmarks/conv_impl.py          # XLA_FLAGS win over cxr_jax/xla_options.py

`--isolate` times each column in fresh processes of its own instead (alternating, `--repeats`
processes per column): in one process a program timed next to torch or next to another compiled
program ran up to 2x slower than alone.

A column `<conv_impl>@<bn_impl>` also picks the BatchNorm gradient (cxr_jax/models/batch_norm.py:
'fused' or 'autodiff', flax's; without `@` the models' default 'auto', i.e. 'fused' on the CPU).

Columns: img/s per impl, its ratio to torch (and torch channels_last with
`--channels_last`), the speed-up of the best impl over 'xla', compile seconds.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import backbones  # noqa: E402

from cxr_jax import losses, optim, parallel, xla_options  # noqa: E402
from cxr_jax.config_lib import base_config  # noqa: E402
from cxr_jax.models import MODELS  # noqa: E402
from cxr_jax.train_step import create_train_state, make_train_step  # noqa: E402

DEFAULT_MODELS = ('resnet50', 'densenet121', 'vgg16')
NUM_CLASSES = 14


def jax_step(name: str, impl: str, size: int, batch: int,
             cpu_fusions: tuple[str, ...] = xla_options.DEFAULT_CPU_FUSIONS) -> tuple[Any, float]:
  """A zero-argument function running one train step of `name` with `conv_impl=impl` (state
  carried between calls; compiled with `cpu_fusions`, as `config.cpu_fusions`), and its compile
  seconds. `impl` 'matmul@autodiff' also sets the model's `bn_impl` (ResNet, DenseNet,
  MobileNet)."""
  mesh = parallel.make_mesh()
  impl, _, bn_impl = impl.partition('@')
  model = MODELS.get(name)(num_classes=NUM_CLASSES, conv_impl=impl,
                           bn_axis_name=parallel.DATA_AXIS,
                           **({'bn_impl': bn_impl} if bn_impl else {}))
  tx = optim.build_optimizer(base_config().optimizer, 100)
  state = create_train_state(model, tx, (size, size, 3), jax.random.key(0), mesh)
  rng = np.random.default_rng(0)
  data = parallel.to_global(
      {'image': rng.normal(size=(batch, size, size, 3)).astype(np.float32),
       'labels': (rng.random((batch, NUM_CLASSES)) < 0.2).astype(np.float32)}, mesh)
  step = make_train_step(model, tx, losses.get_loss('sigmoid_bce'), mesh, cpu_fusions=cpu_fusions)
  compile_s, one_step, _ = backbones.compile_train_step(step, state, data, jax.random.key(1))
  run = lambda: jax.block_until_ready(one_step())

  return run, compile_s


def torch_step(name: str, size: int, batch: int, channels_last: bool) -> Any:
  """One torchvision train step (Adam 1e-4, BCE with logits) on all CPU threads."""
  import torch  # noqa: PLC0415
  import torchvision  # noqa: PLC0415

  torch.set_num_threads(os.cpu_count())
  if name == 'mobilenet_v1':  # no torchvision model: the same layer stack in torch.nn
    model = backbones._torch_mobilenet_v1(torch, NUM_CLASSES)
  else:
    model = getattr(torchvision.models, name)(weights=None, num_classes=NUM_CLASSES)
  x = torch.randn(batch, 3, size, size)
  y = (torch.rand(batch, NUM_CLASSES) < 0.2).float()
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
  opt = torch.optim.Adam(model.parameters(), 1e-4)
  loss_fn = torch.nn.BCEWithLogitsLoss()
  model.train()

  def run():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()

  return run


def bench_model(name: str, impls: list[str], size: int, batch: int, rounds: int,
                torch_columns: list[str],
                cpu_fusions: tuple[str, ...] = xla_options.DEFAULT_CPU_FUSIONS) -> dict[str, Any]:
  """Interleaved rounds of one step per column; img/s of each column's fastest round."""
  runs, row = {}, {'model': name, 'size': size, 'batch': batch}
  for impl in impls:
    runs[impl], row[f'{impl}_compile_s'] = jax_step(name, impl, size, batch, cpu_fusions)
  for col in torch_columns:
    runs[col] = torch_step(name, size, batch, channels_last=col == 'torch_cl')
  for _ in range(2):  # warm-up (allocations, torch's first-call costs)
    for run in runs.values():
      run()
  times: dict[str, list[float]] = {col: [] for col in runs}
  for _ in range(rounds):
    for col, run in runs.items():
      # Let the previous column's worker threads stop spinning: right after a torch step the
      # next column ran up to 2x slower (two columns compiling the same VGG-16 program differed
      # 2x when one of them followed torch, and agreed without torch).
      time.sleep(1.0)
      t = time.perf_counter()
      run()
      times[col].append(time.perf_counter() - t)
  return summarise(row, times, batch)


def summarise(row: dict[str, Any], times: dict[str, list[float]], batch: int) -> dict[str, Any]:
  """Adds img/s of each column's fastest step (columns: impls and 'torch*'), each impl's ratio
  to each torch column and the best impl's speed-up over 'xla' to `row`."""
  impls = [c for c in times if not c.startswith('torch')]
  for col, ts in times.items():
    row[f'{col}_img_s'] = batch / min(ts)
    row[f'{col}_s_all'] = ts
  for impl in impls:
    for col in times:
      if col.startswith('torch'):
        row[f'{impl}_vs_{col}'] = row[f'{impl}_img_s'] / row[f'{col}_img_s']
  if 'xla' in impls:
    best = max(impls, key=lambda i: row[f'{i}_img_s'])
    row['best'], row['speedup_vs_xla'] = best, row[f'{best}_img_s'] / row['xla_img_s']
  row['loadavg_after'] = os.getloadavg()[0]
  return row


def step_times(run: Any, rounds: int, warmup: int = 2) -> list[float]:
  """Seconds of `rounds` calls of `run` after `warmup` untimed ones."""
  for _ in range(warmup):
    run()
  times = []
  for _ in range(rounds):
    t = time.perf_counter()
    run()
    times.append(time.perf_counter() - t)
  return times


def one_column(name: str, col: str, size: int, batch: int, rounds: int,
               cpu_fusions: tuple[str, ...]) -> dict[str, Any]:
  """Step seconds of one column alone in this process (`--isolate`'s worker)."""
  if col.startswith('torch'):
    run, compile_s = torch_step(name, size, batch, channels_last=col == 'torch_cl'), 0.0
  else:
    run, compile_s = jax_step(name, col, size, batch, cpu_fusions)
  return {'times': step_times(run, rounds), 'compile_s': compile_s}


def bench_model_isolated(name: str, columns: list[str], args: argparse.Namespace,
                         fusions: tuple[str, ...]) -> dict[str, Any]:
  """Each column in fresh processes, the columns alternating `args.repeats` times; img/s of the
  fastest step over all of a column's processes."""
  row: dict[str, Any] = {'model': name, 'size': args.size, 'batch': args.batch}
  times: dict[str, list[float]] = {c: [] for c in columns}
  for _ in range(args.repeats):
    for col in columns:
      cmd = [sys.executable, __file__, f'--one={name}:{col}', f'--size={args.size}',
             f'--batch={args.batch}', f'--rounds={args.rounds}',
             f'--cpu_fusions={",".join(fusions)}']
      out = subprocess.run(cmd, capture_output=True, text=True, check=False)
      if out.returncode:
        raise RuntimeError(f'{" ".join(cmd)} failed:\n{out.stderr[-3000:]}')
      result = json.loads(out.stdout.strip().splitlines()[-1])
      times[col] += result['times']
      if not col.startswith('torch'):
        row[f'{col}_compile_s'] = result['compile_s']
  return summarise(row, times, args.batch)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default=','.join(DEFAULT_MODELS))
  parser.add_argument('--impls', default='xla,matmul,patches')
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--channels_last', action='store_true', help='add a torch channels_last '
                      'column')
  parser.add_argument('--no_torch', action='store_true')
  parser.add_argument('--cpu_fusions', default=','.join(xla_options.DEFAULT_CPU_FUSIONS),
                      help="YNNPACK fusion types of the train steps (as config.cpu_fusions), e.g. "
                      "'dot,reduce,individual_dot,eltwise'; '' for none")
  parser.add_argument('--isolate', action='store_true', help='time every column in fresh '
                      'processes of its own (no other program, no torch threads beside it), '
                      'alternating --repeats times')
  parser.add_argument('--repeats', type=int, default=2, help='processes per column (--isolate)')
  parser.add_argument('--one', default=None, help=argparse.SUPPRESS)  # --isolate's worker
  parser.add_argument('--json', default=None, help='write the rows to this file')
  args = parser.parse_args()
  fusions = xla_options.check_cpu_fusions(args.cpu_fusions, '--cpu_fusions')
  if args.one:
    name, col = args.one.split(':')
    print(json.dumps(one_column(name, col, args.size, args.batch, args.rounds, fusions)))
    return
  impls = args.impls.split(',')
  torch_columns = [] if args.no_torch else ['torch'] + (['torch_cl'] if args.channels_last
                                                         else [])
  print(f'JAX {jax.__version__} on {jax.device_count()} x {jax.default_backend()}; '
        f'{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}; '
        f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}; compiler options '
        f'{xla_options.compiler_options(fusions)}; ' + (
            f'{args.repeats} fresh processes per column, min of {args.rounds} steps each'
            if args.isolate else f'min of {args.rounds} interleaved rounds'), flush=True)
  cols = [f'{c}_img_s' for c in impls + torch_columns]
  cols += [f'{i}_vs_{c}' for i in impls for c in torch_columns]
  cols += ['speedup_vs_xla', 'loadavg_after']
  print(' | '.join(['model'] + cols), flush=True)
  rows = []
  for name in args.models.split(','):
    if args.isolate:
      row = bench_model_isolated(name, impls + torch_columns, args, fusions)
    else:
      row = bench_model(name, impls, args.size, args.batch, args.rounds, torch_columns, fusions)
    rows.append(row)
    print(' | '.join([name] + [f'{row[c]:.2f}' if c in row else '-' for c in cols]),
          flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'xla_flags': os.environ.get('XLA_FLAGS', ''), 'isolate': args.isolate,
                 'cpu_fusions': fusions,
                 'compiler_options': xla_options.compiler_options(fusions), 'rows': rows},
                f, indent=2)


if __name__ == '__main__':
  main()
