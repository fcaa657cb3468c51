"""TFDS builder `jsrt_scr` (import registers it with TFDS)."""

from cxr_jax.data.jsrt_scr.jsrt_scr_dataset_builder import Builder

__all__ = ['Builder']
