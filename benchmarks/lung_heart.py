"""Paper 004 throughput: the U-Net and the MSA-DenseNet train steps, cxr_jax vs a torch twin in
the same run, and segmentation inference (the `segment` stage's model call) in images/s.

  python benchmarks/lung_heart.py                      # CPU defaults (see --help)
  python benchmarks/lung_heart.py --quick --json out.json
  python benchmarks/lung_heart.py --unet_size=256 --unet_batch=32 --densenet_batch=64  # GPU

Rows: 'unet' (configs/lung_heart_unet.py: depth 4, width 16, soft Dice, Adam + L2 1e-5),
'msa_densenet121' (configs/lung_heart/msa_densenet.py: multi-scale attention + DenseNet-121,
BCE, Adam + L2 1e-4, 224 px) and 'msa_densenet121_fw' (+ feature weighting with masks as an
input), each with the cxr_jax data-parallel train step and inference against torch (eager,
all threads; on the GPU when JAX runs on one), and 'segment' (U-Net probabilities resized to
the stored image and binarised, as `Segmenter.probabilities`; images/s).
"""

import argparse
import json
import pathlib
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import backbones  # noqa: E402

from cxr_jax import losses, optim, parallel  # noqa: E402
from cxr_jax.config_lib import base_config  # noqa: E402
from cxr_jax.models import build_model  # noqa: E402
from cxr_jax.train_step import create_train_state, make_train_step  # noqa: E402

_timeit = backbones._timeit
NUM_CLASSES = 14
STRUCTURES = 3


def _adam(weight_decay: float) -> Any:
  cfg = base_config().optimizer
  cfg.weight_decay = weight_decay
  return optim.build_optimizer(cfg, 100)


def unet_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({'name': 'unet', 'depth': 4, 'base_width': 16,
                                    'batch_norm': True})


def densenet_config(fw: bool) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({'name': 'densenet121', 'input_attention': 'multiscale',
                                    'feature_weighting': fw})


def bench_jax(kind: str, size: int, batch: int, repeats: int) -> dict[str, Any]:
  """cxr_jax's train step (jit of shard_map over every device) and jitted inference."""
  mesh = parallel.make_mesh()
  rng = np.random.default_rng(0)
  seg = kind == 'unet'
  fw = kind.endswith('_fw')
  cfg = unet_config() if seg else densenet_config(fw)
  k = STRUCTURES if seg else NUM_CLASSES
  model = build_model(cfg, num_classes=k, bn_axis_name=parallel.DATA_AXIS)
  tx = _adam(1e-5 if seg else 1e-4)
  extra = {'masks': (size, size, STRUCTURES)} if fw else {}
  state = create_train_state(model, tx, (size, size, 3), jax.random.key(0), mesh, extra)
  masks = (rng.random((batch, size, size, STRUCTURES)) < 0.4).astype(np.float32)
  data = {'image': rng.normal(size=(batch, size, size, 3)).astype(np.float32)}
  if seg:
    data['masks'] = masks
  else:
    data['labels'] = (rng.random((batch, k)) < 0.2).astype(np.float32)
    if fw:
      data['masks'] = masks
  data = parallel.to_global(data, mesh)
  step = make_train_step(model, tx, losses.get_loss('soft_dice' if seg else 'sigmoid_bce'),
                         mesh, target='masks' if seg else 'labels',
                         inputs=('masks',) if fw else ())
  compile_s, one_step, holder = backbones.compile_train_step(step, state, data,
                                                            jax.random.key(1))
  train_s = _timeit(one_step, repeats)
  eval_model = build_model(cfg, num_classes=k)
  variables = holder['state'].variables()
  kw = {'masks': data['masks']} if fw else {}
  predict = jax.jit(lambda v, x, kw: eval_model.apply(v, x, train=False, **kw))
  infer_s = _timeit(lambda: predict(variables, data['image'], kw), repeats)
  return {'jax_compile_s': compile_s, 'jax_train_img_s': batch / train_s,
          'jax_infer_img_s': batch / infer_s}


def _torch_unet(torch, depth: int = 4, width: int = 16, k: int = STRUCTURES):
  nn = torch.nn

  def double(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

  class UNet(nn.Module):
    def __init__(self):
      super().__init__()
      widths = [width * 2 ** i for i in range(depth + 1)]
      self.down = nn.ModuleList([double(3 if i == 0 else widths[i - 1], widths[i])
                                 for i in range(depth)])
      self.middle = double(widths[depth - 1], widths[depth])
      self.upconv = nn.ModuleList([nn.ConvTranspose2d(widths[i + 1], widths[i], 2, 2)
                                   for i in range(depth)])
      self.up = nn.ModuleList([double(2 * widths[i], widths[i]) for i in range(depth)])
      self.head = nn.Conv2d(width, k, 1)

    def forward(self, x):
      skips = []
      for block in self.down:
        x = block(x)
        skips.append(x)
        x = torch.nn.functional.max_pool2d(x, 2)
      x = self.middle(x)
      for i in reversed(range(depth)):
        x = self.up[i](torch.cat([skips[i], self.upconv[i](x)], dim=1))
      return self.head(x)

  return UNet()


def _torch_msa_densenet(torch, fw: bool):
  import torchvision  # noqa: PLC0415
  nn = torch.nn

  class MSA(nn.Module):  # the released code's module (cxr_jax/attention/multiscale.py)
    def __init__(self):
      super().__init__()
      self.c5 = nn.Conv2d(3, 3, 5, padding=2, bias=False)
      self.c9 = nn.Conv2d(3, 3, 9, padding=4, bias=False)
      self.agg = nn.Conv2d(6, 1, 3, padding=1, bias=False)

    def forward(self, x):
      maps = []
      for y in (x, self.c5(x), self.c9(x)):
        maps += [y.max(dim=1, keepdim=True)[0], y.mean(dim=1, keepdim=True)]
      return torch.sigmoid(self.agg(torch.cat(maps, dim=1))) * x

  class Model(nn.Module):
    def __init__(self):
      super().__init__()
      self.msa = MSA()
      self.features = torchvision.models.densenet121(weights=None).features
      self.classifier = nn.Linear(1024, NUM_CLASSES)

    def forward(self, x, masks=None):
      f = self.features(self.msa(x))
      if fw:
        m = (masks.max(dim=1, keepdim=True)[0] >= 0.5).float()
        m = (torch.nn.functional.adaptive_avg_pool2d(m, f.shape[-2:]) >= 0.5).float()
        f = torch.sigmoid(f) * m
      else:
        f = torch.relu(f)
      return self.classifier(f.mean(dim=(2, 3)))

  return Model()


def bench_torch(kind: str, size: int, batch: int, repeats: int) -> dict[str, Any]:
  import torch  # noqa: PLC0415
  torch.manual_seed(0)
  device = 'cuda' if jax.devices()[0].platform == 'gpu' and torch.cuda.is_available() else 'cpu'
  seg, fw = kind == 'unet', kind.endswith('_fw')
  model = (_torch_unet(torch) if seg else _torch_msa_densenet(torch, fw)).to(device)
  x = torch.randn(batch, 3, size, size, device=device)
  masks = (torch.rand(batch, STRUCTURES, size, size, device=device) < 0.4).float()
  y = masks if seg else (torch.rand(batch, NUM_CLASSES, device=device) < 0.2).float()
  opt = torch.optim.Adam(model.parameters(), 1e-3, weight_decay=1e-5 if seg else 1e-4)

  def loss_fn(out):
    if not seg:
      return torch.nn.functional.binary_cross_entropy_with_logits(out, y)
    p = torch.sigmoid(out)
    dice = (2 * (p * y).sum((2, 3)) + 1) / (p.sum((2, 3)) + y.sum((2, 3)) + 1)
    return (1 - dice.mean(1)).mean()

  kw = {'masks': masks} if fw else {}

  def train():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(x, **kw))
    loss.backward()
    opt.step()
    return loss.item()

  def infer():
    with torch.inference_mode():
      return model(x, **kw).sum().item()

  model.train()
  train_s = _timeit(train, repeats)
  model.eval()
  infer_s = _timeit(infer, repeats)
  return {'torch_train_img_s': batch / train_s, 'torch_infer_img_s': batch / infer_s}


def bench_segment(size: int, out_size: int, batch: int, repeats: int) -> dict[str, Any]:
  """The segment stage's model call: U-Net at `size`, probabilities resized to the stored
  image (`out_size`) and binarised; images/s."""
  model = build_model(unet_config(), num_classes=STRUCTURES)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, size, size, 3)), jnp.float32)
  variables = jax.jit(model.init)(jax.random.key(0), x[:1])

  @jax.jit
  def masks(v, x):
    p = jax.nn.sigmoid(model.apply(v, x, train=False))
    if out_size != size:
      p = jax.image.resize(p, (batch, out_size, out_size, STRUCTURES), 'bilinear')
    return p >= 0.5

  s = _timeit(lambda: masks(variables, x), repeats)
  return {'segment_img_s': batch / s}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='U-Net and MSA-DenseNet, 2 repeats')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--unet_size', type=int, default=128)
  parser.add_argument('--unet_batch', type=int, default=8)
  parser.add_argument('--densenet_size', type=int, default=224)
  parser.add_argument('--densenet_batch', type=int, default=8)
  parser.add_argument('--segment_size', type=int, default=128)
  parser.add_argument('--segment_out', type=int, default=256)
  parser.add_argument('--segment_batch', type=int, default=32)
  parser.add_argument('--no_torch', action='store_true')
  parser.add_argument('--json', default=None, help='write the rows here')
  args = parser.parse_args()
  repeats = 2 if args.quick else args.repeats
  kinds = ('unet', 'msa_densenet121') if args.quick else ('unet', 'msa_densenet121',
                                                          'msa_densenet121_fw')
  rows = []
  device = jax.devices()[0].device_kind
  for kind in kinds:
    size, batch = ((args.unet_size, args.unet_batch) if kind == 'unet'
                   else (args.densenet_size, args.densenet_batch))
    row = {'model': kind, 'size': size, 'batch': batch, 'device': device,
           **bench_jax(kind, size, batch, repeats)}
    if not args.no_torch:
      row.update(bench_torch(kind, size, batch, repeats))
      row['train_ratio'] = row['jax_train_img_s'] / row['torch_train_img_s']
      row['infer_ratio'] = row['jax_infer_img_s'] / row['torch_infer_img_s']
    rows.append(row)
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}),
          flush=True)
  seg = {'model': 'segment', 'size': args.segment_size, 'out_size': args.segment_out,
         'batch': args.segment_batch, 'device': device,
         **bench_segment(args.segment_size, args.segment_out, args.segment_batch, repeats)}
  rows.append(seg)
  print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in seg.items()}))
  print('\n| model | px | batch | jax train img/s | torch train img/s | ratio | jax infer img/s '
        '| torch infer img/s | ratio |')
  print('| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |')
  for r in rows[:-1]:
    print(f'| {r["model"]} | {r["size"]} | {r["batch"]} | {r["jax_train_img_s"]:.2f} | '
          f'{r.get("torch_train_img_s", float("nan")):.2f} | '
          f'{r.get("train_ratio", float("nan")):.2f}x'
          f' | {r["jax_infer_img_s"]:.2f} | {r.get("torch_infer_img_s", float("nan")):.2f} | '
          f'{r.get("infer_ratio", float("nan")):.2f}x |')
  print(f'\nsegment ({seg["size"]} px -> {seg["out_size"]} px masks, batch {seg["batch"]}): '
        f'{seg["segment_img_s"]:.1f} images/s')
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == '__main__':
  main()
