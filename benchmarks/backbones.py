"""Backbone throughput: cxr_jax (jit, the data-parallel train step) vs torchvision, same machine.

For each backbone registered in `cxr_jax.models.MODELS` that torchvision also has, at 224x224,
batch 16, float32 by default: train-step and inference images/s for both, the compile time of
the JAX step apart, achieved GFLOP/s (XLA's cost analysis of the compiled programs, i.e. what
XLA runs, rewrites included) against a measured float32 matmul peak, and the JAX/torch ratios.
benchmarks/peers.py is the train-step comparison with compiled torch and analytic FLOP counts.

  python benchmarks/backbones.py --quick                 # mobilenet_v1 + resnet50, few repeats
  python benchmarks/backbones.py --models=resnet50,densenet121 --json out.json
  XLA_FLAGS=... python benchmarks/backbones.py --quick   # try XLA CPU flags
  python benchmarks/backbones.py --dtype=bfloat16 --batch=64   # on a GPU

mobilenet_v1 has no torchvision counterpart; its torch column uses the same layer stack written
with torch.nn (depthwise = grouped conv) so the comparison stays like for like.
"""

import argparse
import json
import os
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from cxr_jax import losses, optim, parallel  # noqa: E402
from cxr_jax.config_lib import base_config  # noqa: E402
from cxr_jax.models import MODELS  # noqa: E402
from cxr_jax.train_step import create_train_state, make_train_step  # noqa: E402

TORCHVISION = {'resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'densenet121',
               'densenet169', 'densenet201', 'vgg11', 'vgg13', 'vgg16', 'vgg19', 'alexnet'}
DEFAULT = ('mobilenet_v1', 'resnet50', 'densenet121', 'vgg16', 'alexnet')
QUICK = ('mobilenet_v1', 'resnet50')
NUM_CLASSES = 14


def _timeit(fn, repeats: int, warmup: int = 1) -> float:
  """Seconds per call (median of `repeats` after `warmup` calls)."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def matmul_peak_gflops(dtype: Any, n: int = 2048, repeats: int = 5) -> float:
  """Measured float32 (or `dtype`) GEMM throughput of the default device, GFLOP/s."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda a: a @ a)
  s = _timeit(lambda: f(a), repeats)
  return 2 * n ** 3 / s / 1e9


def _flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
      cost = cost[0]
    return float(cost.get('flops', 0.0)) or None
  except Exception:  # cost analysis is best effort on some backends
    return None


def compile_train_step(step: Any, state: Any, data: Any, key: jax.Array
                       ) -> tuple[float, Any, dict[str, Any]]:
  """Compiles a `make_train_step` step for (state, data, key), timed apart: returns (compile
  seconds, `one_step()` running it on the state it carries and returning the loss, the holder
  whose 'state' is that state)."""
  t0 = time.perf_counter()
  compiled = step.lower(state, data, key).compile()
  compile_s = time.perf_counter() - t0
  holder = {'state': state, 'compiled': compiled}

  def one_step():
    holder['state'], metrics = compiled(holder['state'], data, key)
    return metrics['loss']

  return compile_s, one_step, holder


def time_jax_model(build: Any, tx: Any, size: int, batch: int, repeats: int) -> dict[str, Any]:
  """Times the data-parallel train step and jitted inference of `build(**kwargs)` (a linen
  module factory; `bn_axis_name` is passed for training) on random data, compile apart."""
  mesh = parallel.make_mesh()
  model = build(bn_axis_name=parallel.DATA_AXIS)
  state = create_train_state(model, tx, (size, size, 3), jax.random.key(0), mesh)
  rng = np.random.default_rng(0)
  data = parallel.to_global(
      {'image': rng.normal(size=(batch, size, size, 3)).astype(np.float32),
       'labels': (rng.random((batch, NUM_CLASSES)) < 0.2).astype(np.float32)}, mesh)
  step = make_train_step(model, tx, losses.get_loss('sigmoid_bce'), mesh)
  compile_s, one_step, holder = compile_train_step(step, state, data, jax.random.key(1))
  compiled_step = holder['compiled']
  train_s = _timeit(one_step, repeats)
  eval_model = build()
  variables = holder['state'].variables()
  predict = jax.jit(lambda v, x: eval_model.apply(v, x, train=False))
  t0 = time.perf_counter()
  compiled_predict = predict.lower(variables, data['image']).compile()
  compile_s += time.perf_counter() - t0
  infer_s = _timeit(lambda: compiled_predict(variables, data['image']), repeats)
  n_params = sum(x.size for x in jax.tree.leaves(holder['state'].params))
  return {'jax_compile_s': compile_s, 'jax_train_img_s': batch / train_s,
          'jax_infer_img_s': batch / infer_s, 'train_flops': _flops(compiled_step),
          'infer_flops': _flops(compiled_predict), 'params': int(n_params),
          'jax_train_s': train_s, 'jax_infer_s': infer_s}


def bench_jax(name: str, size: int, batch: int, dtype: str, repeats: int) -> dict[str, Any]:
  cls = MODELS.get(name)
  build = lambda **kw: cls(num_classes=NUM_CLASSES, dtype=getattr(jnp, dtype), **kw)
  return time_jax_model(build, optim.build_optimizer(base_config().optimizer, 100), size, batch,
                        repeats)


def _torch_mobilenet_v1(torch, num_classes: int):
  nn = torch.nn
  from cxr_jax.models.mobilenet import MOBILENET_V1_BLOCKS  # noqa: PLC0415

  def cbr(cin, cout, k, s, groups=1):
    return [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]

  layers, c = cbr(3, 32, 3, 2), 32
  for out, s in MOBILENET_V1_BLOCKS:
    layers += cbr(c, c, 3, s, groups=c) + cbr(c, out, 1, 1)
    c = out
  return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))


def time_torch_model(model: Any, size: int, batch: int, repeats: int, channels_last: bool,
                     dtype: str, make_optimizer: Any, threads: int | None = None
                     ) -> dict[str, Any]:
  """Times a torch model's train step (BCE, `make_optimizer(parameters)`) and inference, on
  the GPU when JAX runs on one (bf16 via autocast), else on `threads` CPU threads (all)."""
  import contextlib  # noqa: PLC0415

  import torch  # noqa: PLC0415

  torch.set_num_threads(threads or os.cpu_count())
  device = 'cuda' if jax.devices()[0].platform == 'gpu' and torch.cuda.is_available() else 'cpu'
  if device == 'cuda':
    torch.backends.cudnn.benchmark = True  # fixed shapes; the warm-up call does the tuning
  autocast = (torch.autocast(device, dtype=torch.bfloat16) if dtype == 'bfloat16'
              else contextlib.nullcontext())
  model = model.to(device)
  x = torch.randn(batch, 3, size, size, device=device)
  y = (torch.rand(batch, NUM_CLASSES, device=device) < 0.2).float()
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
  opt = make_optimizer(model.parameters())
  loss_fn = torch.nn.BCEWithLogitsLoss()

  def train():
    opt.zero_grad(set_to_none=True)
    with autocast:
      loss = loss_fn(model(x).float(), y)
    loss.backward()
    opt.step()
    return loss.item()  # .item() synchronises, so CUDA timings are complete

  def infer():
    with torch.inference_mode(), autocast:
      return model(x).float().sum().item()

  model.train()
  train_s = _timeit(train, repeats)
  model.eval()
  infer_s = _timeit(infer, repeats)
  return {'torch_train_img_s': batch / train_s, 'torch_infer_img_s': batch / infer_s,
          'torch_params': int(sum(p.numel() for p in model.parameters()))}


def bench_torch(name: str, size: int, batch: int, repeats: int, channels_last: bool,
                dtype: str = 'float32') -> dict[str, Any]:
  """torchvision (Adam) on the GPU when JAX runs on one (bf16 via autocast), else all cores."""
  import torch  # noqa: PLC0415
  import torchvision  # noqa: PLC0415

  if name == 'mobilenet_v1':
    model = _torch_mobilenet_v1(torch, NUM_CLASSES)
  else:
    model = getattr(torchvision.models, name)(weights=None, num_classes=NUM_CLASSES)
  return time_torch_model(model, size, batch, repeats, channels_last, dtype,
                          lambda params: torch.optim.Adam(params, 1e-4))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default=None, help='comma-separated names (default: all)')
  parser.add_argument('--quick', action='store_true', help='mobilenet_v1 + resnet50, 3 repeats')
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--repeats', type=int, default=None)
  parser.add_argument('--channels_last', action='store_true', help='torch channels_last')
  parser.add_argument('--no_torch', action='store_true', help='skip the torchvision columns')
  parser.add_argument('--json', default=None, help='write the rows to this file')
  args = parser.parse_args()
  repeats = args.repeats or (3 if args.quick else 10)
  names = (args.models.split(',') if args.models else QUICK if args.quick else DEFAULT)
  names = [n for n in names if n in MODELS]
  platform = jax.devices()[0].platform
  peak = matmul_peak_gflops(getattr(jnp, args.dtype))
  print(f'JAX {jax.__version__} on {jax.device_count()} x {platform}; {os.cpu_count()} CPUs; '
        f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}; matmul peak {peak:.0f} GFLOP/s '
        f'({args.dtype})')
  rows = []
  for name in names:
    row: dict[str, Any] = {'model': name, 'size': args.size, 'batch': args.batch,
                           'dtype': args.dtype, 'platform': platform}
    row.update(bench_jax(name, args.size, args.batch, args.dtype, repeats))
    for kind in ('train', 'infer'):
      flops = row[f'{kind}_flops']
      row[f'jax_{kind}_gflop_s'] = flops / row[f'jax_{kind}_s'] / 1e9 if flops else None
      row[f'jax_{kind}_peak_frac'] = row[f'jax_{kind}_gflop_s'] / peak if flops else None
    can_torch = name in TORCHVISION or name == 'mobilenet_v1'
    if not args.no_torch and can_torch:
      row.update(bench_torch(name, args.size, args.batch, repeats, args.channels_last,
                             args.dtype))
      row['train_ratio'] = row['jax_train_img_s'] / row['torch_train_img_s']
      row['infer_ratio'] = row['jax_infer_img_s'] / row['torch_infer_img_s']
    rows.append(row)
    _print_row(row, header=len(rows) == 1)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'peak_gflop_s': peak, 'xla_flags': os.environ.get('XLA_FLAGS', ''),
                 'rows': rows}, f, indent=2)


COLUMNS = (('model', '{}'), ('jax_compile_s', '{:.1f}'), ('jax_train_img_s', '{:.1f}'),
           ('torch_train_img_s', '{:.1f}'), ('train_ratio', '{:.2f}'),
           ('jax_infer_img_s', '{:.1f}'), ('torch_infer_img_s', '{:.1f}'),
           ('infer_ratio', '{:.2f}'), ('jax_train_gflop_s', '{:.0f}'),
           ('jax_train_peak_frac', '{:.0%}'), ('jax_infer_gflop_s', '{:.0f}'),
           ('jax_infer_peak_frac', '{:.0%}'))


def _print_row(row: dict[str, Any], header: bool) -> None:
  if header:
    print(' | '.join(c for c, _ in COLUMNS))
  print(' | '.join(fmt.format(row[c]) if row.get(c) is not None else '-' for c, fmt in COLUMNS),
        flush=True)


if __name__ == '__main__':
  main()
