r"""Paper 004 Table 2, column Ours.

"Ours": multi-scale attention DenseNet-121 with the lung/heart feature weighting
F_l = F_g (x) M_g; its masks come from the U-Net run configs/lung_heart_unet.py
(`config.segment.source`) through the `segment` stage. The demo trains its own U-Net on the
phantom's masks first.

Recipe, readings, demo and the command comparing the runs: configs/lung_heart/_common.py.
  python -m cxr_jax.main --config=configs/lung_heart/msa_densenet_fw.py[:demo]
"""

import ml_collections

from cxr_jax.config_lib import load_sibling


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return load_sibling(__file__, '_common.py').get_config(
      'lung_heart_msa_densenet_fw', backbone='densenet121', msa=True, fw=True,
      label='Ours', arg=arg)
