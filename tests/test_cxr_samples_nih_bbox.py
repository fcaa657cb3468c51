"""`cxr_samples/nih_bbox`: every label row and every radiologist box of the real sample survives.

Needs ../shared/data (team machines and CI only): skips without it. Its own file because the
build takes ~40 s on 2 cores.
"""

from __future__ import annotations

import numpy as np
from test_cxr_samples import build, check_nih_rows, rows_of

from cxr_jax.labels import BBOX_LIST_ALIASES, NIH_CLASSES


def test_nih_bbox_labels_and_boxes_match_csvs(shared_data, tmp_path):
  folder = shared_data / 'nih_bbox'
  splits = build('nih_bbox-256', folder, tmp_path)
  rows = rows_of(folder / 'labels.csv')
  check_nih_rows(rows, splits)
  boxes: dict[str, list[dict[str, str]]] = {}
  for b in rows_of(folder / 'bbox.csv'):
    boxes.setdefault(b['image'], []).append(b)
  assert set(splits['bbox']) == set(boxes)
  n = 0
  for image, expected in boxes.items():
    objects = splits['bbox'][image]['objects']
    assert len(objects['label']) == len(expected)
    for k, b in enumerate(expected):  # same order as bbox.csv
      name = BBOX_LIST_ALIASES.get(b['finding_label'], b['finding_label'])
      assert NIH_CLASSES[objects['label'][k]] == name
      x, y, w, h = (float(b[c]) for c in 'xywh')
      np.testing.assert_allclose(objects['bbox_xywh'][k], np.array([x, y, w, h]) * 256 / 1024,
                                 rtol=1e-6)
      np.testing.assert_allclose(
        objects['bbox'][k], np.clip([y / 1024, x / 1024, (y + h) / 1024, (x + w) / 1024], 0, 1),
        atol=1e-6)
      n += 1
  assert n == len(rows_of(folder / 'bbox.csv')) == 590
  # Images without a box carry no objects.
  assert all(len(ex['objects']['label']) == 0
             for split in ('train', 'test') for i, ex in splits[split].items() if i not in boxes)
  ex = next(iter(splits['test'].values()))
  assert ex['image'].shape == (256, 256, 1)
