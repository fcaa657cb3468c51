"""Paper 003's train steps on this machine: the custom CNN (LRN included) from scratch and the
VGG16 fine-tune (new 2-way head at 20x the learning rate), cxr_jax against torch twins built
the same way, in the same run.

Each side: SGD momentum 0.9, L2 5e-4 on weights, softmax cross entropy on 2 classes, one
compiled / warmed-up step first, then the minimum over `--repeats` timed steps (shared
machines: the minimum is the least disturbed). Each cxr_jax step is compiled with its config's
`cpu_fusions` (configs/tb/custom_cnn.py, vgg16.py). Prints a table; `--json FILE` writes the rows.

  python benchmarks/tb_train_step.py                  # CPU: custom CNN 227 px b16, VGG16 b4
  python benchmarks/tb_train_step.py --batch 64 --vgg_batch 32   # an accelerator
"""

import argparse
import json
import pathlib
import time

import jax
import ml_collections
import numpy as np

from cxr_jax import config_lib, losses, optim, parallel
from cxr_jax.config_lib import base_config
from cxr_jax.models import build_model
from cxr_jax.train_step import create_train_state, make_train_step


def _opt_config(multipliers=None) -> ml_collections.ConfigDict:
  cfg = base_config().optimizer
  cfg.name, cfg.learning_rate = 'sgd', 1e-3
  cfg.kwargs = ml_collections.ConfigDict({'momentum': 0.9})
  cfg.weight_decay, cfg.decay_mask = 5e-4, 'kernels'
  if multipliers:
    cfg.lr_multipliers = ml_collections.ConfigDict(multipliers)
  return cfg


def _min_time(fn, repeats: int) -> float:
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return best


def config_cpu_fusions(name: str) -> tuple[str, ...]:
  """`cpu_fusions` of configs/tb/<name>.py (what a run of that config compiles with)."""
  path = pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'tb' / f'{name}.py'
  return tuple(config_lib.load_sibling(str(path), path.name).get_config().cpu_fusions)


def jax_step(model_cfg: dict, size: int, batch: int, repeats: int, multipliers=None,
             cpu_fusions: tuple[str, ...] = ('dot', 'reduce', 'individual_dot')) -> float:
  mesh = parallel.make_mesh()
  model = build_model(ml_collections.ConfigDict(model_cfg), num_classes=2,
                      bn_axis_name=parallel.DATA_AXIS)
  tx = optim.build_optimizer(_opt_config(multipliers), 100)
  state = create_train_state(model, tx, (size, size, 3), jax.random.key(0), mesh)
  rng = np.random.default_rng(0)
  data = parallel.to_global({'image': rng.normal(size=(batch, size, size, 3)).astype(np.float32),
                             'label': rng.integers(0, 2, batch).astype(np.int32)}, mesh)
  step = make_train_step(model, tx, losses.get_loss('softmax_ce'), mesh, target='label',
                         cpu_fusions=cpu_fusions)
  holder = {'state': state}
  key = jax.random.key(1)

  def one():
    holder['state'], m = step(holder['state'], data, key)
    jax.block_until_ready(m['loss'])

  one()
  return _min_time(one, repeats)


def torch_custom_cnn(size: int):
  import torch
  from torch import nn
  feats = nn.Sequential(
      nn.Conv2d(3, 96, 7, 2), nn.ReLU(), nn.LocalResponseNorm(5, 1e-4, 0.75, 2.0),
      nn.MaxPool2d(3, 2), nn.Conv2d(96, 128, 3), nn.ReLU(),
      nn.LocalResponseNorm(5, 1e-4, 0.75, 2.0), nn.MaxPool2d(3, 2),
      nn.Conv2d(128, 256, 3), nn.ReLU(), nn.Conv2d(256, 256, 3), nn.ReLU(),
      nn.Conv2d(256, 256, 3), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Flatten())
  n = feats(torch.zeros(1, 3, size, size)).shape[1]
  head = nn.Linear(4096, 2)
  model = nn.Sequential(feats, nn.Linear(n, 4096), nn.ReLU(), nn.Dropout(0.5),
                        nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(0.5), head)
  return model, head


def torch_step(model, head, size: int, batch: int, repeats: int, head_factor: float = 1.0
               ) -> float:
  import torch
  head_ids = {id(p) for p in head.parameters()}
  weights = [p for p in model.parameters() if p.ndim > 1 and id(p) not in head_ids]
  biases = [p for p in model.parameters() if p.ndim == 1 and id(p) not in head_ids]
  opt = torch.optim.SGD([{'params': weights, 'weight_decay': 5e-4},
                         {'params': biases, 'weight_decay': 0.0},
                         {'params': [head.weight], 'weight_decay': 5e-4, 'lr': 1e-3 * head_factor},
                         {'params': [head.bias], 'weight_decay': 0.0, 'lr': 1e-3 * head_factor}],
                        lr=1e-3, momentum=0.9)
  x = torch.randn(batch, 3, size, size)
  y = torch.randint(0, 2, (batch,))
  loss_fn = torch.nn.CrossEntropyLoss()
  model.train()

  def one():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()

  one()
  return _min_time(one, repeats)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=16, help='custom CNN batch')
  parser.add_argument('--vgg_batch', type=int, default=4, help='VGG16 batch')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--json', default=None)
  args = parser.parse_args()
  import torch
  import torchvision
  rows = []
  jt = jax_step({'name': 'custom_cnn'}, 227, args.batch, args.repeats,
                cpu_fusions=config_cpu_fusions('custom_cnn'))
  model, head = torch_custom_cnn(227)
  tt = torch_step(model, head, 227, args.batch, args.repeats)
  rows.append({'model': 'custom CNN (LRN), from scratch', 'size': 227, 'batch': args.batch,
               'jax_s': jt, 'torch_s': tt})
  jt = jax_step({'name': 'vgg16'}, 224, args.vgg_batch, args.repeats, {'classifier_6': 20.0},
                cpu_fusions=config_cpu_fusions('vgg16'))
  vgg = torchvision.models.vgg16(num_classes=2)
  tt = torch_step(vgg, vgg.classifier[6], 224, args.vgg_batch, args.repeats, 20.0)
  rows.append({'model': 'VGG16 fine-tune (head x20)', 'size': 224, 'batch': args.vgg_batch,
               'jax_s': jt, 'torch_s': tt})
  print(f'device: {jax.devices()[0].platform} x{jax.device_count()}, torch threads '
        f'{torch.get_num_threads()}')
  print('| model | px | batch | cxr_jax step (s) | torch step (s) | torch / cxr_jax |')
  print('| --- | ---: | ---: | ---: | ---: | ---: |')
  for r in rows:
    r['ratio'] = r['torch_s'] / r['jax_s']
    print(f"| {r['model']} | {r['size']} | {r['batch']} | {r['jax_s']:.3f} | "
          f"{r['torch_s']:.3f} | {r['ratio']:.2f} |")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=1)


if __name__ == '__main__':
  main()
