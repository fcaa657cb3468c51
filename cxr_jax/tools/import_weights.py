"""Imports torchvision / Keras ImageNet weights into an orbax checkpoint of a cxr_jax model.

  python -m cxr_jax.tools.import_weights --source=torchvision --arch=resnet50 \\
      --input=resnet50-11ad3fa6.pth --output=weights/resnet50_nih --num_classes=14

writes DIR/variables (orbax: {'params', 'batch_stats'}) and its description (arch, source,
input file and its sha256, num_classes, the model's constructor arguments, and `head_paths`:
the leaves initialised here rather than imported). `cxr_jax.pretrained.load_checkpoint(DIR)`
reads it back as (model, variables) (the IO itself is in cxr_jax/checkpoints.py). The write
is atomic (DIR.tmp, then a rename); a non-empty DIR is refused unless --overwrite.
"""

import argparse
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--source', required=True, choices=('torchvision', 'keras'))
  parser.add_argument('--arch', required=True, help="e.g. resnet50, densenet121, mobilenet_v1")
  parser.add_argument('--input', required=True, help='.pth state dict or Keras .h5 file')
  parser.add_argument('--output', required=True, help='checkpoint directory to create')
  parser.add_argument('--num_classes', type=int, default=None,
                      help="new head width (default: the file's); the head is re-initialised")
  parser.add_argument('--one_channel', action='store_true',
                      help='sum the first convolution over RGB for grey [H, W, 1] inputs')
  parser.add_argument('--seed', type=int, default=0, help='PRNG seed of a new head')
  parser.add_argument('--use_torch', action='store_true',
                      help='read .pth files with torch.load instead of the built-in reader')
  parser.add_argument('--overwrite', action='store_true', help='replace a non-empty --output')
  args = parser.parse_args(argv)

  import jax  # noqa: PLC0415  (after argparse: --help stays fast)

  from cxr_jax import pretrained  # noqa: PLC0415

  try:
    model, variables, info = pretrained.load_with_info(
        args.input, source=args.source, arch=args.arch, num_classes=args.num_classes,
        one_channel=args.one_channel, key=jax.random.key(args.seed), use_torch=args.use_torch)
    reinit = bool(info['head_paths'])
    meta = {'arch': args.arch, 'source': args.source, 'input': os.path.abspath(args.input),
            'input_sha256': pretrained.sha256(args.input), 'num_classes': model.num_classes,
            'one_channel': args.one_channel, 'reference_classes': info['reference_classes'],
            'head_paths': info['head_paths'],
            'seed': args.seed}
    out = pretrained.save_checkpoint(args.output, model, variables, meta,
                                     overwrite=args.overwrite)
  except (ValueError, FileExistsError, NotImplementedError, OSError) as e:
    print(f'import_weights: {e}', file=sys.stderr)
    return 1
  n = sum(x.size for x in jax.tree.leaves(variables['params']))
  print(f'wrote {out} ({args.arch}, {n:,} parameters, {model.num_classes} classes'
        f'{", new head" if reinit else ""})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
