r"""Paper 001 Table 1, column BSL+FAM.

The baseline with the feature attention module: a squeeze-and-excitation block (r = 16)
in every residual block (section 3.1, eq. 1-2).

Recipe, readings, demo and the command comparing the four runs: configs/multi_attention/_common.py.
  python -m cxr_jax.main --config=configs/multi_attention/bsl_fam.py[:demo]
"""

import ml_collections

from cxr_jax.config_lib import load_sibling


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return load_sibling(__file__, '_common.py').get_config(
      'multi_attention_bsl_fam', fam=True, sam=False, hard=False, label='BSL+FAM', arg=arg)
