r"""Paper 004 Table 2, column Ours w/o F_l.

"Ours w/o F_l": the multi-scale attention DenseNet-121 without feature weighting (Table 3's
"FE").

Recipe, readings, demo and the command comparing the runs: configs/lung_heart/_common.py.
  python -m cxr_jax.main --config=configs/lung_heart/msa_densenet.py[:demo]
"""

import ml_collections

from cxr_jax.config_lib import load_sibling


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return load_sibling(__file__, '_common.py').get_config(
      'lung_heart_msa_densenet', backbone='densenet121', msa=True, fw=False,
      label='Ours w/o F_l', arg=arg)
