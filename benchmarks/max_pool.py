"""Max pooling forward + input gradient per `impl` next to torch's MaxPool2d, one run.

For the pooling layers of the backbones at 224 px (ResNet's and DenseNet's 3x3/2 stem pool,
VGG-16's five 2x2/2 pools, AlexNet's first 3x3/2), times one jitted forward + backward of
cxr_jax/models/pooling.py's `max_pool` with `impl='xla'` (`flax.linen.max_pool`, before) and
`impl='taps'`, with a ReLU-and-scale producer in front (as the BatchNorm + ReLU before every
pool in the models, so that XLA's fusion decisions are the ones the train step sees), and
torch's `relu` + `MaxPool2d` forward + backward (NCHW and channels_last, all threads). Each
column: the median of `--repeats` timed calls after a warm-up, ms; ratios to 'xla' and torch.

  python benchmarks/max_pool.py                      # batch 16, fp32
  python benchmarks/max_pool.py --batch=64 --json out.json
  python benchmarks/max_pool.py --no_torch --dtype=bfloat16
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

from cxr_jax import xla_options  # noqa: E402
from cxr_jax.models import pooling  # noqa: E402

# name -> (H = W, C, window, stride, padding) of the layer's input at 224 px.
LAYERS = {
    'resnet/densenet stem 3x3/2': (112, 64, 3, 2, ((1, 1), (1, 1))),
    'vgg16 pool1 2x2/2': (224, 64, 2, 2, ((0, 0), (0, 0))),
    'vgg16 pool2 2x2/2': (112, 128, 2, 2, ((0, 0), (0, 0))),
    'vgg16 pool3 2x2/2': (56, 256, 2, 2, ((0, 0), (0, 0))),
    'vgg16 pool4 2x2/2': (28, 512, 2, 2, ((0, 0), (0, 0))),
    'vgg16 pool5 2x2/2': (14, 512, 2, 2, ((0, 0), (0, 0))),
    'alexnet pool1 3x3/2': (55, 64, 3, 2, ((0, 0), (0, 0))),
}


def _median_ms(fn, repeats: int) -> float:
  fn()
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t)
  return 1e3 * float(np.median(ts))


def jax_ms(impl: str, layer: tuple, batch: int, dtype: Any, repeats: int) -> float:
  size, c, window, stride, padding = layer
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, size, size, c)), dtype)
  scale = jnp.ones((c,), dtype)

  def loss(x, scale):
    y = pooling.max_pool(jax.nn.relu(x * scale), window, stride, padding, impl=impl)
    return jnp.sum(y.astype(jnp.float32) ** 2)

  step = xla_options.jit(jax.grad(loss, argnums=(0, 1)))
  return _median_ms(lambda: jax.block_until_ready(step(x, scale)), repeats)


def torch_ms(layer: tuple, batch: int, channels_last: bool, repeats: int) -> float:
  import torch
  size, c, window, stride, padding = layer
  x = torch.randn(batch, c, size, size)
  if channels_last:
    x = x.contiguous(memory_format=torch.channels_last)
  x.requires_grad_(True)
  pool = torch.nn.MaxPool2d(window, stride, padding=padding[0][0])

  def run():
    x.grad = None
    (pool(torch.relu(x)) ** 2).sum().backward()

  return _median_ms(run, repeats)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--repeats', type=int, default=9)
  parser.add_argument('--layers', default=','.join(LAYERS),
                      help=f'comma-separated subset of: {", ".join(LAYERS)}')
  parser.add_argument('--no_torch', action='store_true')
  parser.add_argument('--json', default=None)
  args = parser.parse_args()
  names = [n.strip() for n in args.layers.split(',') if n.strip()]
  unknown = [n for n in names if n not in LAYERS]
  if unknown:
    parser.error(f'--layers: unknown {unknown}; valid: {list(LAYERS)}')
  dtype = jnp.dtype(args.dtype)
  rows = []
  print(f'{jax.default_backend()} ({os.cpu_count()} cores), batch {args.batch}, {args.dtype}, '
        'relu + max pool forward + input gradient, ms (median)')
  header = f'{"layer":30s} {"xla":>8s} {"taps":>8s} {"xla/taps":>9s}'
  if not args.no_torch:
    header += f' {"torch":>8s} {"torch CL":>8s} {"torch/taps":>10s}'
  print(header)
  for name in names:
    layer = LAYERS[name]
    row = {'layer': name, 'xla_ms': jax_ms('xla', layer, args.batch, dtype, args.repeats),
           'taps_ms': jax_ms('taps', layer, args.batch, dtype, args.repeats)}
    line = f'{name:30s} {row["xla_ms"]:8.1f} {row["taps_ms"]:8.1f} ' \
           f'{row["xla_ms"] / row["taps_ms"]:8.2f}x'
    if not args.no_torch:
      row['torch_ms'] = torch_ms(layer, args.batch, False, args.repeats)
      row['torch_channels_last_ms'] = torch_ms(layer, args.batch, True, args.repeats)
      best = min(row['torch_ms'], row['torch_channels_last_ms'])
      line += f' {row["torch_ms"]:8.1f} {row["torch_channels_last_ms"]:8.1f} ' \
              f'{best / row["taps_ms"]:9.2f}x'
    print(line, flush=True)
    rows.append(row)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'backend': jax.default_backend(), 'cpus': os.cpu_count(), 'batch': args.batch,
                 'dtype': args.dtype, 'rows': rows}, f, indent=2)


if __name__ == '__main__':
  main()
