r"""Paper 002, Table 1 row 'ResNet-50+Alignment+DM'
(the paper's method; Table 2 row 'Base model+DM').

anchor -> train_loss_network -> align -> train_classifier (aligned) -> disease_masks ->
train_dm -> evaluate -> localize -> report; the report holds 'ResNet-50+Alignment' and
'ResNet-50+Alignment+DM' side by side (Tables 1, 3, 4), the anchor, Fig. 4 and Fig. 3.

Recipe, readings, demo and the commands comparing the runs: configs/disease_masks/_common.py.
  python -m cxr_jax.main --config=configs/disease_masks/dm_aligned.py[:demo]
"""

import ml_collections

from cxr_jax.config_lib import load_sibling


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return load_sibling(__file__, '_common.py').get_config(
      'disease_masks_dm_aligned', align=True, masks='dm',
      labels=('ResNet-50+Alignment', 'ResNet-50+Alignment+DM'), arg=arg)
