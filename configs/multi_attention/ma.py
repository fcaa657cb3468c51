r"""Paper 001 Table 1, column MA.

The multi-attention network: FAM + SAM + the hard example attention module (section
3.3). Stages: train_classifier (set A) -> mine_hard_examples (stage 1's best model scores A;
set B = the images with a positive class scored <= 0.5; per-class counts are logged and written
to mine_hard_examples/hard_examples.json) -> train_hard_examples (retrained on C = A + B) ->
evaluate -> localize -> report (stage 1 and MA side by side).

Recipe, readings, demo and the command comparing the four runs: configs/multi_attention/_common.py.
  python -m cxr_jax.main --config=configs/multi_attention/ma.py[:demo]
"""

import ml_collections

from cxr_jax.config_lib import load_sibling


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return load_sibling(__file__, '_common.py').get_config(
      'multi_attention_ma', fam=True, sam=True, hard=True, label='MA', arg=arg)
