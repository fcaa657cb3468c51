"""TFDS builder of `montgomery_tb`: NLM Montgomery County TB set (138 images, 80 normal / 58 TB).

Reads `MontgomerySet/` from manual_dir (see `nlm_tb.MANUAL_DOWNLOAD_INSTRUCTIONS`); features,
split and checks are shared with `shenzhen_tb` and `tb_combined` in `cxr_jax/data/nlm_tb.py`.

  tfds.builder('montgomery_tb/512', data_dir=...).download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=...))
"""

from __future__ import annotations

from cxr_jax.data import nlm_tb


class Builder(nlm_tb.TbBuilderBase):
  """DatasetBuilder for the Montgomery County X-ray Set (paper 003)."""

  TB_SETS = (nlm_tb.MONTGOMERY,)

  def _description(self) -> str:
    return ('NLM Montgomery County chest X-ray set: 138 PA radiographs (80 normal, 58 TB), '
            'clinical readings, manual left/right lung masks.')
