r"""Predict (and explain) on a user's own X-rays with a trained run.

  python -m cxr_jax.predict --workdir=RUN [--output=DIR] IMAGE_OR_FOLDER \
      [--explain=auto|attention|pda|cam|grad_cam|activations|none] [--stage=STAGE] \
      [--boxes=BBOX.csv] [--layer=NAME] [--channel=K]

IMAGE_OR_FOLDER is one PNG/JPEG (8/16-bit) or DICOM file, or a folder searched recursively for
.png/.jpg/.jpeg/.dcm/.dicom files. For each image, under DIR (default RUN/predictions/, the
folder's sub-folders mirrored):
- `<name>.json`: the image path and how it was read, the probability of every class, the
  findings (classes whose probability is above the model's operating point, `>` as in
  cxr_jax.metrics: the per-class thresholds the run chose on its validation split when it has
  them, else its config.threshold; `threshold_source` says which), the stage and the model;
- `<name>.attention.png` (--explain=attention, attention models only): the attention weights
  of every LSTM step over the X-ray, as paper 000's Fig. 3;
- `<name>.pda.png` (--explain=pda): feature-level Prediction Difference Analysis heat maps of
  the detected classes (or the most probable one when none is detected; --classes to choose)
  over the X-ray, as paper 000's Fig. 2. Its sampler is fitted on reference feature maps: the
  images of --pda_reference (a folder) or else the run's training split.
- `<name>.cam.png` / `<name>.grad_cam.png` (--explain=cam|grad_cam): class activation maps of
  the same classes (CAM: linear heads, and paper 001's space attention class score map;
  Grad-CAM: any model) with the boxes they give in black (the run's config.localize.boxes
  settings, cxr_jax/explain/boxes.py); the JSON lists those boxes in image pixels.
- `<name>.activations.png` (--explain=activations, paper 003's Fig. 3/4): the post-ReLU
  activations of --layer (default conv5, the last convolution of the custom CNN, AlexNet and
  VGG) as a grid of channels each scaled to [0, 1], channel --channel (0-based; default the
  strongest mean activation), and its discrete-jet heat map over the image the model saw
  (zero activations transparent); the JSON names the layer and channel. A bad --layer is
  refused listing the model's layers, a --channel out of range naming the valid range.
--explain=auto (default) is 'attention' for attention models and 'none' otherwise. With
--boxes (NIH BBox_List format: image name, finding label, x, y, w, h in pixels of a
--boxes_size-pixel image), the experts' boxes are drawn in red on the matching panels.

The model is the best checkpoint of --stage (default: the last training stage present in RUN:
train_attention, else train_hard_examples, else train_classifier, else train), rebuilt from the
stage's model description alone (cxr_jax/inference/). The image is resized to the model's
input size (as the NIH PNGs were squeezed to 1024x1024, aspect ratio not kept), quantised to 8
bits as the training PNGs are, and run through the stage's eval preprocessing (its `pp_eval`).

A file that cannot be read or predicted is reported on stderr by name and skipped. Exit
status: 0 all images done, 1 some failed, 2 usage errors (bad flags, no run, no images).
"""

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from cxr_jax import imageio, inference, layout
from cxr_jax.explain import overlays
from cxr_jax.inference import Predictor, RunError
from cxr_jax.io_utils import atomic_write_json

EXPLAIN_MODES = ('auto', 'attention', 'pda', 'cam', 'grad_cam', 'activations', 'none')
NIH_BOX_NAMES = {'Infiltrate': 'Infiltration'}


class UsageError(RunError):
  """Bad invocation (no run, no stage, no images, unsupported --explain): exit status 2."""


# ------------------------------------------------------------------------------ files
def list_images(path: str | os.PathLike) -> list[str]:
  """One image file, or the image files under a folder (recursive, sorted)."""
  path = os.fspath(path)
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise UsageError(f'{path}: no such file or folder.')
  found = []
  for root, dirs, files in os.walk(path):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
    found += [os.path.join(root, f) for f in sorted(files)
              if os.path.splitext(f)[1].lower() in imageio.SUFFIXES and not f.startswith('.')]
  return found


def read_boxes(csv_path: str, boxes_size: float) -> dict[str, list[tuple[str, tuple]]]:
  """NIH BBox_List-style CSV -> {image file name: [(class, (x, y, w, h) / boxes_size)]}."""
  import csv
  out: dict[str, list] = {}
  with open(csv_path, newline='') as f:
    for row in csv.reader(f):
      if not row or not _is_number(row[2] if len(row) > 2 else ''):
        continue  # header or blank line
      name, label = row[0], NIH_BOX_NAMES.get(row[1], row[1])
      x, y, w, h = (float(v) / boxes_size for v in row[2:6])
      out.setdefault(os.path.basename(name), []).append((label, (x, y, w, h)))
  return out


def _is_number(s: str) -> bool:
  try:
    float(s)
  except ValueError:
    return False
  return True


# ------------------------------------------------------------------------------ one image
def predict_image(predictor: Predictor, path: str, out_base: str, *, explain: str,
                  boxes: Sequence[tuple[str, tuple]] = (),
                  pda: tuple[Any, inference.PDASettings] | None = None,
                  classes: Sequence[str] = (), layer: str = 'conv5',
                  channel: int | None = None, segmenter: Any = None) -> dict[str, Any]:
  """Predicts one file and writes `out_base`.json (+ overlay PNGs); returns the JSON record.

  boxes: (class name, normalised (x, y, w, h)) ground truth; pda: (fitted sampler, settings);
  segmenter: an `inference.segmentation.Segmenter` (paper 004's U-Net) whose lung masks a
  lung-ROI model (paper 003) needs; its overlays are then drawn on the ROI (no --boxes).
  """
  image, meta = imageio.read_image(path)
  roi = None
  if predictor.needs_lung_masks:
    if segmenter is None:
      raise UsageError(
          f'the model of stage {predictor.stage!r} was trained on lung ROIs cut from lung masks '
          '(lung_roi in its eval preprocessing): give --segmentation=UNET_RUN, a lung/heart '
          'segmentation run (configs/lung_heart_unet.py), to find the lungs of your images.')
    x = predictor.preprocess(image, masks=segmenter.masks(image))
    roi = {'segmentation': os.path.abspath(os.fspath(segmenter.workdir)),
           'stage': segmenter.stage}
    # Heat maps live in the ROI's frame: draw them on the model's input, not the whole X-ray.
    grey = x[..., 0]
    image = (grey - grey.min()) / max(float(grey.max() - grey.min()), 1e-6)
    boxes = ()
  else:
    x = predictor.preprocess(image)
  probs, inter = predictor.run(x)
  names, thresholds = predictor.class_names, predictor.thresholds
  findings = predictor.findings(probs)
  record = {
      'image': os.path.abspath(path), 'image_meta': _jsonable(meta),
      'workdir': os.path.abspath(os.fspath(predictor.workdir)), 'stage': predictor.stage,
      'model': predictor.model_name,
      'probabilities': {n: float(p) for n, p in zip(names, probs, strict=True)},
      'thresholds': {n: float(t) for n, t in zip(names, thresholds, strict=True)},
      'threshold_source': predictor.operating.source,
      'findings': [n for n, _ in findings], 'overlays': []}
  if roi is not None:
    record['lung_roi'] = roi
  h, w = image.shape
  pixel_boxes = [(c, (x * w, y * h, bw * w, bh * h)) for c, (x, y, bw, bh) in boxes]
  if explain == 'attention':
    maps = predictor.attention_maps(inter)[0]  # [T, h, w]
    panels = [overlays.Panel(m, title=f'attention, step {t + 1}/{len(maps)}', findings=findings,
                             boxes=[b for _, b in pixel_boxes],
                             colorbar_label="contribution to the decision (attention)")
              for t, m in enumerate(maps)]
    out = f'{out_base}.attention.png'
    overlays.overlay_grid(image, panels, ncols=len(panels), out_path=out,
                          suptitle=f'{os.path.basename(path)}: {predictor.stage}')
    record['overlays'].append(os.path.abspath(out))
  elif explain in ('cam', 'grad_cam'):
    chosen = _chosen_classes(classes, findings, names, probs)
    record['boxes'] = {}
    panels = []
    for c, heat, found in inference.class_activation_boxes(predictor, inter, explain, chosen,
                                                           (h, w)):
      record['boxes'][c] = [list(b) for b in found]
      panels.append(overlays.Panel(
          heat, title=f'{c} (p={probs[names.index(c)]:.2f})', findings=findings,
          boxes=[b for bc, b in pixel_boxes if bc == c], pred_boxes=found,
          value_range=(float(heat.min()), float(heat.max())),
          colorbar_label=f'{explain.replace("_", "-").upper()} (class score)'))
    out = f'{out_base}.{explain}.png'
    overlays.overlay_grid(image, panels, ncols=min(4, len(panels)), out_path=out,
                          suptitle=f'{os.path.basename(path)}: {explain}, {predictor.stage}; '
                          'black = boxes from the heat map')
    record['overlays'].append(os.path.abspath(out))
  elif explain == 'activations':
    from cxr_jax.explain import activations as A
    from cxr_jax.inference import activations as act
    panels, shown = act.activation_panels(
        predictor, x, act.ActivationSettings(layer=layer), channel=channel)
    out = f'{out_base}.activations.png'
    os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
    from cxr_jax.io_utils import atomic_write_bytes
    atomic_write_bytes(out, A.png_bytes(A.figure([panels], suptitle=(
        f'{os.path.basename(path)}: {layer}, {predictor.stage}; ' + ', '.join(
            f'{n} {p:.2f}' for n, p in zip(names, probs, strict=True))))))
    record['activations'] = {'layer': layer, 'channel': shown}
    record['overlays'].append(os.path.abspath(out))
  elif explain == 'pda':
    sampler, settings = pda
    key = jax.random.fold_in(jax.random.key(settings.seed), 0)
    relevance = inference.pda_heatmaps(predictor, x, sampler, settings, key)
    chosen = _chosen_classes(classes, findings, names, probs)
    panels = [overlays.Panel(relevance[names.index(c)],
                             title=f'{c} (p={probs[names.index(c)]:.2f})', findings=findings,
                             boxes=[b for bc, b in pixel_boxes if bc == c],
                             colorbar_label='contribution to the decision (bits of evidence)')
              for c in chosen]
    out = f'{out_base}.pda.png'
    overlays.overlay_grid(image, panels, ncols=min(4, len(panels)), out_path=out,
                          suptitle=f'{os.path.basename(path)}: PDA, {predictor.stage}')
    record['overlays'].append(os.path.abspath(out))
  atomic_write_json(f'{out_base}.json', record)
  return record


def _chosen_classes(classes: Sequence[str], findings: Sequence[tuple[str, float]],
                    names: Sequence[str], probs: np.ndarray) -> list[str]:
  """--classes, else the findings, else the most probable class."""
  chosen = list(classes) or [n for n, _ in findings] or [names[int(np.argmax(probs))]]
  unknown = [c for c in chosen if c not in names]
  if unknown:
    raise UsageError(f'--classes: {unknown} not among the model\'s classes {list(names)}.')
  return chosen


def _jsonable(meta: dict[str, Any]) -> dict[str, Any]:
  return {k: (list(v) if isinstance(v, tuple) else v) for k, v in meta.items()}


def resolve_explain(explain: str, predictor: Predictor) -> str:
  if explain not in EXPLAIN_MODES:
    raise UsageError(f'--explain={explain!r}; valid: {", ".join(EXPLAIN_MODES)}.')
  if explain == 'auto':
    return 'attention' if predictor.has_attention else 'none'
  if explain == 'attention' and not predictor.has_attention:
    predictor.attention_maps({})  # raises the explanatory RunError
  return explain


def run(workdir: str, inputs: str, *, output: str | None = None, explain: str = 'auto',
        stage: str | None = None, boxes_csv: str | None = None, boxes_size: float = 1024.0,
        pda_reference: str | None = None, classes: Sequence[str] = (),
        progress: bool = True, predictor: Predictor | None = None, layer: str = 'conv5',
        channel: int | None = None, segmentation: str | None = None
        ) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
  """Predicts every image of `inputs`; returns (records, [(path, error message)]).

  `predictor`: an already loaded model of `workdir` (several calls, one restore).
  `segmentation`: a lung/heart segmentation run (paper 004) for lung-ROI models (paper 003).
  """
  from tqdm import tqdm
  paths = list_images(inputs)
  if not paths:
    raise UsageError(f'{inputs}: no .png/.jpg/.jpeg/.dcm files found.')
  predictor = predictor or inference.load_predictor(workdir, stage)
  segmenter = None
  if segmentation:
    from cxr_jax.inference import segmentation as seg
    segmenter = seg.load_segmenter(segmentation)
  elif predictor.needs_lung_masks:
    raise UsageError(
        f'--workdir={workdir}: the model of stage {predictor.stage!r} was trained on lung ROIs '
        'cut from lung masks (lung_roi in its eval preprocessing): give --segmentation=UNET_RUN, '
        'a lung/heart segmentation run (configs/lung_heart_unet.py), to find the lungs of your '
        'images.')
  explain = resolve_explain(explain, predictor)
  if explain == 'activations':
    from cxr_jax.inference import activations as act
    act.check_layer(predictor, layer)
    if channel is not None:
      act.check_channel(act.layer_activations(
          predictor, np.zeros(predictor.image_shape, np.float32), layer), channel, layer)
  pda = None
  if explain == 'pda':
    settings = inference.PDASettings.from_config(predictor.config_section('explain'))
    if pda_reference:
      images = (predictor.preprocess(imageio.read_image(p)[0])
                for p in list_images(pda_reference))
    else:
      images = inference.training_images(predictor, settings.num_reference)
    pda = (inference.fit_pda_sampler(settings,
                                     inference.reference_maps(predictor, settings, images)),
           settings)
  all_boxes = read_boxes(boxes_csv, boxes_size) if boxes_csv else {}
  output = output or os.fspath(layout.Run(predictor.workdir).predictions_dir)
  root = inputs if os.path.isdir(inputs) else os.path.dirname(inputs)
  records, failures = [], []
  for path in tqdm(paths, desc='predict', unit='image', disable=not progress or len(paths) < 2,
                   file=sys.stderr):
    out_base = os.path.join(output, os.path.relpath(path, root))
    try:
      records.append(predict_image(predictor, path, out_base, explain=explain, pda=pda,
                                   boxes=all_boxes.get(os.path.basename(path), ()),
                                   classes=classes, layer=layer, channel=channel,
                                   segmenter=segmenter))
    except RunError:
      raise
    except Exception as e:  # a bad file must not stop the rest; it is reported by name.
      message = str(e) if os.path.basename(path) in str(e) else f'{path}: {e}'
      failures.append((path, message))
      tqdm.write(f'FAILED {message}', file=sys.stderr)
  return records, failures


# ------------------------------------------------------------------------------ CLI
def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  """The CLI's arguments (argparse, so that importing this module defines no absl flags)."""
  parser = argparse.ArgumentParser(
      prog='python -m cxr_jax.predict',
      description='Findings and heat maps for your own chest X-rays (PNG/JPEG/DICOM).')
  parser.add_argument('inputs', metavar='IMAGE_OR_FOLDER', help='an image file or a folder')
  parser.add_argument('--workdir', required=True,
                      help='run folder written by `python -m cxr_jax.main`')
  parser.add_argument('--output', default=None, help='output folder (default: WORKDIR/predictions)')
  parser.add_argument('--explain', default='auto', choices=EXPLAIN_MODES,
                      help='heat maps: attention weights, PDA, none; auto = attention if the '
                      'model has it')
  parser.add_argument('--stage', default=None,
                      help='training stage whose best model to use (default: the last)')
  parser.add_argument('--boxes', default=None,
                      help='CSV of ground-truth boxes (NIH BBox_List columns)')
  parser.add_argument('--boxes_size', type=float, default=1024.0,
                      help='image size (px) the --boxes coordinates refer to')
  parser.add_argument('--pda_reference', default=None,
                      help="folder of images to fit the PDA sampler on (default: the run's "
                      'training split)')
  parser.add_argument('--classes', default='',
                      help='comma-separated classes to draw PDA heat maps for (default: the '
                      'detected ones)')
  parser.add_argument('--layer', default='conv5',
                      help='--explain=activations: the layer (default conv5, the last '
                      'convolution)')
  parser.add_argument('--channel', type=int, default=None,
                      help='--explain=activations: the channel shown over the image (0-based; '
                      'default: the strongest)')
  parser.add_argument('--segmentation', default=None,
                      help='lung/heart segmentation run (configs/lung_heart_unet.py) whose lung '
                      'masks a lung-ROI model (configs/tb/*) needs')
  parser.add_argument('--verbose', action='store_true', help='log library INFO lines too')
  return parser.parse_args(list(argv)[1:])


def main(argv: Sequence[str]) -> int:
  """Runs the CLI on argv (argv[0] is the program); returns the exit status."""
  try:
    args = parse_args(argv)
  except SystemExit as e:  # argparse: usage error (2) or --help (0)
    return int(e.code or 0)
  previous = logging.get_verbosity()
  logging.set_verbosity(logging.INFO if args.verbose else logging.WARNING)
  classes = [c for c in args.classes.split(',') if c]
  try:
    records, failures = run(args.workdir, args.inputs, output=args.output, explain=args.explain,
                            stage=args.stage, boxes_csv=args.boxes,
                            boxes_size=args.boxes_size, pda_reference=args.pda_reference,
                            classes=classes, layer=args.layer, channel=args.channel,
                            segmentation=args.segmentation)
  except RunError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  finally:
    logging.set_verbosity(previous)  # main() also runs in-process (tests, notebooks)
  print(f'{len(records)} image(s) predicted, {len(failures)} failed.', file=sys.stderr)
  return 1 if failures else 0


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  sys.exit(main(sys.argv))
