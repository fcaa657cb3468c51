r"""Segment the lungs and heart of a data set's images with a trained U-Net (paper 004).

  python -m cxr_jax.segment --workdir=workdir/lung_heart_unet \
      --data=nih_chest_xray14/official-256 [--data_dir=DIR] --splits=train,validation,test \
      --output=masks/nih256 [--stage=train_segmenter] [--batch_size=32] [--shard_size=512] \
      [--threshold=0.5]

Writes a mask cache (cxr_jax/data/mask_cache.py: masks.json + TFDS shards, keyed by image id,
masks in the frame of the stored images) that a classifier reads with
`--config.data.mask_cache=masks/nih256` and anyone reads with
`cxr_jax.data.mask_cache.MaskCache('masks/nih256')`. Rerunning the same command resumes: shards
already written are kept. A progress bar per split; the summary (images/s) at the end.

Exit status: 0 done; 1 the job failed (message on stderr); 2 usage errors (a workdir that is
not a segmentation run, a data set or split that does not exist: one line naming it).
"""

import argparse
import sys
from collections.abc import Sequence

import ml_collections


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog='python -m cxr_jax.segment',
                                   description='Lung/heart masks of a data set into a cache.')
  parser.add_argument('--workdir', required=True, help='a segmentation run (U-Net)')
  parser.add_argument('--stage', default=None, help='its stage (default: train_segmenter)')
  parser.add_argument('--data', required=True, help="TFDS name, e.g. 'cxr_phantom/64'")
  parser.add_argument('--data_dir', default=None, help='TFDS data dir (default: TFDS default)')
  parser.add_argument('--splits', required=True, help='comma-separated split names')
  parser.add_argument('--output', required=True, help='the mask cache folder')
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--shard_size', type=int, default=512)
  parser.add_argument('--threshold', type=float, default=0.5)
  parser.add_argument('--no_progress', action='store_true', help='no progress bar')
  return parser.parse_args(list(argv))


def main(argv: Sequence[str]) -> int:
  try:
    args = parse_args(argv)
  except SystemExit as e:
    return int(e.code or 0)
  import cxr_jax.data  # noqa: F401  (registers the builders)
  from cxr_jax import inference
  from cxr_jax.stages.segmentation import segment_data
  if not 0.0 < args.threshold < 1.0 or args.batch_size <= 0 or args.shard_size <= 0:
    print('error: --threshold must be in (0, 1), --batch_size and --shard_size positive.',
          file=sys.stderr)
    return 2
  splits = [s.strip() for s in args.splits.split(',') if s.strip()]
  try:
    segmenter = inference.load_segmenter(args.workdir, args.stage)
    data = ml_collections.ConfigDict({'name': args.data, 'data_dir': args.data_dir})
    result = segment_data(segmenter, data, splits, args.output, batch_size=args.batch_size,
                          shard_size=args.shard_size, threshold=args.threshold,
                          progress=not args.no_progress)
  except (inference.RunError, FileNotFoundError, ValueError, KeyError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  from cxr_jax.data import mask_cache
  print(f'{result["images"]} images segmented in {result["seconds"]:.1f}s '
        f'({result["images_per_second"] or 0:.1f} images/s); {mask_cache.describe(args.output)}',
        file=sys.stderr)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
