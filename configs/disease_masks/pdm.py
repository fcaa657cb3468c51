r"""Paper 002, Table 2 row 'Base model+PDM' (pseudo-disease masks, section 4.4).

The base model is the aligned ResNet-50 (Table 2's caption): anchor -> train_loss_network ->
align -> train_classifier -> pseudo_disease_masks (config.pdm regions drawn on the anchor, Fig.
7) -> train_dm (with them, fixed) -> evaluate -> localize -> report.

Recipe, readings, demo and the commands comparing the runs: configs/disease_masks/_common.py.
  python -m cxr_jax.main --config=configs/disease_masks/pdm.py[:demo]
"""

import ml_collections

from cxr_jax.config_lib import load_sibling


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return load_sibling(__file__, '_common.py').get_config(
      'disease_masks_pdm', align=True, masks='pdm',
      labels=('Base model', 'Base model+PDM'), arg=arg)
