r"""Paper 001 Table 1, column BSL.

The ResNet-101 baseline: global average pooling and a fully connected head, no attention
module.

Recipe, readings, demo and the command comparing the four runs: configs/multi_attention/_common.py.
  python -m cxr_jax.main --config=configs/multi_attention/bsl.py[:demo]
"""

import ml_collections

from cxr_jax.config_lib import load_sibling


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return load_sibling(__file__, '_common.py').get_config(
      'multi_attention_bsl', fam=False, sam=False, hard=False, label='BSL', arg=arg)
