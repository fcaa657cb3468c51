"""TFDS builder of `shenzhen_tb`: NLM Shenzhen Hospital TB set (662 images, 326 normal / 336 TB).

Reads `ChinaSet_AllFiles/` from manual_dir (see `nlm_tb.MANUAL_DOWNLOAD_INSTRUCTIONS`); features,
split and checks are shared with `montgomery_tb` and `tb_combined` in `cxr_jax/data/nlm_tb.py`.

  tfds.builder('shenzhen_tb/512', data_dir=...).download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=...))
"""

from __future__ import annotations

from cxr_jax.data import nlm_tb


class Builder(nlm_tb.TbBuilderBase):
  """DatasetBuilder for the Shenzhen Hospital X-ray Set (paper 003)."""

  TB_SETS = (nlm_tb.SHENZHEN,)

  def _description(self) -> str:
    return ('NLM Shenzhen Hospital chest X-ray set: 662 PA radiographs (326 normal, 336 TB), '
            'clinical readings, optional union lung masks (Kaggle).')
