r"""Paper 001 Table 1, column MA.

The multi-attention network: FAM + SAM + the hard example attention module (section
3.3). Stages: train_classifier (set A) -> mine_hard_examples (stage 1's best model scores A;
set B = the images with a positive class scored <= 0.5; per-class counts are logged and written
to mine_hard_examples/hard_examples.json) -> train_hard_examples (retrained on C = A + B) ->
evaluate -> localize -> report (stage 1 and MA side by side).

Everything else (recipe, readings, demo) is in configs/multi_attention/_common.py.

Run (NIH ChestX-ray14 and ImageNet ResNet-101 weights prepared as in WORKSPACE.md; a GPU/TPU):
  python -m cxr_jax.main --config=configs/multi_attention/ma.py \
    --workdir=workdir/ma_ma
Demo (synthetic cxr_phantom, 2 CPU cores, minutes):
  python -m cxr_jax.main --config=configs/multi_attention/ma.py:demo
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
  return common.get_config('multi_attention_ma', fam=True, sam=True, hard=True,
                           label='MA', arg=arg)
