"""TFDS builder of `tb_combined`: the Montgomery and Shenzhen TB sets together (800 images).

Paper 003 trains on both NLM sets. Each image keeps its `source`; the split is stratified by
(set, label) with the same seeded hash as `montgomery_tb` and `shenzhen_tb`, so every split here
is exactly the union of those two builders' splits of the same config.

  tfds.builder('tb_combined/512', data_dir=...).download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=...))
"""

from __future__ import annotations

from cxr_jax.data import nlm_tb


class Builder(nlm_tb.TbBuilderBase):
  """DatasetBuilder for Montgomery + Shenzhen (paper 003's 70/20/10 split)."""

  TB_SETS = (nlm_tb.MONTGOMERY, nlm_tb.SHENZHEN)

  def _description(self) -> str:
    return ('NLM Montgomery County and Shenzhen Hospital chest X-ray sets together: 800 PA '
            'radiographs (406 normal, 394 TB), clinical readings, lung masks where available.')
