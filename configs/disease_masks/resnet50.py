r"""Paper 002, Table 1 row 'ResNet-50'.

The baseline: ResNet-50 on the unaligned images with the weighted BCE (eq. 10), no
alignment, no disease masks. Stages: train_classifier -> evaluate -> localize -> report.

Recipe, readings, demo and the commands comparing the runs: configs/disease_masks/_common.py.
  python -m cxr_jax.main --config=configs/disease_masks/resnet50.py[:demo]
"""

import ml_collections

from cxr_jax.config_lib import load_sibling


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return load_sibling(__file__, '_common.py').get_config(
      'disease_masks_resnet50', align=False, masks='',
      labels=('ResNet-50',), arg=arg)
