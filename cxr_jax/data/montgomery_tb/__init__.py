"""TFDS builder `montgomery_tb` (import registers it with TFDS)."""

from cxr_jax.data.montgomery_tb.montgomery_tb_dataset_builder import Builder

__all__ = ['Builder']
