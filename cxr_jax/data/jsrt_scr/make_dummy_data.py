"""Writes `dummy_data/`: fake JSRT `.IMG` files and SCR GIF masks in the real layout (no real data).

  python -m cxr_jax.data.jsrt_scr.make_dummy_data

Six images (JPCLN001-003, JPCNN001-003) as 64 x 64 raw big-endian 12-bit files (the builder
reads the side from the file length; real ones are 2048 x 2048 = 8 MiB each) with JSRT's
inverted coding (dense = low values), and 32 x 32 GIF masks (real: 1024) of the five SCR
structures under scratch/fold1 (odd numbers) and scratch/fold2 (even). Deterministic.
"""

from __future__ import annotations

import pathlib

import numpy as np
from PIL import Image

from cxr_jax.data.jsrt_scr.jsrt_scr_dataset_builder import STRUCTURES

IMAGE_SIDE = 64
MASK_SIDE = 32
NAMES = ('JPCLN001', 'JPCLN002', 'JPCLN003', 'JPCNN001', 'JPCNN002', 'JPCNN003')


def fake_structures(rng: np.random.Generator, side: int) -> list[np.ndarray]:
  """Five boolean masks in STRUCTURES order (patient's left = image right)."""
  y, x = np.mgrid[0:side, 0:side] / side
  dx = rng.uniform(-0.03, 0.03)
  left_lung = ((x - 0.72 - dx) / 0.17) ** 2 + ((y - 0.5) / 0.32) ** 2 < 1
  right_lung = ((x - 0.28 - dx) / 0.17) ** 2 + ((y - 0.5) / 0.32) ** 2 < 1
  heart = ((x - 0.56) / 0.16) ** 2 + ((y - 0.66) / 0.13) ** 2 < 1
  left_clav = (np.abs(y - 0.2 - 0.1 * (x - 0.5)) < 0.03) & (x > 0.55) & (x < 0.85)
  right_clav = (np.abs(y - 0.2 + 0.1 * (x - 0.5)) < 0.03) & (x > 0.15) & (x < 0.45)
  return [left_lung, right_lung, heart, left_clav, right_clav]


def write(root: pathlib.Path, flat: bool = False) -> None:
  """flat=True writes SCR masks without fold folders (the alternative layout)."""
  rng = np.random.default_rng(5)
  (root / 'All247images').mkdir(parents=True, exist_ok=True)
  for name in NAMES:
    masks = fake_structures(rng, IMAGE_SIDE)
    density = 0.2 + 0.5 * (masks[2] | masks[3] | masks[4]) - 0.15 * (masks[0] | masks[1])
    density = np.clip(density + rng.normal(0, 0.02, density.shape), 0, 1)
    raw = np.rint((1 - density) * 3000 + 500).astype('>u2')  # dense -> low value, as JSRT
    (root / 'All247images' / f'{name}.IMG').write_bytes(raw.tobytes())
    fold = 1 if int(name[-3:]) % 2 else 2
    base = root / 'scratch' / ('masks' if flat else f'fold{fold}/masks')
    for structure, mask in zip(STRUCTURES, masks, strict=True):
      small = mask[::IMAGE_SIDE // MASK_SIDE, ::IMAGE_SIDE // MASK_SIDE]
      (base / structure).mkdir(parents=True, exist_ok=True)
      Image.fromarray(small.astype(np.uint8) * 255).save(base / structure / f'{name}.gif')


if __name__ == '__main__':
  write(pathlib.Path(__file__).resolve().parent / 'dummy_data')
