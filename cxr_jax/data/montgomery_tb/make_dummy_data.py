"""Writes `dummy_data/`: a fake MontgomerySet/ with NLM's layout, file for file (no real data).

  python -m cxr_jax.data.montgomery_tb.make_dummy_data

20 images (10 normal, 10 TB: 7/2/1 per label in the 70/20/10 split), 49 x 40 px 16-bit PNGs
holding 12-bit values like the originals (4892 x 4020), a clinical reading per image in NLM's
format, and left/right lung masks. Deterministic (fixed seed), so re-running changes nothing.
"""

from __future__ import annotations

import pathlib

import numpy as np
from PIL import Image

NUM_PER_LABEL = 10
HEIGHT, WIDTH = 49, 40  # portrait, the aspect ratio of 4892 x 4020
SEXES = ('M', 'F', 'O')  # 'O' occurs in NLM's readings: parsed as unknown


def fake_chest(rng: np.random.Generator, height: int, width: int):
  """(image float [H, W] in [0, 1], left lung mask, right lung mask): a body with two dark lungs.

  'Left' is the patient's left, on the image right (PA view).
  """
  y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
  body = ((x - 0.5) / 0.45) ** 2 + ((y - 0.55) / 0.5) ** 2 < 1
  cx = 0.25 + rng.uniform(-0.03, 0.03)
  lungs = [((x - c) / 0.16) ** 2 + ((y - 0.45) / 0.3) ** 2 < 1 for c in (1 - cx, cx)]
  img = 0.1 + 0.6 * body - 0.35 * (lungs[0] | lungs[1]) + rng.normal(0, 0.03, (height, width))
  return np.clip(img, 0, 1), lungs[0], lungs[1]


def write(root: pathlib.Path) -> None:
  rng = np.random.default_rng(3)
  base = root / 'MontgomerySet'
  for sub in ('CXR_png', 'ClinicalReadings', 'ManualMask/leftMask', 'ManualMask/rightMask'):
    (base / sub).mkdir(parents=True, exist_ok=True)
  for i in range(2 * NUM_PER_LABEL):
    label = i % 2
    stem = f'MCUCXR_{i + 1:04d}_{label}'
    img, left, right = fake_chest(rng, HEIGHT, WIDTH)
    Image.fromarray(np.rint(img * 4095).astype(np.uint16)).save(base / 'CXR_png' / f'{stem}.png')
    # NLM's masks are 8-bit 0/255; its folder names are kept (the builder orders by position).
    Image.fromarray(left.astype(np.uint8) * 255).save(base / 'ManualMask/leftMask' / f'{stem}.png')
    Image.fromarray(right.astype(np.uint8) * 255).save(
      base / 'ManualMask/rightMask' / f'{stem}.png')
    finding = 'normal' if label == 0 else 'right upper lobe cavitary infiltrate, TB'
    reading = f"Patient's Sex: {SEXES[i % 3]}\nPatient's Age: {20 + 3 * i:03d}Y\n{finding}\n"
    (base / 'ClinicalReadings' / f'{stem}.txt').write_text(reading.replace('\n', '\r\n'))


if __name__ == '__main__':
  write(pathlib.Path(__file__).resolve().parent / 'dummy_data')
