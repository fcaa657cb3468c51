"""Every backbone's and paper model's train step against torch, eager and compiled, with FLOP/s.

One row per (model, dtype): cxr_jax's data-parallel train step (`make_train_step`, jit of
shard_map over every device) next to two torch peers of the same model, loss and optimiser
(Adam) on the same device:

  eager     torch as most code runs it: NCHW, no compilation (the peer of the earlier tables).
  compiled  what a user who cares about speed runs: `channels_last` tensors and weights,
            `torch.compile(model)` (default mode), a fused Adam, TF32 matrix products for
            float32 (`set_float32_matmul_precision('high')`; JAX's default float32 precision
            on NVIDIA GPUs is TF32 too, and cuDNN convolutions use TF32 in both).

bfloat16 rows: cxr_jax with `dtype=bfloat16` (parameters float32), torch with bf16 autocast.
Achieved FLOP/s are analytic (`cxr_jax.flops`: 2 FLOPs per multiply-add of the forward pass's
convolutions and matrix products, x3 for a train step), not XLA's cost analysis, and are given
as a fraction of the device's dense peak for the row's dtype: on NVIDIA GPUs the data sheet's
tensor-core peak (bf16, or TF32 for float32 rows; `GPU_PEAKS`), elsewhere a measured GEMM
throughput of the row's dtype.

  python benchmarks/peers.py                                   # every row, float32 + bfloat16
  python benchmarks/peers.py --rows=resnet50 --dtypes=bfloat16 --batch=128
  python benchmarks/peers.py --size=64 --batch=4 --peers=eager --repeats=2   # a CPU smoke run
  python benchmarks/peers.py --json out.json    # rows written after each one (a killed run
                                                # keeps what it finished)

Paper 000's attention stage trains the LSTM attention branch on a frozen MobileNet (forward only;
its FLOPs: the forward + 2x the branch's); its stage-1 classifier is the `mobilenet_v1` row.
"""

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import backbones  # noqa: E402
import lung_heart  # noqa: E402
import multi_attention  # noqa: E402
import tb_train_step  # noqa: E402

from cxr_jax import config_lib, flops, losses, optim, parallel  # noqa: E402
from cxr_jax.config_lib import base_config  # noqa: E402
from cxr_jax.models import build_model  # noqa: E402
from cxr_jax.train_step import create_train_state, make_train_step  # noqa: E402

PEERS = ('eager', 'compiled')

# Dense (no structured sparsity) tensor-core peaks, TFLOP/s, from NVIDIA's data sheets; the
# float32 entry is TF32. Matched against `jax.Device.device_kind` in this order.
GPU_PEAKS: tuple[tuple[tuple[str, ...], str, dict[str, float]], ...] = (
    (('H200',), 'H200 SXM', {'bfloat16': 989.4, 'float32': 494.7}),
    (('H100', 'PCIe'), 'H100 PCIe', {'bfloat16': 756.5, 'float32': 378.0}),
    (('H100',), 'H100 SXM', {'bfloat16': 989.4, 'float32': 494.7}),
    (('A100',), 'A100', {'bfloat16': 312.0, 'float32': 156.0}),
)


@dataclasses.dataclass(frozen=True)
class Case:
  """One model: its cxr_jax config and loss, and its torch twin.

  torch_model(torch, size) -> nn.Module taking NCHW images (and `masks` [B, K, H, W] when
  'masks' is in `inputs`); target 'labels' [B, K] multi-hot, 'label' [B] class ids, 'masks'
  [B, H, W, K] (NHWC in JAX, NCHW in torch).
  """
  name: str
  paper: str
  model: dict[str, Any]
  num_classes: int
  loss: str
  torch_model: Callable[[Any, int], Any]
  target: str = 'labels'
  inputs: tuple[str, ...] = ()
  cpu_fusions: tuple[str, ...] | None = None  # None: the library default
  size: int | None = None  # a fixed input size (the custom CNN's 227 px); None: --size
  optimizer: Any = None  # an optimizer ConfigDict (e.g. with `frozen`); None: Adam 1e-4
  # Paper 000's attention stage: the backbone runs forward only (no gradient), which the FLOP
  # count follows: forward + 2 x the attention branch's forward.
  frozen_backbone: bool = False
  # Model arguments for the FLOP count (cxr_jax/flops.py counts XLA's convolutions only).
  count_overrides: dict[str, Any] = dataclasses.field(
      default_factory=lambda: {'conv_impl': 'xla'})


def _torchvision(name: str, num_classes: int) -> Callable[[Any, int], Any]:
  def build(torch, size):
    del torch, size
    import torchvision  # noqa: PLC0415
    return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
  return build


def _torch_mobilenet_lstm_attention(torch, num_classes: int = 14, steps: int = 3,
                                     hidden: int = 16, attention: int = 64) -> Any:
  """Paper 000's attention stage in torch: the MobileNet v1 twin frozen (eval mode, no
  gradient) and cxr_jax/attention/lstm_attention.py's branch (an LSTM cell written out, with
  flax's one bias per gate, so that the parameters match)."""
  nn = torch.nn
  fn = torch.nn.functional

  class Twin(nn.Module):
    def __init__(self):
      super().__init__()
      self.backbone = backbones._torch_mobilenet_v1(torch, num_classes)
      self.backbone.requires_grad_(False)
      c = self.backbone[-1].in_features
      self.init_c, self.init_h = nn.Linear(c, hidden), nn.Linear(c, hidden)
      self.attention_features = nn.Linear(c, attention)
      self.attention_hidden = nn.Linear(hidden, attention, bias=False)
      self.attention_score = nn.Linear(attention, 1, bias=False)
      self.lstm_input = nn.Linear(num_classes + c, 4 * hidden, bias=False)
      self.lstm_hidden = nn.Linear(hidden, 4 * hidden)
      self.classifier = nn.Linear(hidden, num_classes)

    def train(self, mode: bool = True):
      super().train(mode)
      self.backbone.eval()  # frozen BatchNorm statistics, as freeze_backbone
      return self

    def forward(self, x):
      with torch.no_grad():
        features = self.backbone[:-3](x)  # [B, C, h, w]
        self.backbone[-3:](features)  # cxr_jax's backbone computes its (unused) logits too
      a = features.flatten(2).transpose(1, 2)  # [B, L, C]
      mean = a.mean(1)
      c, h = torch.tanh(self.init_c(mean)), torch.tanh(self.init_h(mean))
      projected = self.attention_features(a)
      probs = torch.zeros(a.shape[0], num_classes, device=a.device, dtype=a.dtype)
      for _ in range(steps):
        scores = self.attention_score(torch.tanh(projected + self.attention_hidden(h)[:, None]))
        alpha = torch.softmax(scores[..., 0].float(), -1).to(a.dtype)
        context = torch.einsum('bl,blc->bc', alpha, a)
        gates = self.lstm_input(torch.cat([probs.to(context.dtype), context], -1))
        i, f, g, o = (gates + self.lstm_hidden(h)).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        logits = self.classifier(h)
        probs = fn.sigmoid(logits.float())
      return logits

  return Twin()


def _paper_case(name: str, paper: str, config: str, num_classes: int,
                torch_model: Callable[[Any, int], Any], stage: str | None = None,
                **kwargs: Any) -> Case:
  """A paper's model as its config file (configs/`config`) trains it: model arguments, loss
  and the CPU fusion types (on accelerators the latter change nothing). With `stage`, that
  stage's config (`config_lib.stage_config`), its optimizer included (paper 000's attention
  stage freezes the backbone there); otherwise Adam 1e-4 as every row."""
  path = pathlib.Path(__file__).resolve().parents[1] / 'configs' / config
  cfg = config_lib.load_sibling(str(path), path.name).get_config()
  if stage is not None:
    cfg = config_lib.stage_config(cfg, stage)
    kwargs.setdefault('optimizer', cfg.optimizer)
  return Case(name, paper, cfg.model.to_dict(), num_classes, cfg.loss, torch_model,
              cpu_fusions=tuple(cfg.cpu_fusions), **kwargs)


CASES = (
    _paper_case('MobileNet + LSTM attention', '000', 'lstm_attention.py', 14,
                lambda torch, size: _torch_mobilenet_lstm_attention(torch),
                stage='train_attention', frozen_backbone=True,
                count_overrides={'depthwise_impl': 'xla'}),
    Case('mobilenet_v1', '000 classifier', {'name': 'mobilenet_v1'}, 14, 'sigmoid_bce',
         lambda torch, size: backbones._torch_mobilenet_v1(torch, 14),
         count_overrides={'conv_impl': 'xla', 'depthwise_impl': 'xla'}),
    Case('resnet50', '-', {'name': 'resnet50'}, 14, 'sigmoid_bce', _torchvision('resnet50', 14)),
    Case('resnet101', '-', {'name': 'resnet101'}, 14, 'sigmoid_bce',
         _torchvision('resnet101', 14)),
    Case('densenet121', '-', {'name': 'densenet121'}, 14, 'sigmoid_bce',
         _torchvision('densenet121', 14)),
    Case('vgg16', '-', {'name': 'vgg16'}, 14, 'sigmoid_bce', _torchvision('vgg16', 14)),
    Case('alexnet', '-', {'name': 'alexnet'}, 14, 'sigmoid_bce', _torchvision('alexnet', 14),
         count_overrides={}),
    _paper_case('BSL+FAM+SAM', '001', 'multi_attention/bsl_fam_sam.py', 14,
                lambda torch, size: multi_attention.torch_model(torch, 'BSL+FAM+SAM')),
    _paper_case('resnet50 weighted BCE', '002', 'disease_masks/resnet50.py', 14,
                _torchvision('resnet50', 14)),
    _paper_case('custom_cnn', '003', 'tb/custom_cnn.py', 2,
                lambda torch, size: tb_train_step.torch_custom_cnn(size)[0], target='label',
                size=227, count_overrides={}),
    _paper_case('unet', '004', 'lung_heart_unet.py', lung_heart.STRUCTURES,
                lambda torch, size: lung_heart._torch_unet(torch), target='masks',
                count_overrides={}),
    _paper_case('MSA-DenseNet-121 + FW', '004', 'lung_heart/msa_densenet_fw.py', 14,
                lambda torch, size: lung_heart._torch_msa_densenet(torch, True),
                inputs=('masks',)),
)


def _mask_channels(case: Case) -> int:
  return case.num_classes if case.target == 'masks' else lung_heart.STRUCTURES


def make_batch(case: Case, size: int, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Random inputs and targets in cxr_jax's layout (NHWC)."""
  rng = np.random.default_rng(seed)
  data = {'image': rng.normal(size=(batch, size, size, 3)).astype(np.float32)}
  if case.target == 'masks' or 'masks' in case.inputs:
    data['masks'] = (rng.random((batch, size, size, _mask_channels(case))) < 0.4
                     ).astype(np.float32)
  if case.target == 'labels':
    data['labels'] = (rng.random((batch, case.num_classes)) < 0.2).astype(np.float32)
  elif case.target == 'label':
    data['label'] = rng.integers(0, case.num_classes, batch).astype(np.int32)
  return data


def _count(case: Case, size: int, method: str | None = None) -> int:
  cfg = {**case.model, **case.count_overrides}
  model = build_model(ml_collections.ConfigDict(cfg), num_classes=case.num_classes)
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  extra = {}
  if 'masks' in case.inputs:
    extra['masks'] = jax.ShapeDtypeStruct((1, size, size, _mask_channels(case)), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x, **extra)
  if method is None:
    return flops.count_flops(lambda v, x, e: model.apply(v, x, train=False, **e), variables, x,
                             extra)
  features = jax.eval_shape(lambda v, x: model.apply(v, x, method='features'), variables, x)
  return flops.count_flops(lambda v, f: model.apply(v, f, method=method), variables, features)


def analytic_forward_flops(case: Case, size: int) -> int:
  """Forward FLOPs per image (`cxr_jax.flops`)."""
  return _count(case, size)


def analytic_train_flops(case: Case, size: int) -> int:
  """Train-step FLOPs per image: 3x the forward's (`cxr_jax.flops`); with a frozen backbone,
  the forward + 2x the trained branch's forward (its two gradients)."""
  if case.frozen_backbone:
    return _count(case, size) + 2 * _count(case, size, method='attend')
  return flops.train_flops(_count(case, size))


def _adam() -> Any:
  return optim.build_optimizer(base_config().optimizer, 100)


def time_jax(case: Case, size: int, batch: int, dtype: str, repeats: int) -> dict[str, Any]:
  """cxr_jax's train step: compile seconds and images/s (median of `repeats` steps)."""
  mesh = parallel.make_mesh()
  model = build_model(ml_collections.ConfigDict(case.model), num_classes=case.num_classes,
                      dtype=dtype, bn_axis_name=parallel.DATA_AXIS)
  tx = (_adam() if case.optimizer is None
        else optim.build_optimizer(case.optimizer, 100))
  data = make_batch(case, size, batch)
  extra = {k: data[k].shape[1:] for k in case.inputs}
  state = create_train_state(model, tx, (size, size, 3), jax.random.key(0), mesh, extra)
  kwargs = {} if case.cpu_fusions is None else {'cpu_fusions': case.cpu_fusions}
  step = make_train_step(model, tx, losses.get_loss(case.loss), mesh, target=case.target,
                         inputs=case.inputs, **kwargs)
  data = parallel.to_global(data, mesh)
  compile_s, one_step, _ = backbones.compile_train_step(step, state, data, jax.random.key(1))
  train_s = backbones._timeit(one_step, repeats, warmup=2)
  return {'jax_compile_s': compile_s, 'jax_img_s': batch / train_s}


def _torch_loss(torch, case: Case) -> Callable[[Any, Any], Any]:
  fn = torch.nn.functional
  if case.loss == 'sigmoid_bce':
    return lambda logits, y: fn.binary_cross_entropy_with_logits(logits, y)
  if case.loss == 'softmax_ce':
    return lambda logits, y: fn.cross_entropy(logits, y)
  if case.loss == 'weighted_bce':
    def weighted_bce(logits, y):  # paper 002's eq. 10, as cxr_jax.losses.weighted_bce
      pos, total = y.sum(), y.numel()
      w_pos, w_neg = total / pos.clamp(min=1), total / (total - pos).clamp(min=1)
      nll = fn.binary_cross_entropy_with_logits(logits, y, reduction='none')
      return (nll * (y * w_pos + (1 - y) * w_neg)).mean()
    return weighted_bce
  if case.loss == 'soft_dice':
    def soft_dice(logits, y):  # as cxr_jax.losses.soft_dice (smooth 1, mean over structures)
      p = torch.sigmoid(logits)
      dice = (2 * (p * y).sum((2, 3)) + 1) / (p.sum((2, 3)) + y.sum((2, 3)) + 1)
      return (1 - dice.mean(1)).mean()
    return soft_dice
  raise ValueError(f'no torch twin of loss {case.loss!r}')


def time_torch(case: Case, size: int, batch: int, dtype: str, peer: str, repeats: int
               ) -> dict[str, Any]:
  """One torch peer (`PEERS`) of `case` on the GPU if torch sees one, else on every CPU core:
  first-call seconds (compile) and images/s (median of `repeats` steps)."""
  import torch  # noqa: PLC0415

  if peer not in PEERS:
    raise ValueError(f'--peers: unknown peer {peer!r}; valid: {", ".join(PEERS)}')
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count())
  cuda = torch.cuda.is_available()
  device = 'cuda' if cuda else 'cpu'
  if cuda:
    torch.backends.cudnn.benchmark = True
  compiled = peer == 'compiled'
  previous_precision = torch.get_float32_matmul_precision()
  torch.set_float32_matmul_precision('high' if compiled else 'highest')
  data = make_batch(case, size, batch)
  nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous().to(device)
  x = nchw(data['image'])
  y = (nchw(data['masks']) if case.target == 'masks'
       else torch.from_numpy(data[case.target]).to(device).long() if case.target == 'label'
       else torch.from_numpy(data[case.target]).to(device))
  kwargs = {'masks': nchw(data['masks'])} if 'masks' in case.inputs else {}
  model = case.torch_model(torch, size).to(device).train()
  if compiled:
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    kwargs = {k: v.contiguous(memory_format=torch.channels_last) for k, v in kwargs.items()}
  opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], 1e-4,
                         fused=compiled or None)
  forward = torch.compile(model) if compiled else model
  loss_fn = _torch_loss(torch, case)
  autocast = (torch.autocast(device, dtype=torch.bfloat16) if dtype == 'bfloat16'
              else contextlib.nullcontext())

  def train():
    opt.zero_grad(set_to_none=True)
    with autocast:
      out = forward(x, **kwargs)
    loss = loss_fn(out.float(), y)
    loss.backward()
    opt.step()
    return loss.item()  # synchronises, so CUDA timings are complete

  try:
    t0 = time.perf_counter()
    train()
    first_s = time.perf_counter() - t0
    train_s = backbones._timeit(train, repeats, warmup=1)
  finally:
    torch.set_float32_matmul_precision(previous_precision)
  return {f'torch_{peer}_first_s': first_s, f'torch_{peer}_img_s': batch / train_s}


def release_torch() -> None:
  """Frees what the last peer left (compiled graphs, cached GPU memory) before the next row."""
  import torch  # noqa: PLC0415
  torch._dynamo.reset()
  gc.collect()
  if torch.cuda.is_available():
    torch.cuda.empty_cache()


def gpu_peak(device_kind: str, dtype: str) -> tuple[str, float] | None:
  """(card, dense peak TFLOP/s for `dtype`) from `GPU_PEAKS`, or None for an unlisted card."""
  for needles, card, peaks in GPU_PEAKS:
    if all(n in device_kind for n in needles):
      return card, peaks[dtype]
  return None


def device_peak(dtype: str) -> tuple[str, float]:
  """(where the figure comes from, peak TFLOP/s) for `dtype` on JAX's default device."""
  dev = jax.devices()[0]
  listed = gpu_peak(dev.device_kind, dtype) if dev.platform == 'gpu' else None
  if listed:
    return f'{listed[0]} data sheet, dense {"TF32" if dtype == "float32" else dtype}', listed[1]
  gflops = backbones.matmul_peak_gflops(getattr(jnp, dtype))
  return f'measured {dtype} GEMM on {dev.device_kind}', gflops / 1e3


COLUMNS = (('model', '{}'), ('paper', '{}'), ('dtype', '{}'), ('size', '{}'), ('batch', '{}'),
           ('jax_img_s', '{:.1f}'), ('torch_eager_img_s', '{:.1f}'),
           ('torch_compiled_img_s', '{:.1f}'), ('vs_eager', '{:.2f}x'),
           ('vs_compiled', '{:.2f}x'), ('train_gflop_per_img', '{:.1f}'),
           ('jax_tflop_s', '{:.2f}'), ('peak_frac', '{:.1%}'), ('jax_compile_s', '{:.0f}'),
           ('torch_compiled_first_s', '{:.0f}'))


def format_row(row: dict[str, Any]) -> str:
  return '| ' + ' | '.join(fmt.format(row[c]) if row.get(c) is not None else '-'
                           for c, fmt in COLUMNS) + ' |'


def _gpu_present() -> bool:
  """Whether an NVIDIA GPU is attached, without starting JAX's backend (which would take most
  of the GPU's memory before the torch worker runs)."""
  return any(pathlib.Path('/dev').glob('nvidia[0-9]*'))


def _die_with_parent() -> None:
  """Linux: the worker gets SIGKILL when its parent dies (a `timeout` around this script must
  not leave a torch process holding the GPU for the next benchmark)."""
  import ctypes  # noqa: PLC0415
  import signal  # noqa: PLC0415
  with contextlib.suppress(OSError, AttributeError):
    ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def torch_worker(entries: list[list[str]], size: int, batch: int, repeats: int) -> None:
  """`--torch_worker`: times each [row, dtype, peer] of `entries`, one `TORCH_ROW` line each."""
  _die_with_parent()
  by_name = {c.name: c for c in CASES}
  for name, dtype, peer in entries:
    case = by_name[name]
    print('TORCH_START ' + json.dumps([name, dtype, peer]), flush=True)
    out = time_torch(case, case.size or size, batch, dtype, peer, repeats)
    release_torch()
    print('TORCH_ROW ' + json.dumps([name, dtype, peer, out]), flush=True)


def run_torch_peers(names: list[str], dtypes: list[str], peers: list[str], size: int,
                    batch: int, repeats: int) -> dict[tuple[str, str, str], dict[str, Any]]:
  """The torch peers, timed in child processes of this script before JAX starts here: torch and
  JAX then never share memory, threads or a GPU, and a peer that crashes its process (torch
  2.14.1's CPU bf16 backward of a 1x1 convolution with 14 outputs corrupts the heap) costs its
  own entry only: the worker restarts after it. {(row, dtype, peer): result or {'error'}}."""
  import subprocess  # noqa: PLC0415
  import tempfile  # noqa: PLC0415

  todo = [(n, d, p) for n in names for d in dtypes for p in peers]
  results: dict[tuple[str, str, str], dict[str, Any]] = {}
  while todo:
    cmd = [sys.executable, __file__, f'--torch_worker={json.dumps(todo)}', f'--size={size}',
           f'--batch={batch}', f'--repeats={repeats}']
    started = None
    # stderr to a file, not a pipe: torch.compile's warnings could fill a pipe nobody reads
    # while stdout is being read, and stall both processes.
    with tempfile.TemporaryFile('w+') as err_file:
      with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err_file, text=True) as proc:
        for line in proc.stdout:
          if line.startswith('TORCH_START '):
            started = tuple(json.loads(line[len('TORCH_START '):]))
          elif line.startswith('TORCH_ROW '):
            name, dtype, peer, out = json.loads(line[len('TORCH_ROW '):])
            results[(name, dtype, peer)] = out
            print(f'torch {peer} {name} {dtype}: {out[f"torch_{peer}_img_s"]:.1f} img/s (first '
                  f'call {out[f"torch_{peer}_first_s"]:.1f} s)', file=sys.stderr, flush=True)
            started = None
      err_file.seek(0)
      err = err_file.read()
    if started is not None:  # the worker died inside this entry: record it, skip it
      results[started] = {'error': f'torch worker exit {proc.returncode}: {err[-600:]}'}
      print(f'torch peer {started} failed (exit {proc.returncode}): {err.strip()[-300:]}',
            file=sys.stderr, flush=True)
    todo = [t for t in todo if t not in results]
    if todo and started is None:  # it failed outside any entry (start-up): no point retrying
      raise RuntimeError(f'the torch worker failed (exit {proc.returncode}): {err[-2000:]}')
  return results


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rows', default=None, help='comma-separated model names (default: '
                      f'all of {[c.name for c in CASES]})')
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--peers', default=','.join(PEERS), help='torch peers: eager,compiled '
                      '(empty: no torch)')
  parser.add_argument('--size', type=int, default=224, help='image size (rows of a fixed '
                      'geometry, the custom CNN: 227, keep theirs)')
  parser.add_argument('--batch', type=int, default=None, help='default 64 on a GPU, else 16')
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument('--json', default=None, help='write the rows here (after every row)')
  parser.add_argument('--torch_worker', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  batch = args.batch or (64 if _gpu_present() else 16)
  if args.torch_worker:
    torch_worker(json.loads(args.torch_worker), args.size, batch, args.repeats)
    return
  by_name = {c.name: c for c in CASES}
  names = args.rows.split(',') if args.rows else list(by_name)
  unknown = [n for n in names if n not in by_name]
  if unknown:
    parser.error(f'--rows: unknown {unknown}; valid: {list(by_name)}')
  dtypes = [d for d in args.dtypes.split(',') if d]
  bad = [d for d in dtypes if d not in ('float32', 'bfloat16')]
  if bad:
    parser.error(f'--dtypes: {bad} not float32/bfloat16')
  peers = [p for p in args.peers.split(',') if p]
  if set(peers) - set(PEERS):
    parser.error(f'--peers: valid: {", ".join(PEERS)}')
  torch_results = run_torch_peers(names, dtypes, peers, args.size, batch, args.repeats)
  peaks = {d: device_peak(d) for d in dtypes}
  header = {'jax': jax.__version__, 'device': jax.devices()[0].device_kind,
            'devices': jax.device_count(), 'cpus': os.cpu_count(),
            'peaks_tflop_s': {d: {'source': s, 'tflop_s': p} for d, (s, p) in peaks.items()}}
  with contextlib.suppress(ImportError):
    import torch  # noqa: PLC0415
    header['torch'] = torch.__version__
  print(json.dumps(header))
  print('| ' + ' | '.join(c for c, _ in COLUMNS) + ' |')
  print('|' + ' --- |' * len(COLUMNS), flush=True)
  rows = []
  for name in names:
    case = by_name[name]
    size = case.size or args.size
    per_img = analytic_train_flops(case, size)
    for dtype in dtypes:
      row: dict[str, Any] = {'model': name, 'paper': case.paper, 'dtype': dtype, 'size': size,
                             'batch': batch, 'train_gflop_per_img': per_img / 1e9}
      row.update(time_jax(case, size, batch, dtype, args.repeats))
      row['jax_tflop_s'] = row['jax_img_s'] * per_img / 1e12
      row['peak_frac'] = row['jax_tflop_s'] / peaks[dtype][1]
      for peer in peers:
        out = torch_results.get((name, dtype, peer), {'error': 'not run'})
        row.update(out if 'error' not in out else {f'torch_{peer}_error': out['error']})
        if f'torch_{peer}_img_s' in row:
          row[f'vs_{peer}'] = row['jax_img_s'] / row[f'torch_{peer}_img_s']
          row[f'torch_{peer}_tflop_s'] = row[f'torch_{peer}_img_s'] * per_img / 1e12
      rows.append(row)
      print(format_row(row), flush=True)
      if args.json:
        tmp = f'{args.json}.tmp'
        with open(tmp, 'w') as f:
          json.dump({**header, 'rows': rows}, f, indent=1)
        os.replace(tmp, args.json)
      jax.clear_caches()
      gc.collect()


if __name__ == '__main__':
  main()
