"""Train-step and inference throughput of cxr_jax's MobileNet v1 (paper 000) on this machine.

For each (image size, batch, width, compute dtype, depthwise implementation) it times the
data-parallel train step of cxr_jax/train_step.py over all local devices and a jitted forward
pass, compile time apart, and prints a table; `--json FILE` writes the rows.

  python benchmarks/train_step.py            # CPU-sized defaults
  python benchmarks/train_step.py --gpu      # 224 px, batch 64, fp32 and bf16
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from cxr_jax import losses, optim, parallel
from cxr_jax.config_lib import base_config
from cxr_jax.models.mobilenet import MobileNetV1
from cxr_jax.train_step import create_train_state, make_train_step


def _time(fn, repeats: int) -> float:
  out = fn()
  jax.block_until_ready(out)
  t = time.perf_counter()
  for _ in range(repeats):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / repeats


def bench(size: int, batch: int, width: float, dtype: str, impl: str, repeats: int) -> dict:
  mesh = parallel.make_mesh()
  model = MobileNetV1(num_classes=13, width_multiplier=width, depthwise_impl=impl,
                      dtype=getattr(jnp, dtype), bn_axis_name=parallel.DATA_AXIS)
  tx = optim.build_optimizer(base_config().optimizer, 100)
  state = create_train_state(model, tx, (size, size, 3), jax.random.key(0), mesh)
  rng = np.random.default_rng(0)
  batch_np = {'image': rng.normal(size=(batch, size, size, 3)).astype(np.float32),
              'labels': (rng.random((batch, 13)) < 0.2).astype(np.float32)}
  data = parallel.to_global(batch_np, mesh)
  step = make_train_step(model, tx, losses.get_loss('sigmoid_bce'), mesh)
  key = jax.random.key(1)
  t0 = time.perf_counter()
  state, m = step(state, data, key)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  holder = {'state': state}

  def one_step():
    holder['state'], metrics = step(holder['state'], data, key)
    return metrics['loss']

  train_s = _time(one_step, repeats)
  predict = jax.jit(lambda v, x: model.apply(v, x, train=False))
  variables = holder['state'].variables()
  infer_s = _time(lambda: predict(variables, data['image']), repeats)
  return {'size': size, 'batch': batch, 'width': width, 'dtype': dtype, 'depthwise': impl,
          'devices': mesh.devices.size, 'platform': jax.devices()[0].platform,
          'compile_s': round(compile_s, 2), 'train_img_s': round(batch / train_s, 1),
          'infer_img_s': round(batch / infer_s, 1)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--gpu', action='store_true', help='accelerator-sized settings')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--json', default=None, help='write the rows to this file')
  args = parser.parse_args()
  if args.gpu:
    grid = [(224, 64, 1.0, d, i) for d in ('float32', 'bfloat16') for i in ('xla', 'shifts')]
  else:
    grid = [(64, 64, 0.5, 'float32', i) for i in ('xla', 'shifts')]
    grid += [(224, 16, 1.0, 'float32', i) for i in ('xla', 'shifts')]
  rows = []
  print(f'JAX {jax.__version__} on {jax.devices()}')
  header = ('size', 'batch', 'width', 'dtype', 'depthwise', 'devices', 'compile_s',
            'train_img_s', 'infer_img_s')
  print(' | '.join(f'{h:>11}' for h in header))
  for args_ in grid:
    row = bench(*args_, repeats=args.repeats)
    rows.append(row)
    print(' | '.join(f'{row[h]!s:>11}' for h in header), flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=2)


if __name__ == '__main__':
  main()
