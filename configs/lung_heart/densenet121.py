r"""Paper 004 Table 2, column CheXNet.

CheXNet column: DenseNet-121 on the global image (Table 3's "FE w/o MA").

Recipe, readings, demo and the command comparing the runs: configs/lung_heart/_common.py.
  python -m cxr_jax.main --config=configs/lung_heart/densenet121.py[:demo]
"""

import ml_collections

from cxr_jax.config_lib import load_sibling


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return load_sibling(__file__, '_common.py').get_config(
      'lung_heart_densenet121', backbone='densenet121', msa=False, fw=False,
      label='CheXNet', arg=arg)
