"""TFDS builder `nih_chest_xray14` (import registers it with TFDS)."""

from cxr_jax.data.nih_chest_xray14.nih_chest_xray14_dataset_builder import Builder, NihConfig

__all__ = ['Builder', 'NihConfig']
