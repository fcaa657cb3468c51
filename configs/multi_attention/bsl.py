r"""Paper 001 Table 1, column BSL.

The ResNet-101 baseline: global average pooling and a fully connected head, no attention
module.

Everything else (recipe, readings, demo) is in configs/multi_attention/_common.py.

Run (NIH ChestX-ray14 and ImageNet ResNet-101 weights prepared as in WORKSPACE.md; a GPU/TPU):
  python -m cxr_jax.main --config=configs/multi_attention/bsl.py \
    --workdir=workdir/ma_bsl
Demo (synthetic cxr_phantom, 2 CPU cores, minutes):
  python -m cxr_jax.main --config=configs/multi_attention/bsl.py:demo
All four side by side (Table 1 format):
  python -m cxr_jax.report \
    --workdirs=workdir/ma_bsl,workdir/ma_bsl_fam,workdir/ma_bsl_fam_sam,workdir/ma_ma
"""

import importlib.util
import pathlib

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  path = pathlib.Path(__file__).with_name('_common.py')
  spec = importlib.util.spec_from_file_location('multi_attention_common', path)
  common = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(common)
  return common.get_config('multi_attention_bsl', fam=False, sam=False, hard=False,
                           label='BSL', arg=arg)
