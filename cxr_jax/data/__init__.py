"""Data sets (TFDS builders), preprocessing ops and the input pipeline.

Importing this package registers cxr_jax's TFDS builders, so `tfds.builder(name)` finds them.
"""

from cxr_jax.data import (
  cxr_phantom,
  cxr_samples,
  jsrt_scr,
  montgomery_tb,
  nih_chest_xray14,
  shenzhen_tb,
  tb_combined,
)

# Every builder this package defines; add new ones here.
BUILDERS = (
  cxr_phantom.Builder,
  nih_chest_xray14.Builder,
  montgomery_tb.Builder,
  shenzhen_tb.Builder,
  tb_combined.Builder,
  jsrt_scr.Builder,
  cxr_samples.Builder,
)


def builder_names() -> list[str]:
  """Names of cxr_jax's TFDS builders (what `config.data.name` can start with)."""
  return sorted(b.name for b in BUILDERS)
