r"""Paper 003's figure set for several trained models side by side on one X-ray.

  python -m cxr_jax.tools.activation_figures IMAGE --out=DIR \
      --run='Custom CNN=workdir/tb_custom' --run='AlexNet=workdir/tb_alexnet' \
      --run='VGG16=workdir/tb_vgg16' --run='VGG19=workdir/tb_vgg19'

writes DIR/fig2_filters.png (filters of each model's `activations.filter_layers`: conv1 and
conv3 for the custom CNN and AlexNet, conv1_2 and conv3_3 / conv3_4 for VGG16 / VGG19, and the
FC3 class visualisation), DIR/fig3_activations.png (the last convolution's post-ReLU
activations as a grid and the strongest channel) and DIR/fig4_heatmaps.png (that channel's
discrete-jet heat map over the X-ray), one row per model as in the paper, and DIR/figures.json
(the models, layers and channels). IMAGE: PNG/JPEG (8/16-bit) or DICOM. --channels='5,18,,178'
picks each model's Fig. 4 channel (0-based; empty: the strongest). Each run's layers come from
its saved config (`config.activations`), else conv1/conv3/conv5. Models trained with a lung ROI
need a mask per image, which this command cannot take yet: it refuses them by name.
"""

import argparse
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('image', help='the X-ray (PNG/JPEG/DICOM)')
  parser.add_argument('--run', action='append', required=True,
                      help="'LABEL=WORKDIR' (repeat, in row order); LABEL defaults to the folder")
  parser.add_argument('--out', required=True, help='output folder')
  parser.add_argument('--stage', default=None, help='training stage (default: the last)')
  parser.add_argument('--channels', default='', help='comma-separated Fig. 4 channels per run')
  parser.add_argument('--steps', type=int, default=30, help='activation maximisation steps')
  parser.add_argument('--num_filters', type=int, default=16,
                      help='channels synthesised per deeper layer')
  args = parser.parse_args(argv)

  from cxr_jax import imageio, inference
  from cxr_jax.inference import activations as act
  from cxr_jax.io_utils import atomic_write_files, json_text

  try:
    image, _ = imageio.read_image(args.image)
    predictors, filter_layers, last_layers = [], [], []
    for spec in args.run:
      label, _, workdir = spec.rpartition('=')
      predictor = inference.load_predictor(workdir, args.stage)
      if 'lung_roi' in predictor.info.pp_eval:
        raise inference.RunError(f'--run={spec}: the model crops lung ROIs from masks; this '
                                 'command takes no mask yet (train it with roi=none).')
      cfg = predictor.config_section('activations')
      filter_layers.append(tuple(cfg.get('filter_layers', ('conv1', 'conv3'))))
      last_layers.append(cfg.get('layer', 'conv5'))
      for layer in (*filter_layers[-1], last_layers[-1]):
        act.check_layer(predictor, layer)
      predictors.append((label or os.path.basename(os.path.normpath(workdir)), predictor))
    parts = args.channels.split(',') if args.channels else []
    channels = [int(c) if c.strip() else None for c in parts]
    pngs = act.figure_set(predictors, image, filter_layers=filter_layers,
                          last_layers=last_layers, channels=channels,
                          num_filters=args.num_filters, steps=args.steps)
  except (inference.RunError, imageio.ImageReadError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  files = {os.path.join(args.out, f'{k}.png'): v for k, v in pngs.items()}
  files[os.path.join(args.out, 'figures.json')] = json_text({
      'image': os.path.abspath(args.image),
      'models': [{'label': label, 'workdir': os.fspath(p.workdir), 'stage': p.stage,
                  'filter_layers': list(f), 'layer': last}
                 for (label, p), f, last in zip(predictors, filter_layers, last_layers,
                                                strict=True)]})
  atomic_write_files(files)
  print(f'wrote {", ".join(sorted(files))}', file=sys.stderr)
  return 0


if __name__ == '__main__':
  sys.exit(main())
