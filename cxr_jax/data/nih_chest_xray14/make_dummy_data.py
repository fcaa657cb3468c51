"""Regenerates dummy_data/: the real ChestX-ray14 manual folder in miniature, with fake pixels.

Whole patients are taken from the real metadata (their rows copied verbatim from
Data_Entry_2017_v2020.csv and BBox_List_2017.csv; the split lists filtered to them), chosen to
cover both dummy tarballs, official train_val and test, box images (one with two boxes), 'No
Finding' and Hernia images. Pixels are fake: small smooth 64 x 64 PNGs (one RGBA, as a few NIH
images are), packed under `images/` in `images_001.tar.gz` / `images_002.tar.gz` exactly where
NIH's packing puts those names. Output is byte-for-byte reproducible.

  python -m cxr_jax.data.nih_chest_xray14.make_dummy_data [--metadata ../shared/data/nih_metadata]
"""

from __future__ import annotations

import argparse
import gzip
import io
import pathlib
import tarfile

import numpy as np
from PIL import Image

from cxr_jax.data.nih_chest_xray14.nih_chest_xray14_dataset_builder import tarball_of

# images_001 holds patients 1..1335, images_002 1336..3923 (see TARBALL_FIRST_IMAGES).
PATIENTS = (
  # images_001.tar.gz
  1,  # train_val, 3 images with findings
  2,  # train_val, 'No Finding'
  3,  # test, 8 Hernia images
  4,  # train_val
  8,  # train_val, findings and 'No Finding'
  9,
  10,
  72,  # test, 1 box image
  111,  # train_val, Hernia
  147,  # test, 1 box image of 3
  385,  # train_val, Hernia and 'No Finding'
  # images_002.tar.gz
  1338,
  1342,
  1343,
  1349,
  1369,  # test, 1 box image
  1386,  # train_val, Hernia
  1688,  # test, 1 box image of 3
  2089,  # train_val, Hernia
  2106,  # test, one image with 2 boxes
)
RGBA_IMAGE = '00000008_000.png'
SIZE = 64
HERE = pathlib.Path(__file__).resolve().parent
DEFAULT_METADATA = HERE.parents[2].parent / 'shared' / 'data' / 'nih_metadata'


def _read_lines(path: pathlib.Path) -> list[str]:
  opener = gzip.open if path.suffix == '.gz' else open
  with opener(path, 'rt', newline='') as f:
    return f.read().splitlines()


def _fake_png(image_id: str, rgba: bool) -> bytes:
  """A smooth grey 'radiograph' (two dark lung ellipses) that compresses to ~1 KB."""
  seed = int(image_id[:8]) * 1000 + int(image_id[9:12])
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
  img = 150 + 60 * y
  for cx in (0.3, 0.7):
    inside = ((x - cx) / 0.17) ** 2 + ((y - 0.5) / 0.3) ** 2 < 1
    img = np.where(inside, 60 + rng.integers(0, 40), img)
  img = img.astype(np.uint8)
  out = io.BytesIO()
  if rgba:
    rgb = np.repeat(img[..., None], 3, axis=-1)
    alpha = np.full(img.shape + (1,), 255, np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha], -1), mode='RGBA').save(out, format='PNG')
  else:
    Image.fromarray(img, mode='L').save(out, format='PNG')
  return out.getvalue()


def _write_tarball(path: pathlib.Path, images: dict[str, bytes]) -> None:
  # Fixed gzip and tar header times so the files only change when their content does.
  with path.open('wb') as raw, gzip.GzipFile(fileobj=raw, mode='wb', mtime=0) as gz:
    with tarfile.open(fileobj=gz, mode='w', format=tarfile.USTAR_FORMAT) as tar:
      for image_id, data in sorted(images.items()):
        info = tarfile.TarInfo(f'images/{image_id}')
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        tar.addfile(info, io.BytesIO(data))


def main(metadata: pathlib.Path, out: pathlib.Path) -> None:
  entry_lines = _read_lines(metadata / 'Data_Entry_2017_v2020.csv.gz')
  header, rows = entry_lines[0], entry_lines[1:]
  keep = [r for r in rows if int(r.split(',')[3]) in PATIENTS]
  ids = [r.split(',')[0] for r in keep]
  bbox_lines = _read_lines(metadata / 'BBox_List_2017.csv.gz')
  bbox_keep = [r for r in bbox_lines[1:] if r.split(',')[0] in set(ids)]

  out.mkdir(parents=True, exist_ok=True)
  (out / 'Data_Entry_2017_v2020.csv').write_text('\n'.join([header, *keep]) + '\n')
  (out / 'BBox_List_2017.csv').write_text('\n'.join([bbox_lines[0], *bbox_keep]) + '\n')
  for name in ('train_val_list.txt', 'test_list.txt'):
    names = [n for n in _read_lines(metadata / name) if n in set(ids)]
    (out / name).write_text('\n'.join(names))  # no trailing newline, as NIH ships them

  tarballs: dict[str, dict[str, bytes]] = {}
  for image_id in ids:
    tarballs.setdefault(tarball_of(image_id), {})[image_id] = _fake_png(
      image_id, rgba=image_id == RGBA_IMAGE
    )
  for name, images in tarballs.items():
    _write_tarball(out / name, images)
  total = sum(p.stat().st_size for p in out.iterdir())
  print(f'{len(ids)} images, {len(bbox_keep)} boxes, {sorted(tarballs)}: {total / 1024:.0f} KiB')


if __name__ == '__main__':
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--metadata', type=pathlib.Path, default=DEFAULT_METADATA)
  parser.add_argument('--out', type=pathlib.Path, default=HERE / 'dummy_data')
  args = parser.parse_args()
  main(args.metadata, args.out)
