r"""Paper 002, DM attention without the alignment module (an ablation the paper does not report).

train_classifier (unaligned) -> disease_masks (eq. 1-3 from its CAMs) -> train_dm (eq. 4-5,
5 more epochs from the classifier) -> evaluate -> localize -> report; the report puts the
classifier and the DM model side by side.

Recipe, readings, demo and the commands comparing the runs: configs/disease_masks/_common.py.
  python -m cxr_jax.main --config=configs/disease_masks/dm.py[:demo]
"""

import ml_collections

from cxr_jax.config_lib import load_sibling


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return load_sibling(__file__, '_common.py').get_config(
      'disease_masks_dm', align=False, masks='dm',
      labels=('ResNet-50', 'ResNet-50+DM'), arg=arg)
