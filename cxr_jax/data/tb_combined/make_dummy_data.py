"""Writes `dummy_data/`: both fake NLM sets side by side, as `tb_combined` reads them.

  python -m cxr_jax.data.tb_combined.make_dummy_data

The same files as `montgomery_tb/dummy_data` and `shenzhen_tb/dummy_data` (same generators, same
seeds), so the tests can check that the combined splits are the union of the single-set splits.
"""

from __future__ import annotations

import pathlib

from cxr_jax.data.montgomery_tb import make_dummy_data as montgomery
from cxr_jax.data.shenzhen_tb import make_dummy_data as shenzhen

if __name__ == '__main__':
  out = pathlib.Path(__file__).resolve().parent / 'dummy_data'
  montgomery.write(out)
  shenzhen.write(out)
