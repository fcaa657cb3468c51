"""Writes `dummy_data/`: a fake ChinaSet_AllFiles/ with NLM's layout, file for file (no real data).

  python -m cxr_jax.data.shenzhen_tb.make_dummy_data

20 images (10 normal, 10 TB), 44 x 45 px 8-bit PNGs (two stored as RGB, as some Shenzhen files
are), a reading per image in NLM's Shenzhen format ("male 35yrs" first line, with the variants
the builder must parse) and Kaggle-style union lung masks for 14 of them (the Kaggle set covers
566 of the 662 images). Deterministic.
"""

from __future__ import annotations

import pathlib

import numpy as np
from PIL import Image

from cxr_jax.data.montgomery_tb.make_dummy_data import fake_chest

NUM_PER_LABEL = 10
HEIGHT, WIDTH = 44, 45
# First lines as they occur in the readings (spacing and case vary; one age in months).
FIRST_LINES = ('male 35yrs', 'female 24yrs', 'Male  61 yrs', 'female 8months', 'male35yrs',
               'Female 42yr', 'unknown sex')
AGES = (35, 24, 61, 0, 35, 42, -1)
SEXES = (0, 1, 0, 1, 0, 1, 2)


def write(root: pathlib.Path) -> None:
  rng = np.random.default_rng(4)
  base = root / 'ChinaSet_AllFiles'
  for sub in ('CXR_png', 'ClinicalReadings', 'mask'):
    (base / sub).mkdir(parents=True, exist_ok=True)
  for i in range(2 * NUM_PER_LABEL):
    label = i % 2
    stem = f'CHNCXR_{i + 1:04d}_{label}'
    img, left, right = fake_chest(rng, HEIGHT, WIDTH)
    grey = np.rint(img * 255).astype(np.uint8)
    pic = Image.fromarray(grey)
    if i in (3, 8):
      pic = pic.convert('RGB')
    pic.save(base / 'CXR_png' / f'{stem}.png')
    if i % 3 != 2:
      Image.fromarray((left | right).astype(np.uint8) * 255).save(
        base / 'mask' / f'{stem}_mask.png')
    finding = 'normal' if label == 0 else 'STB,ATB in the left upper field'
    (base / 'ClinicalReadings' / f'{stem}.txt').write_text(
      f'{FIRST_LINES[i % len(FIRST_LINES)]}\n{finding}\n')


if __name__ == '__main__':
  write(pathlib.Path(__file__).resolve().parent / 'dummy_data')
