"""Paper 002's two expensive steps, cxr_jax vs a torch twin in the same run.

1. The classifier's train step: ResNet-50 at 512 x 512 (paper: batch 32), weighted BCE of eq. 10
   with counts over the global batch, Adam 1e-4; torch: torchvision's resnet50, the same loss.
2. The alignment module's train step: ResNet-18 regressing (s_x, s_y, t_x, t_y, theta) ->
   affine warp (cxr_jax's JAX sampler vs torch's `F.affine_grid` + `F.grid_sample`) -> 16 x 16
   average pooling + bilinear restore -> L_e + L_p on conv2_x..conv5_x of a frozen ResNet-50
   (paper: batch 16), SGD 1e-3.

  python benchmarks/disease_masks.py                    # 512 px, batch 32 / 16 (a GPU's job)
  python benchmarks/disease_masks.py --batch=4 --align_batch=4 --repeats=2   # a small CPU
  python benchmarks/disease_masks.py --memory_only      # compile, print XLA's memory estimate
  python benchmarks/disease_masks.py --quick --json out.json

Prints images/s of both and the JAX/torch ratio, the JAX compile time, and XLA's estimate of
the step's memory (arguments + outputs + temporaries of the compiled program) at the batch
timed: at 512 px and batch 32 the ResNet-50 step needs more memory than a 2-core laptop has
to spare, so on a CPU time a smaller batch (throughput per image barely depends on it there)
and read the memory estimate of batch 32 with --memory_only.

The torch twin is timed in a subprocess of this script (--torch_only) that never loads
TensorFlow: in one process with TensorFlow (cxr_jax.alignment_train -> cxr_jax.data.pipeline)
torch's train step segfaulted (libtriton.so; libc.so with torch imported first).
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
import ml_collections
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import backbones  # noqa: E402

from cxr_jax.attention import alignment as al  # noqa: E402  (JAX and numpy only)

# The torch twin runs in its own process (--torch_only) without TensorFlow: torch in a process
# that has loaded TensorFlow (cxr_jax.alignment_train -> cxr_jax.data.pipeline) segfaulted here.
TORCH_ONLY = '--torch_only' in sys.argv
if not TORCH_ONLY:
  from cxr_jax import alignment_train, losses, optim, parallel  # noqa: E402
  from cxr_jax.config_lib import base_config  # noqa: E402
  from cxr_jax.models import build_model  # noqa: E402
  from cxr_jax.train_step import create_train_state, make_train_step  # noqa: E402

NUM_CLASSES = 14
LAYERS = ('conv2_x', 'conv3_x', 'conv4_x', 'conv5_x')


def _memory_gb(compiled) -> float | None:
  try:
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes -
             m.alias_size_in_bytes)
    return total / 2**30
  except Exception:  # best effort: not every backend reports it
    return None


def _optimizer(name: str, lr: float, **kwargs):
  cfg = base_config().optimizer
  cfg.name, cfg.learning_rate = name, lr
  cfg.kwargs = ml_collections.ConfigDict(kwargs)
  return optim.build_optimizer(cfg, 100)


def jax_classifier(size: int, batch: int, repeats: int, memory_only: bool) -> dict[str, Any]:
  mesh = parallel.make_mesh()
  model = build_model(ml_collections.ConfigDict({'name': 'resnet50'}), num_classes=NUM_CLASSES,
                      bn_axis_name=parallel.DATA_AXIS)
  tx = _optimizer('adam', 1e-4)
  state = create_train_state(model, tx, (size, size, 3), jax.random.key(0), mesh)
  rng = np.random.default_rng(0)
  data = parallel.to_global(
      {'image': rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32),
       'labels': (rng.random((batch, NUM_CLASSES)) < 0.1).astype(np.float32)}, mesh)
  step = make_train_step(model, tx, losses.get_loss('weighted_bce'), mesh)
  key = jax.random.key(1)
  t0 = time.perf_counter()
  compiled = step.lower(state, data, key).compile()
  out = {'jax_compile_s': time.perf_counter() - t0, 'jax_memory_gb': _memory_gb(compiled)}
  if memory_only:
    return out
  holder = {'state': state}

  def one():
    holder['state'], metrics = compiled(holder['state'], data, key)
    return metrics['loss']

  out['jax_img_s'] = batch / backbones._timeit(one, repeats)
  return out


def _torch_device():
  import torch  # noqa: PLC0415
  return 'cuda' if jax.devices()[0].platform == 'gpu' and torch.cuda.is_available() else 'cpu'


def torch_classifier(size: int, batch: int, repeats: int) -> dict[str, Any]:
  import torch  # noqa: PLC0415
  import torchvision  # noqa: PLC0415
  torch.set_num_threads(os.cpu_count())
  device = _torch_device()
  model = torchvision.models.resnet50(weights=None, num_classes=NUM_CLASSES).to(device).train()
  opt = torch.optim.Adam(model.parameters(), 1e-4)
  x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
  y = (torch.rand(batch, NUM_CLASSES, device=device) < 0.1).float()

  def weighted_bce(logits, labels):  # eq. 10 over all entries, the mean over classes
    pos = labels.sum()
    total = labels.numel()
    w_pos, w_neg = total / pos.clamp(min=1), total / (total - pos).clamp(min=1)
    nll = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction='none')
    return (nll * (labels * w_pos + (1 - labels) * w_neg)).mean()

  def one():
    opt.zero_grad(set_to_none=True)
    loss = weighted_bce(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()

  return {'torch_img_s': batch / backbones._timeit(one, repeats)}


def jax_alignment(size: int, batch: int, repeats: int, kernel: int, memory_only: bool
                  ) -> dict[str, Any]:
  mesh = parallel.make_mesh()
  cfg = ml_collections.ConfigDict({'model': {'name': 'resnet18'}})
  model = alignment_train.build_regressor(cfg, bn_axis_name=parallel.DATA_AXIS)
  loss_model = build_model(ml_collections.ConfigDict({'name': 'resnet50'}),
                           num_classes=NUM_CLASSES)
  loss_vars = jax.jit(loss_model.init)(jax.random.key(2, impl='rbg'),
                                       jnp.zeros((1, size, size, 3)))
  tx = _optimizer('sgd', 1e-3, momentum=0.0)
  state = create_train_state(model, tx, (size, size, 3), jax.random.key(0), mesh)
  state = state.replace(params=jax.device_put(al.identity_head(state.params),
                                              parallel.replicated(mesh)))
  rng = np.random.default_rng(0)
  images = parallel.to_global(
      {'image': rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)}, mesh)['image']
  anchor = jnp.asarray(rng.uniform(-1, 1, (size, size, 3)).astype(np.float32))
  feats = alignment_train.anchor_features(loss_model, loss_vars, anchor, LAYERS)
  step = alignment_train.make_align_step(model, loss_model, tx, mesh, layers=LAYERS,
                                         smooth_kernel=kernel, fill=-1.0, reduction='mean')
  t0 = time.perf_counter()
  compiled = step.lower(state, images, anchor, feats, loss_vars).compile()
  out = {'jax_compile_s': time.perf_counter() - t0, 'jax_memory_gb': _memory_gb(compiled)}
  if memory_only:
    return out
  holder = {'state': state}

  def one():
    holder['state'], metrics = compiled(holder['state'], images, anchor, feats, loss_vars)
    return metrics['loss']

  out['jax_img_s'] = batch / backbones._timeit(one, repeats)
  return out


def torch_alignment(size: int, batch: int, repeats: int, kernel: int) -> dict[str, Any]:
  import torch  # noqa: PLC0415
  import torchvision  # noqa: PLC0415
  fn = torch.nn.functional
  torch.set_num_threads(os.cpu_count())
  device = _torch_device()
  regressor = torchvision.models.resnet18(weights=None, num_classes=5).to(device).train()
  with torch.no_grad():  # identity start, as cxr_jax's
    regressor.fc.weight.zero_()
    regressor.fc.bias.copy_(torch.tensor(al.IDENTITY))
  loss_net = torchvision.models.resnet50(weights=None).to(device).eval()
  for p in loss_net.parameters():
    p.requires_grad_(False)

  def features(x):
    x = loss_net.maxpool(loss_net.relu(loss_net.bn1(loss_net.conv1(x))))
    out = []
    for layer in (loss_net.layer1, loss_net.layer2, loss_net.layer3, loss_net.layer4):
      x = layer(x)
      out.append(x)
    return out

  opt = torch.optim.SGD(regressor.parameters(), 1e-3)
  images = torch.rand(batch, 3, size, size, device=device) * 2 - 1
  anchor = torch.rand(1, 3, size, size, device=device) * 2 - 1
  with torch.no_grad():
    anchor_feats = features(anchor)

  def one():
    opt.zero_grad(set_to_none=True)
    p = regressor(images)
    sx, sy, tx, ty, th = p.unbind(-1)
    c, s = torch.cos(th), torch.sin(th)
    theta = torch.stack([torch.stack([sx * c, -sy * s, tx], -1),
                         torch.stack([sx * s, sy * c, ty], -1)], -2)
    grid = fn.affine_grid(theta, list(images.shape), align_corners=False)
    warped = fn.grid_sample(images + 1, grid, align_corners=False) - 1  # fill = -1
    phi = fn.interpolate(fn.avg_pool2d(warped, kernel, kernel), size=(size, size),
                         mode='bilinear', align_corners=False)
    le = torch.sqrt(((phi - anchor) ** 2).sum(1) + 1e-12).mean((1, 2))
    lp = sum(torch.sqrt(((f - a) ** 2).flatten(1).sum(1) + 1e-12) / f[0].numel()
             for f, a in zip(features(phi), anchor_feats, strict=True))
    loss = (le + lp).mean()
    loss.backward()
    opt.step()
    return loss.item()

  return {'torch_img_s': batch / backbones._timeit(one, repeats)}


def _torch_subprocess(args: argparse.Namespace, part: str) -> dict[str, Any]:
  """The torch twin of `part`, timed in a fresh process of this script (no TensorFlow)."""
  import subprocess  # noqa: PLC0415
  cmd = [sys.executable, __file__, '--torch_only', f'--parts={part}', f'--size={args.size}',
         f'--batch={args.batch}', f'--align_batch={args.align_batch}',
         f'--repeats={args.repeats}']
  done = subprocess.run(cmd, capture_output=True, text=True, check=False)
  for line in done.stdout.splitlines():
    if line.startswith('TORCH_JSON '):
      return json.loads(line[len('TORCH_JSON '):])[part]
  raise RuntimeError(f'the torch twin of {part!r} failed (exit {done.returncode}): '
                     f'{done.stderr[-2000:]}')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--size', type=int, default=512)
  parser.add_argument('--batch', type=int, default=32, help='classifier batch (paper: 32)')
  parser.add_argument('--align_batch', type=int, default=16, help='alignment batch (paper: 16)')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--quick', action='store_true', help='256 px, batch 4 / 4, 2 repeats')
  parser.add_argument('--parts', default='classifier,alignment')
  parser.add_argument('--memory_only', action='store_true',
                      help='compile only: XLA memory estimates, no timing, no torch')
  parser.add_argument('--no_torch', action='store_true')
  parser.add_argument('--torch_only', action='store_true',
                      help='internal: time the torch twin of --parts, print JSON')
  parser.add_argument('--json', default=None)
  args = parser.parse_args()
  if args.quick:
    args.size, args.batch, args.align_batch, args.repeats = 256, 4, 4, 2
  kernel = max(1, args.size // 32)  # the paper's 32 x 32 grid (16 at 512 px)
  platform = jax.devices()[0].platform
  print(f'JAX {jax.__version__} on {jax.device_count()} x {platform}; {os.cpu_count()} CPUs; '
        f'{args.size} px, float32', flush=True)
  if args.torch_only:
    out = {}
    for part in args.parts.split(','):
      batch = args.batch if part == 'classifier' else args.align_batch
      out[part] = (torch_classifier(args.size, batch, args.repeats) if part == 'classifier'
                   else torch_alignment(args.size, batch, args.repeats, kernel))
    print('TORCH_JSON ' + json.dumps(out), flush=True)
    return
  rows = []
  for part in args.parts.split(','):
    batch = args.batch if part == 'classifier' else args.align_batch
    row = {'part': part, 'size': args.size, 'batch': batch, 'platform': platform}
    if part == 'classifier':
      row.update(jax_classifier(args.size, batch, args.repeats, args.memory_only))
      if not (args.no_torch or args.memory_only):
        row.update(_torch_subprocess(args, part))
    elif part == 'alignment':
      row.update(jax_alignment(args.size, batch, args.repeats, kernel, args.memory_only))
      if not (args.no_torch or args.memory_only):
        row.update(_torch_subprocess(args, part))
    else:
      raise SystemExit(f'--parts: unknown part {part!r}; valid: classifier, alignment')
    if row.get('torch_img_s') and row.get('jax_img_s'):
      row['ratio'] = row['jax_img_s'] / row['torch_img_s']
    rows.append(row)
    print(' | '.join(f'{k}={v:.3g}' if isinstance(v, float) else f'{k}={v}'
                     for k, v in row.items()), flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=2)


if __name__ == '__main__':
  main()
