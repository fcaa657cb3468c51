"""TFDS builder `tb_combined` (import registers it with TFDS)."""

from cxr_jax.data.tb_combined.tb_combined_dataset_builder import Builder

__all__ = ['Builder']
