"""Paper 001 (multi-attention): Table 1's models and the localisation path, cxr_jax vs references.

Part A, models: ResNet-101 as BSL, BSL+FAM (squeeze-and-excitation, r = 16, in every block) and
BSL+FAM+SAM (+ the space attention head). cxr_jax's data-parallel train step
(`make_train_step` on all local devices, SGD momentum 0.9 + L2 1e-4, sigmoid BCE, as the
paper's recipe) and jitted inference against torchvision's resnet101 in the same run: FAM there
is an SE module called by a forward hook on every Bottleneck's `bn3` (the residual branch before
the addition, where ours sits), SAM replaces `avgpool`/`fc` by mean -> tile -> concat ->
1x1 conv (2C -> 14) -> mean. Images/s for both, the ratios JAX/torch, and the JAX compile time.

Part B, localisation (14 classes, features [N, 7, 7, 2048], the SAM head of a ResNet-101 with
random parameters): CAM of every class (`score_map_fn`, jitted); Grad-CAM of every class with
`cam.grad_cam` (one program; its 14 backward passes one at a time or all vmapped) against a
Python loop of 14 calls to a
jitted per-class `jax.grad` Grad-CAM (checked equal first; compile excluded for both); heat
map -> boxes on 224 x 224 upsampled maps (numpy/scipy).

  python benchmarks/multi_attention.py --quick          # BSL+FAM+SAM at 128 px, then Part B
  python benchmarks/multi_attention.py --json out.json  # CPU: 224 px, batch 8, float32
  python benchmarks/multi_attention.py                  # GPU: batch 96, float32 and bfloat16

On a GPU both frameworks run on it (torch with bf16 autocast for the bfloat16 rows), as in
benchmarks/backbones.py, whose timing helpers this script reuses.
"""

import argparse
import gc
import json
import os
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# On a GPU torch runs in the same process: JAX must not reserve 75% of the memory up front.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import backbones  # noqa: E402

from cxr_jax import optim  # noqa: E402
from cxr_jax.attention.space_attention import SpaceAttentionHead  # noqa: E402
from cxr_jax.config_lib import base_config  # noqa: E402
from cxr_jax.explain import boxes, cam, overlays  # noqa: E402
from cxr_jax.models.resnet import ResNet101, head_fn, score_map_fn  # noqa: E402

NUM_CLASSES = 14
# Table 1's columns without hard examples: (label, se_reduction, head).
MODELS = {'BSL': (0, 'gap_dense'), 'BSL+FAM': (16, 'gap_dense'),
          'BSL+FAM+SAM': (16, 'space_attention')}
QUICK = ('BSL+FAM+SAM',)
_timeit = backbones._timeit


def paper_optimizer() -> ml_collections.ConfigDict:
  """Paper 001's optimiser (configs/multi_attention/_common.py): SGD, momentum 0.9, L2 1e-4."""
  cfg = base_config().optimizer
  cfg.name = 'sgd'
  cfg.learning_rate = 0.01
  cfg.kwargs = ml_collections.ConfigDict({'momentum': 0.9})
  cfg.weight_decay = 1e-4
  cfg.decoupled = False
  return cfg


# --- Part A: models -------------------------------------------------------------------------

def bench_jax(label: str, size: int, batch: int, dtype: str, repeats: int) -> dict[str, Any]:
  """backbones.bench_jax for a ResNet-101 with paper 001's modules switched by `label`."""
  se_reduction, head = MODELS[label]

  def build(**kw) -> ResNet101:
    return ResNet101(num_classes=NUM_CLASSES, se_reduction=se_reduction, head=head,
                     dtype=getattr(jnp, dtype), **kw)

  out = backbones.time_jax_model(build, optim.build_optimizer(paper_optimizer(), 100), size,
                                 batch, repeats)
  train_flops, infer_flops = out.pop('train_flops'), out.pop('infer_flops')
  out['jax_train_gflop_s'] = train_flops / out['jax_train_s'] / 1e9 if train_flops else None
  out['jax_infer_gflop_s'] = infer_flops / out['jax_infer_s'] / 1e9 if infer_flops else None
  return out


def torch_model(torch, label: str):
  """torchvision resnet101 with paper 001's modules added as `label` asks."""
  import torchvision  # noqa: PLC0415
  nn = torch.nn
  se_reduction, head = MODELS[label]
  model = torchvision.models.resnet101(weights=None, num_classes=NUM_CLASSES)

  class SqueezeExcite(nn.Module):
    def __init__(self, c: int, r: int):
      super().__init__()
      self.body = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, c // r),
                                nn.ReLU(inplace=True), nn.Linear(c // r, c), nn.Sigmoid())

    def forward(self, x):
      return self.body(x)[:, :, None, None]

  class SpaceAttention(nn.Module):
    def __init__(self, c: int, k: int):
      super().__init__()
      self.classifier = nn.Conv2d(2 * c, k, 1)

    def forward(self, x):
      pooled = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
      return self.classifier(torch.cat([x, pooled], dim=1)).mean(dim=(2, 3))

  if se_reduction:
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
      for block in stage:
        # A submodule of the block, so that it is in model.parameters() and trains; the hook
        # replaces bn3's output (the residual branch, before `out += identity`).
        block.se = SqueezeExcite(block.bn3.num_features, se_reduction)
        block.bn3.register_forward_hook(lambda mod, inp, out, se=block.se: out * se(out))
  if head == 'space_attention':
    # torchvision's forward is avgpool -> flatten -> fc: the head takes avgpool's place and
    # returns logits [B, K], which flatten leaves alone.
    model.avgpool = SpaceAttention(model.fc.in_features, NUM_CLASSES)
    model.fc = nn.Identity()
  return model


def bench_torch(label: str, size: int, batch: int, repeats: int, channels_last: bool,
                dtype: str, threads: int | None = None) -> dict[str, Any]:
  """The torch reference on the GPU when JAX runs on one (bf16 via autocast), else on `threads`
  CPU threads (default all cores)."""
  import torch  # noqa: PLC0415

  torch.manual_seed(0)
  return backbones.time_torch_model(
      torch_model(torch, label), size, batch, repeats, channels_last, dtype,
      lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4),
      threads=threads)


def _release_torch_memory() -> None:
  """Returns torch's cached GPU memory (the model is gone) to the next JAX model."""
  import torch  # noqa: PLC0415
  if torch.cuda.is_available():
    gc.collect()
    torch.cuda.empty_cache()


# --- Part B: localisation -------------------------------------------------------------------

def per_class_grad_cam(head: Callable[[jax.Array], jax.Array]
                       ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """The reference's unit: jit((features [N, h, w, C], class k) -> Grad-CAM of k [N, h, w]).

  The class is a traced argument, so the function compiles once for all classes. Summing class
  k's logits over the images gives every image its own gradient (eval-mode head: images are
  independent). The reference calls it for k = 0 .. K-1 in a Python loop.
  """

  @jax.jit
  def per_class(features: jax.Array, k: jax.Array) -> jax.Array:
    grads = jax.grad(lambda f: jnp.sum(head(f)[:, k]))(features)
    alpha = jnp.mean(grads, axis=(1, 2))  # [N, C]
    return jax.nn.relu(jnp.einsum('nc,nhwc->nhw', alpha, features))

  return per_class


def bench_localization(n: int, repeats: int, image_size: int = 224, h: int = 7,
                       channels: int = 2048) -> list[dict[str, Any]]:
  """Part B rows: CAM, Grad-CAM (vmapped and looped), heat map -> boxes."""
  model = ResNet101(num_classes=NUM_CLASSES, head='space_attention')
  rng = np.random.default_rng(0)
  # Post-ReLU-like features: non-negative, mostly small.
  features = jnp.asarray(np.maximum(rng.normal(size=(n, h, h, channels)), 0.0)
                         .astype(np.float32))
  # Only the head's parameters matter: init the head alone, at the path the ResNet gives it.
  head_vars = SpaceAttentionHead(NUM_CLASSES).init(jax.random.key(0), features[:1])
  variables = {'params': {'space_attention': head_vars['params']}}
  head, score_map = head_fn(model, variables), score_map_fn(model, variables)
  maps_per_call = n * NUM_CLASSES
  rows = []

  def row(method: str, seconds: float, compile_s: float | None, **extra) -> dict[str, Any]:
    return {'method': method, 'n': n, 'ms_per_batch': seconds * 1e3,
            'maps_s': maps_per_call / seconds, 'compile_s': compile_s, **extra}

  def compiled(fn, *args):
    t0 = time.perf_counter()
    out = jax.jit(fn).lower(*args).compile()
    return out, time.perf_counter() - t0

  cam_fn, cam_compile = compiled(lambda f: cam.cam(score_map, f), features)
  rows.append(row('cam (score_map_fn, jit)', _timeit(lambda: cam_fn(features), repeats),
                  cam_compile))

  per_class = per_class_grad_cam(head)
  t0 = time.perf_counter()
  per_class.lower(features, jnp.int32(0)).compile()
  loop_compile = time.perf_counter() - t0
  looped = lambda: jnp.stack([per_class(features, jnp.int32(k)) for k in range(NUM_CLASSES)],
                             axis=-1)
  # Correctness before speed: every variant must give the reference's maps. Checked at full
  # float32 matmul precision (GPUs default to TF32, whose rounding differs between programs by
  # ~1e-3); the timings below use the default. A map value is a 2048-term sum with
  # cancellation, so near-zero values get an absolute tolerance on the maps' scale.
  with jax.default_matmul_precision('highest'):
    reference = np.asarray(looped())  # `per_class` retraces under the new precision
  loop_s = _timeit(looped, repeats)
  # cam.grad_cam maps its K backward passes inside one program, `class_batch` vectorised at a
  # time: 1 = sequential (lax.map), K = all vmapped.
  for class_batch in (1, NUM_CLASSES):
    fn = lambda f, b=class_batch: cam.grad_cam(head, f, class_batch=b)
    with jax.default_matmul_precision('highest'):
      maps = np.asarray(jax.jit(fn)(features))
    np.testing.assert_allclose(maps, reference, rtol=1e-4,
                               atol=1e-5 * float(np.abs(reference).max()))
    compiled_fn, compile_s = compiled(fn, features)
    seconds = _timeit(lambda c=compiled_fn: c(features), repeats)
    rows.append(row(f'grad_cam (one jit, class_batch={class_batch})', seconds, compile_s,
                    ratio=loop_s / seconds))
  rows.append(row(f'grad_cam ref ({NUM_CLASSES} x jit grad, Python loop)', loop_s, loop_compile,
                  ratio=1.0))

  heat = np.asarray(cam_fn(features))  # [N, h, w, K]
  settings = boxes.BoxSettings()

  def to_boxes() -> int:
    count = 0
    for i in range(n):
      for k in range(NUM_CLASSES):
        up = overlays.upsample(heat[i, :, :, k], (image_size, image_size))
        count += len(boxes.heatmap_to_boxes(up, settings))
    return count

  t0 = time.perf_counter()
  n_boxes = to_boxes()
  box_times = [time.perf_counter() - t0]
  for _ in range(repeats - 1):
    t0 = time.perf_counter()
    to_boxes()
    box_times.append(time.perf_counter() - t0)
  rows.append(row(f'upsample {image_size}px + boxes (numpy)', float(np.median(box_times)), None,
                  boxes=n_boxes))
  return rows


# --- Tables ---------------------------------------------------------------------------------

MODEL_COLUMNS = (('model', '{}'), ('dtype', '{}'), ('size', '{}'), ('batch', '{}'),
                 ('jax_compile_s', '{:.1f}'), ('jax_train_img_s', '{:.2f}'),
                 ('torch_train_img_s', '{:.2f}'), ('train_ratio', '{:.2f}'),
                 ('jax_infer_img_s', '{:.2f}'), ('torch_infer_img_s', '{:.2f}'),
                 ('infer_ratio', '{:.2f}'))
LOC_COLUMNS = (('method', '{}'), ('n', '{}'), ('ms_per_batch', '{:.2f}'), ('maps_s', '{:.0f}'),
               ('ratio', '{:.2f}x'), ('compile_s', '{:.2f}'))


def _print_row(row: dict[str, Any], columns, header: bool) -> None:
  if header:
    print(' | '.join(c for c, _ in columns))
  print(' | '.join(fmt.format(row[c]) if row.get(c) is not None else '-' for c, fmt in columns),
        flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default=None,
                      help=f'comma-separated of {",".join(MODELS)} (default: all)')
  parser.add_argument('--quick', action='store_true', help='BSL+FAM+SAM only, at 128 px')
  parser.add_argument('--size', type=int, default=None, help='default 224 (128 with --quick)')
  parser.add_argument('--batch', type=int, default=None, help='default 96 on a GPU, else 8')
  parser.add_argument('--dtypes', default=None,
                      help='comma-separated float32,bfloat16 (default: both on a GPU, else fp32)')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--loc_batch', type=int, default=None,
                      help='feature maps in Part B (default: 96 on a GPU, else 8)')
  parser.add_argument('--parts', default='models,localization')
  parser.add_argument('--channels_last', action='store_true', help='torch channels_last')
  parser.add_argument('--torch_threads', type=int, default=None,
                      help='torch CPU threads (default: all cores). OpenMP threads that spin '
                      'while another process holds a core can slow torch many times over')
  parser.add_argument('--no_torch', action='store_true', help='skip the torch columns')
  parser.add_argument('--json', default=None, help='write all rows to this file')
  args = parser.parse_args()
  gpu = jax.default_backend() == 'gpu'
  size = args.size or (128 if args.quick else 224)
  batch = args.batch or (96 if gpu else 8)
  loc_batch = args.loc_batch or (96 if gpu else 8)
  dtypes = (args.dtypes.split(',') if args.dtypes
            else ['float32', 'bfloat16'] if gpu else ['float32'])
  labels = args.models.split(',') if args.models else QUICK if args.quick else tuple(MODELS)
  unknown = [m for m in labels if m not in MODELS]
  if unknown:
    parser.error(f'unknown models {unknown}; valid: {",".join(MODELS)}')
  parts = args.parts.split(',')
  platform = jax.devices()[0].platform
  print(f'JAX {jax.__version__} on {jax.device_count()} x {platform}; {os.cpu_count()} CPUs; '
        f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}; repeats {args.repeats}; torch threads '
        f'{args.torch_threads or os.cpu_count()} (CPU)')
  out: dict[str, Any] = {'platform': platform, 'devices': jax.device_count(),
                         'cpus': os.cpu_count(),
                         'torch_threads': args.torch_threads or os.cpu_count(),
                         'xla_flags': os.environ.get('XLA_FLAGS', ''),
                         'models': [], 'localization': []}
  if 'models' in parts:
    print('\nPart A: train step / inference, images/s (ratio = JAX / torch)')
    for dtype in dtypes:
      for label in labels:
        row: dict[str, Any] = {'model': label, 'dtype': dtype, 'size': size, 'batch': batch,
                               'platform': platform}
        row.update(bench_jax(label, size, batch, dtype, args.repeats))
        if not args.no_torch:
          row.update(bench_torch(label, size, batch, args.repeats, args.channels_last, dtype,
                                 args.torch_threads))
          _release_torch_memory()
          row['train_ratio'] = row['jax_train_img_s'] / row['torch_train_img_s']
          row['infer_ratio'] = row['jax_infer_img_s'] / row['torch_infer_img_s']
        out['models'].append(row)
        _print_row(row, MODEL_COLUMNS, header=len(out['models']) == 1)
  if 'localization' in parts:
    print(f'\nPart B: heat maps of {NUM_CLASSES} classes for {loc_batch} feature maps '
          f'[7, 7, 2048], SAM head (ratio = reference time / this time)')
    out['localization'] = bench_localization(loc_batch, max(args.repeats, 5))
    for i, row in enumerate(out['localization']):
      _print_row(row, LOC_COLUMNS, header=i == 0)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(out, f, indent=2)


if __name__ == '__main__':
  main()
