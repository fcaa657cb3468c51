r"""The viewer's out-of-distribution gate measured: false alarms on X-rays, detections otherwise.

  python benchmarks/ood_gate.py --workdir=RUN [--stage=STAGE] \
      --xrays=NAME=FOLDER[,NAME=FOLDER...] [--max_per_set=300] [--json]

Scores every image the way `python -m cxr_jax.serve` does (cxr_jax.imageio reader, the stage's
preprocessing, one forward pass, the gate stored by the run's `fit_ood` stage) and prints, per
set, the fraction flagged by the gate (false-alarm rate for X-ray sets, detection rate for the
others) and by each of its two parts alone at the same threshold. Non-X-ray sets are built here
from images that ship with installed packages: photos and textures (scikit-image's and
matplotlib's sample images), a CT-like slice (the Shepp-Logan phantom), an MR slice
(matplotlib's s1045.ima), blank, noise and gradient images, and every X-ray set inverted
(negatives). `--xrays` folders are searched recursively for .png/.jpg/.jpeg/.dcm files; a
`labels.csv` with an `official_split` column keeps only its 'test' rows (held-out images).
"""

import argparse
import csv
import gzip
import json
import os
import sys
import time

import numpy as np

from cxr_jax import imageio, inference, ood
from cxr_jax.inference import ood as ood_lib
from cxr_jax.predict import list_images


def xray_files(folder: str, limit: int) -> list[str]:
  files = list_images(folder)
  labels = os.path.join(folder, 'labels.csv')
  if os.path.exists(labels):
    with open(labels, newline='') as f:
      rows = list(csv.DictReader(f))
    if rows and 'official_split' in rows[0]:
      keep = {r['image'] for r in rows if r['official_split'] == 'test'}
      files = [p for p in files if os.path.basename(p) in keep]
  return files[:limit]


def non_xrays() -> dict[str, list[tuple[str, np.ndarray]]]:
  """{set: [(name, grey [H, W] in [0, 1])]} of obvious non-X-rays from installed packages."""
  from PIL import Image
  out: dict[str, list] = {'photos and textures': [], 'CT / MR slices': [],
                          'blank, noise, gradients': []}
  try:
    import skimage.data
    for name in ('astronaut', 'coffee', 'chelsea', 'camera', 'moon', 'page', 'text', 'coins',
                 'horse', 'rocket', 'retina', 'brick', 'grass', 'gravel', 'hubble_deep_field',
                 'cell', 'immunohistochemistry', 'motorcycle_left', 'checkerboard', 'clock',
                 'logo', 'colorwheel', 'microaneurysms'):
      try:
        image = np.asarray(getattr(skimage.data, name)(), np.float64)
      except Exception:  # a sample that needs a download
        continue
      if image.ndim == 3:
        image = image[..., :3].mean(-1) if image.shape[-1] >= 3 else image[..., 0]
      out['photos and textures'].append((name, _unit(image)))
    out['CT / MR slices'].append(('shepp_logan', _unit(skimage.data.shepp_logan_phantom())))
  except ImportError:
    pass
  import matplotlib.cbook
  for name in ('grace_hopper.jpg', 'Minduka_Present_Blue_Pack.png', 'logo2.png'):
    with matplotlib.cbook.get_sample_data(name) as f:
      image = np.asarray(Image.open(f).convert('L'), np.float64)
    out['photos and textures'].append((name, _unit(image)))
  with matplotlib.cbook.get_sample_data('s1045.ima.gz') as f:
    data = f.read()
    if data[:2] == b'\x1f\x8b':
      data = gzip.decompress(data)
  mri = np.frombuffer(data, np.uint16).reshape(256, 256).astype(np.float64)
  out['CT / MR slices'].append(('mri_s1045', _unit(mri)))
  rng = np.random.default_rng(0)
  synthetic = {'black': np.zeros((512, 512)), 'white': np.ones((512, 512)),
               'grey': np.full((512, 512), 0.5), 'uniform noise': rng.random((512, 512)),
               'gaussian noise': np.clip(0.5 + 0.15 * rng.standard_normal((512, 512)), 0, 1),
               'gradient': np.tile(np.linspace(0, 1, 512), (512, 1)),
               'radial': np.hypot(*np.mgrid[-1:1:512j, -1:1:512j]) / np.sqrt(2)}
  out['blank, noise, gradients'] = list(synthetic.items())
  return out


def _unit(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image, np.float64)
  lo, hi = image.min(), image.max()
  return ((image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)).astype(np.float32)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--stage', default=None)
  parser.add_argument('--xrays', default='', help='NAME=FOLDER,... held-out X-ray folders')
  parser.add_argument('--max_per_set', type=int, default=300)
  parser.add_argument('--json', action='store_true')
  args = parser.parse_args(argv[1:])
  predictor = inference.load_predictor(args.workdir, args.stage)
  found = ood_lib.load_gate(predictor)
  if found is None:
    print(f'error: {args.workdir} has no OOD gate for stage {predictor.stage}: run its fit_ood '
          'stage.', file=sys.stderr)
    return 2
  gate, summary = found

  def scores(images) -> np.ndarray:
    z = []
    for image in images:
      x = predictor.preprocess(image)
      _, inter = predictor.forward(x[None])
      thumbs, contrast = ood.thumbnails(x[None], gate.image_size)
      feats = ood.pooled(predictor.feature_maps(inter)) if gate.uses_features else None
      inputs = ood.GateInputs(thumbs, contrast, feats)
      z.append([*gate.z_scores(inputs)[0], gate.score(inputs)[0]])
    return np.asarray(z)

  t0 = time.time()
  sets: dict[str, tuple[str, np.ndarray]] = {}
  xray_images = {}
  for item in filter(None, args.xrays.split(',')):
    name, folder = item.split('=', 1)
    xray_images[name] = [imageio.read_image(p)[0]
                         for p in xray_files(folder, args.max_per_set)]
    sets[name] = ('X-ray', scores(xray_images[name]))
  for name, images in non_xrays().items():
    sets[name] = ('non-X-ray', scores([im for _, im in images]))
  for name, images in xray_images.items():
    sets[f'{name}, inverted'] = ('non-X-ray', scores([1.0 - im for im in images]))
  rows = []
  for name, (kind, z) in sets.items():
    flagged = z[:, 2] > gate.threshold
    rows.append({'set': name, 'kind': kind, 'n': int(len(z)),
                 'flagged': float(flagged.mean()),
                 'flagged_reconstruction': float(np.mean(z[:, 0] > gate.threshold)),
                 'flagged_features': (float(np.mean(z[:, 1] > gate.threshold))
                                      if gate.uses_features else None)})
  result = {'workdir': os.path.abspath(args.workdir), 'stage': predictor.stage,
            'gate': summary, 'rows': rows, 'seconds': round(time.time() - t0, 1)}
  if args.json:
    print(json.dumps(result, indent=2))
    return 0
  print(f'OOD gate of {args.workdir} ({predictor.stage}): threshold {gate.threshold:.2f}, '
        f'{summary["pca_components"]} PCA components, fitted on {summary["num_train"]}, '
        f'validation false alarms {100 * summary["false_alarm_rate_validation"]:.1f}% '
        f'(target {100 * summary["false_alarm_rate_target"]:.0f}%)')
  print('| set | kind | images | flagged | by reconstruction alone | by features alone |')
  print('| --- | --- | ---: | ---: | ---: | ---: |')
  for r in rows:
    feats = '-' if r['flagged_features'] is None else f'{100 * r["flagged_features"]:.1f}%'
    print(f'| {r["set"]} | {r["kind"]} | {r["n"]} | {100 * r["flagged"]:.1f}% | '
          f'{100 * r["flagged_reconstruction"]:.1f}% | {feats} |')
  print(f'({result["seconds"]} s)')
  return 0


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  sys.exit(main(sys.argv))
