"""Data sets (TFDS builders), preprocessing ops and the input pipeline.

Importing this package registers cxr_jax's TFDS builders, so `tfds.builder(name)` finds them.
"""

from cxr_jax.data import cxr_phantom

# Every builder this package defines; add new ones here.
BUILDERS = (cxr_phantom.Builder,)


def builder_names() -> list[str]:
  """Names of cxr_jax's TFDS builders (what `config.data.name` can start with)."""
  return sorted(b.name for b in BUILDERS)
