r"""Paper 002, Table 1 row 'ResNet-50+Alignment'.

The alignment module (section 3.2) in front of the ResNet-50: anchor (mean of 2,000 normal
images) -> train_loss_network (the ResNet-50 of the perceptual loss, on the unaligned data) ->
align (the ResNet-18 regressor; every image's transform) -> train_classifier (on the aligned
images) -> evaluate -> localize -> report.

Recipe, readings, demo and the commands comparing the runs: configs/disease_masks/_common.py.
  python -m cxr_jax.main --config=configs/disease_masks/resnet50_aligned.py[:demo]
"""

import ml_collections

from cxr_jax.config_lib import load_sibling


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return load_sibling(__file__, '_common.py').get_config(
      'disease_masks_resnet50_aligned', align=True, masks='',
      labels=('ResNet-50+Alignment',), arg=arg)
