r"""Paper 001 Table 1, column BSL+FAM+SAM.

BSL + FAM + the space attention module (section 3.2): the global average of the last
feature map tiled back to 7 x 7 and concatenated with the local features (no convolution in
between), a 1 x 1 classifier scoring every location, then average pooling; heat maps are the
class score maps before that pooling (`config.model.sam_pool='before_classifier'` is Fig. 4's
other placement).

Recipe, readings, demo and the command comparing the four runs: configs/multi_attention/_common.py.
  python -m cxr_jax.main --config=configs/multi_attention/bsl_fam_sam.py[:demo]
"""

import ml_collections

from cxr_jax.config_lib import load_sibling


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return load_sibling(__file__, '_common.py').get_config(
      'multi_attention_bsl_fam_sam', fam=True, sam=True, hard=False, label='BSL+FAM+SAM', arg=arg)
