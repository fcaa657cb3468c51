r"""Paper 004 Table 2, column DCNN.

DCNN column (Wang et al.'s best, ResNet-50), "the same experimental setup".

Recipe, readings, demo and the command comparing the runs: configs/lung_heart/_common.py.
  python -m cxr_jax.main --config=configs/lung_heart/resnet50.py[:demo]
"""

import ml_collections

from cxr_jax.config_lib import load_sibling


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return load_sibling(__file__, '_common.py').get_config(
      'lung_heart_resnet50', backbone='resnet50', msa=False, fw=False,
      label='DCNN', arg=arg)
