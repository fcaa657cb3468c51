"""Prediction Difference Analysis: ms per heat map, vectorised (jit + vmap chunks) vs a Python loop.

  python benchmarks/pda.py [--quick] [--json FILE] [--pixel224] [--reference-setting]

MobileNet v1 (width 0.5, random init: timing only, 14 classes). Feature level: PDA over the last
feature map (7 x 7 x 512 for 224-px input, 2 x 2 x 512 for 64 px), only the head re-evaluated.
Pixel level: PDA over the input (64 px; 224 px with --pixel224), whole network re-evaluated.
Both implementations run in the same process on the same inputs, samplers and keys; the loop
(benchmarks/_pda_reference.py) does one jitted forward call per window on its S samples, as the
reference code of Zintgraf et al. batches them, with its sampling in Python. Sampler fitting and
compilation are timed separately (compile = first call minus a warm call).

--reference-setting times Zintgraf et al.'s setting on a 224-px image (10 x 10 windows, stride 1,
S = 10: 462,250 forward passes), vectorised only: an accelerator job; --reference-chunks=1024,4096
adds a row per chunk size (perturbed images per forward call). --dtype=bfloat16 computes the
network in bfloat16 (parameters and the relevance arithmetic stay float32). --save-maps F.npz
keeps the relevance maps; --compare-maps A.npz B.npz prints how two runs' maps agree (the same
keys and samples, e.g. float32 vs bfloat16).
"""

import argparse
import json
import os
import pathlib
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import _pda_reference  # noqa: E402

from cxr_jax.explain import prediction_difference as pda  # noqa: E402
from cxr_jax.models import mobilenet  # noqa: E402

NUM_CLASSES = 14


def smooth_images(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
  """[n, size, size, 3] grey (replicated to RGB as the pipeline does) smooth random fields."""
  coarse = rng.uniform(0.0, 1.0, (n, size // 8 + 1, size // 8 + 1))
  fine = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)[:, :size, :size]
  noise = rng.normal(0.0, 0.05, (n, size, size))
  grey = (fine + noise).astype(np.float32)
  return np.repeat(grey[..., None], 3, axis=-1)


class Setup:
  """The model, its functions and a fitted training set at one input size."""

  def __init__(self, size: int, width: float, num_train: int, impl: str, seed: int = 0,
               dtype: str = 'float32'):
    self.model = mobilenet.MobileNetV1(num_classes=NUM_CLASSES, width_multiplier=width,
                                       depthwise_impl=impl, dtype=getattr(jnp, dtype))
    rng = np.random.default_rng(seed)
    self.train_images = smooth_images(rng, num_train, size)
    self.image = smooth_images(rng, 1, size)[0]
    self.variables = self.model.init(jax.random.key(seed), jnp.asarray(self.image[None]))
    model, variables = self.model, self.variables
    self.logits_fn = jax.jit(lambda x: model.apply(variables, x))
    features_fn = jax.jit(lambda x: model.apply(variables, x, return_features=True)[1])
    if hasattr(mobilenet, 'head_fn'):
      self.head_fn = mobilenet.head_fn(model, variables)
    else:  # before the lead's helper existed: GAP + the 'head' Dense
      head = variables['params']['head']
      self.head_fn = lambda f: jnp.mean(f, axis=(1, 2)) @ head['kernel'] + head['bias']
    self.head_fn_jit = jax.jit(self.head_fn)
    self.train_features = np.concatenate([np.asarray(features_fn(self.train_images[i:i + 16]))
                                          for i in range(0, num_train, 16)])
    self.features = np.asarray(features_fn(self.image[None]))[0]


def time_case(setup: Setup, *, level: str, sampler_kind: str, window: int, stride: int,
              padding: int, num_samples: int, chunk_size: int, loop: bool, reps: int,
              maps: dict | None = None) -> dict:
  """Times one setting; with `maps`, also stores its relevance map there."""
  if level == 'features':
    fn, jit_fn, x, train = setup.head_fn, setup.head_fn_jit, setup.features, setup.train_features
  else:
    fn, jit_fn, x, train = setup.logits_fn, setup.logits_fn, setup.image, setup.train_images
  t0 = time.perf_counter()
  sampler = pda.make_sampler(sampler_kind, train, window=window, padding=padding)
  fit_s = time.perf_counter() - t0
  kwargs = dict(window=window, stride=stride, num_samples=num_samples, key=jax.random.key(0))
  run = lambda: pda.prediction_difference(fn, x, sampler, chunk_size=chunk_size,
                                          **kwargs).block_until_ready()
  t0 = time.perf_counter()
  rel = run()
  if maps is not None:
    maps[f'{level}_{sampler_kind}_w{window}_s{stride}_S{num_samples}_c{chunk_size}'] = (
        np.asarray(rel))
  first_s = time.perf_counter() - t0
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  vec_ms = 1e3 * float(np.median(times))
  row = dict(level=level, map=list(x.shape), sampler=sampler_kind, window=window, stride=stride,
             padding=padding if sampler_kind == 'conditional' else None, samples=num_samples,
             windows=(pda.num_forward_passes(x.shape[:2], window, stride, 1) - 1),
             forward_passes=pda.num_forward_passes(x.shape[:2], window, stride, num_samples),
             chunk_size=chunk_size, fit_s=round(fit_s, 3),
             compile_s=round(first_s - vec_ms / 1e3, 3), vmapped_ms=round(vec_ms, 2),
             loop_ms=None, speedup=None, max_abs_diff=None, device=jax.devices()[0].device_kind)
  if loop:
    jit_fn(jnp.asarray(x[None]))  # compile both batch shapes the loop uses outside the timing
    jit_fn(jnp.repeat(jnp.asarray(x[None]), num_samples, axis=0))
    loop_times = []
    while True:  # a second run when cheap: the first one also compiles the eager random ops
      t0 = time.perf_counter()
      want = _pda_reference.pda_loop(jit_fn, x, sampler, jit=False, **kwargs)
      loop_times.append(time.perf_counter() - t0)
      if len(loop_times) == 2 or loop_times[0] > 3.0:
        break
    loop_ms = 1e3 * min(loop_times)
    row.update(loop_ms=round(loop_ms, 1), speedup=round(loop_ms / vec_ms, 1),
               max_abs_diff=float(np.abs(np.asarray(rel) - want).max()))
  return row


def print_table(rows: list[dict]) -> None:
  cols = ['level', 'dtype', 'map', 'sampler', 'window', 'stride', 'padding', 'samples', 'windows',
          'forward_passes', 'chunk_size', 'fit_s', 'compile_s', 'vmapped_ms', 'loop_ms',
          'speedup', 'max_abs_diff']
  fmt = lambda v: ('x'.join(map(str, v)) if isinstance(v, list) else
                   '-' if v is None else f'{v:.1e}' if isinstance(v, float) and v and v < 1e-2
                   else str(v))
  cells = [[fmt(r[c]) for c in cols] for r in rows]
  widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
  print(' | '.join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
  print('-|-'.join('-' * w for w in widths))
  for r in cells:
    print(' | '.join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


def compare_maps(path_a: str, path_b: str) -> list[dict]:
  """Agreement of the maps both .npz files hold: max |a - b| against max |a|, Pearson r over
  all classes and pixels, and the overlap of each class's top-1% pixels."""
  a, b = np.load(path_a), np.load(path_b)
  rows = []
  for key in sorted(set(a.files) & set(b.files)):
    x, y = a[key].astype(np.float64), b[key].astype(np.float64)  # [K, H, W]
    k = max(1, x[0].size // 100)
    top = lambda m, k=k: set(np.argsort(m.ravel())[-k:])
    overlap = np.mean([len(top(xi) & top(yi)) / k for xi, yi in zip(x, y, strict=True)])
    rows.append({'map': key, 'max_abs_diff': float(np.abs(x - y).max()),
                 'max_abs': float(np.abs(x).max()),
                 'pearson_r': float(np.corrcoef(x.ravel(), y.ravel())[0, 1]),
                 'top1pct_overlap': float(overlap)})
    print(json.dumps(rows[-1]))
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='fewer settings, one timed repeat')
  parser.add_argument('--json', help='write the rows to this JSON file')
  parser.add_argument('--pixel224', action='store_true',
                      help='add pixel-level rows at 224 px (vectorised only)')
  parser.add_argument('--reference-setting', action='store_true',
                      help='time 10x10 windows, stride 1, S=10 at 224 px (462k passes)')
  parser.add_argument('--width', type=float, default=0.5)
  parser.add_argument('--num-train', type=int, default=32)
  parser.add_argument('--chunk-size', type=int, default=256)
  parser.add_argument('--depthwise-impl', default='shifts', choices=['shifts', 'xla'])
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'],
                      help="the network's compute dtype")
  parser.add_argument('--reference-chunks', default='',
                      help='with --reference-setting: more chunk sizes, comma-separated')
  parser.add_argument('--save-maps', default=None,
                      help='write every relevance map to this .npz (compare fp32 with bf16)')
  parser.add_argument('--only-reference', action='store_true',
                      help='time the reference-setting rows only (a short GPU job)')
  parser.add_argument('--compare-maps', nargs=2, default=None, metavar=('A', 'B'),
                      help='compare two --save-maps files and exit')
  args = parser.parse_args()
  if args.compare_maps:
    compare_maps(*args.compare_maps)
    return
  reps = 1 if args.quick else 3
  print(f'devices: {jax.devices()}  jax {jax.__version__}')

  passes = {
      'pixel level, 224 px, 10x10 windows, stride 1, S=10':
          pda.num_forward_passes((224, 224), 10, 1, 10),
      'feature level, 7x7 map (224 px), 1x1 windows, stride 1, S=10':
          pda.num_forward_passes((7, 7), 1, 1, 10),
      'feature level, 7x7 map (224 px), 2x2 windows, stride 1, S=10':
          pda.num_forward_passes((7, 7), 2, 1, 10),
  }
  print('forward passes per heat map (incl. the unperturbed one):')
  for name, n in passes.items():
    print(f'  {name}: {n:,}')

  rows = []
  big = Setup(224, args.width, args.num_train, args.depthwise_impl, dtype=args.dtype)
  small = Setup(64, args.width, args.num_train, args.depthwise_impl, dtype=args.dtype)
  cs = args.chunk_size
  cases = [  # (setup, level, sampler, window, stride, padding, S, loop[, chunk size])
      (big, 'features', 'marginal', 1, 1, 0, 10, True),
      (big, 'features', 'conditional', 1, 1, 1, 10, True),
      (small, 'pixels', 'marginal', 8, 8, 0, 10, True),
      (small, 'pixels', 'conditional', 8, 8, 2, 10, True),
  ]
  if args.only_reference:
    cases, args.reference_setting = [], True
  if not args.quick and not args.only_reference:
    cases += [
        (big, 'features', 'marginal', 2, 1, 0, 10, True),
        (big, 'features', 'marginal', 1, 1, 0, 50, True),
        (small, 'features', 'marginal', 1, 1, 0, 10, True),
        (small, 'pixels', 'marginal', 4, 4, 0, 10, True),
        (small, 'pixels', 'marginal', 8, 4, 0, 10, True),
    ]
  if args.pixel224:
    cases += [(big, 'pixels', 'marginal', 16, 16, 0, 10, False),
              (big, 'pixels', 'conditional', 16, 16, 2, 10, False)]
  if args.reference_setting:
    chunks = [cs] + [int(c) for c in args.reference_chunks.split(',') if c]
    cases += [(big, 'pixels', 'marginal', 10, 1, 0, 10, False, c) for c in chunks]
  maps = {} if args.save_maps else None
  for setup, level, kind, window, stride, padding, s, loop, *chunk in cases:
    row = time_case(setup, level=level, sampler_kind=kind, window=window, stride=stride,
                    padding=padding, num_samples=s, chunk_size=chunk[0] if chunk else cs,
                    loop=loop, reps=reps, maps=maps)
    if maps is not None:
      np.savez_compressed(args.save_maps, **maps)
    row['dtype'] = args.dtype
    rows.append(row)
    if args.json:  # after every row: a run cut short keeps what it finished
      pathlib.Path(args.json).write_text(json.dumps({'device': str(jax.devices()[0]),
                                                     'rows': rows}, indent=2))
    print(f"  {level} {row['map']} {kind} w{window} s{stride} S{s}: {row['vmapped_ms']} ms "
          f"(loop {row['loop_ms']} ms)", flush=True)
  print()
  print_table(rows)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(
        {'device': str(jax.devices()[0]), 'jax': jax.__version__, 'width': args.width,
         'dtype': args.dtype,
         'forward_passes': passes, 'rows': rows}, indent=2))
    print(f'wrote {args.json}')


if __name__ == '__main__':
  main()
