"""Input pipeline throughput (decode + preprocessing, tf.data) next to the train step, one run.

Times `cxr_jax.data.pipeline.make_train_iter` alone (TFDS read, PNG decode, the pp string,
batching; no model) in images/s for 224, 256 and 512 px outputs on this machine's cores, and
the data-parallel train step of a backbone at the same size and batch on random data, so the
two numbers can be compared: the pipeline must outrun the step.

Data: `cxr_samples/nih_bbox` (real NIH ChestX-ray14 images stored at 512 px), built on first
use from the team's sample folder (`--manual_dir`), or any TFDS data set via `--data`.

  python benchmarks/input_pipeline.py                       # 224/256/512 px, batch 16
  python benchmarks/input_pipeline.py --sizes=224 --model=resnet50 --json out.json
  python benchmarks/input_pipeline.py --no_step             # the pipeline alone
"""

import argparse
import json
import os
import pathlib
import sys
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from cxr_jax.data import pipeline  # noqa: E402

# Output size -> pp string; 224 is paper 001's recipe (256 px, random translation, 224 crop).
PP = {
    224: 'decode|grayscale_to_rgb|resize(256)|random_translate(12)|center_crop(224)|'
         'normalize("imagenet")',
    256: 'decode|grayscale_to_rgb|resize(256)|random_translate(12)|normalize("imagenet")',
    512: 'decode|grayscale_to_rgb|random_translate(12)|normalize("imagenet")',
}


def pipeline_images_per_s(data_cfg: dict[str, Any], batch: int, batches: int,
                          warmup: int = 3) -> float:
  """Images/s of `make_train_iter` over `batches` batches after `warmup` (fills prefetch and
  lets AUTOTUNE settle)."""
  it = pipeline.make_train_iter(data_cfg, global_batch_size=batch, seed=0)
  for _ in range(warmup):
    next(it)
  t = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * batch / (time.perf_counter() - t)


def step_images_per_s(model: str, size: int, batch: int, rounds: int) -> float:
  """Images/s of the train step (fastest of `rounds`), random data (benchmarks/conv_impl.py)."""
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
  import conv_impl  # noqa: PLC0415

  run, _ = conv_impl.jax_step(model, 'auto', size, batch)
  return batch / min(conv_impl.step_times(run, rounds, warmup=1))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data', default='cxr_samples/nih_bbox')
  parser.add_argument('--data_dir', default='/tmp/cxr_jax_bench_tfds')
  parser.add_argument('--manual_dir', default='/work/shared/data/nih_bbox',
                      help='the sample folder cxr_samples/nih_bbox is built from')
  parser.add_argument('--split', default='test', help="read as the train split (the sample's "
                      "'train' has 9 images, 'test' 527)")
  parser.add_argument('--sizes', default='224,256,512')
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--batches', type=int, default=20)
  parser.add_argument('--model', default='resnet50')
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--no_step', action='store_true', help='skip the train step column')
  parser.add_argument('--json', default=None)
  args = parser.parse_args()

  import tensorflow_datasets as tfds  # noqa: PLC0415

  builder = tfds.builder(args.data, data_dir=args.data_dir)
  if not builder.is_prepared():
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=args.manual_dir))
  print(f'{args.data} ({builder.info.splits[args.split].num_examples} {args.split} images, stored '
        f'{builder.info.features["image"].shape}); {os.cpu_count()} CPUs; load average '
        f'{os.getloadavg()[0]:.1f}; batch {args.batch}', flush=True)
  print('size | pipeline img/s | train step img/s | pipeline / step', flush=True)
  rows = []
  for size in (int(s) for s in args.sizes.split(',')):
    cfg = {'name': args.data, 'data_dir': args.data_dir, 'pp_train': PP[size],
           'train_split': args.split, 'shuffle_buffer': 64}
    row: dict[str, Any] = {'size': size, 'pp': PP[size], 'batch': args.batch,
                           'pipeline_img_s': pipeline_images_per_s(cfg, args.batch,
                                                                   args.batches)}
    if not args.no_step:
      row['model'] = args.model
      row['step_img_s'] = step_images_per_s(args.model, size, args.batch, args.rounds)
      row['pipeline_over_step'] = row['pipeline_img_s'] / row['step_img_s']
    row['loadavg'] = os.getloadavg()[0]
    rows.append(row)
    cells = [f'{row[k]:.1f}' if k in row else '-'
             for k in ('pipeline_img_s', 'step_img_s', 'pipeline_over_step')]
    print(' | '.join([str(size)] + cells), flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'rows': rows, 'cpus': os.cpu_count()}, f, indent=2)


if __name__ == '__main__':
  main()
