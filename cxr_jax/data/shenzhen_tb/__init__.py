"""TFDS builder `shenzhen_tb` (import registers it with TFDS)."""

from cxr_jax.data.shenzhen_tb.shenzhen_tb_dataset_builder import Builder

__all__ = ['Builder']
