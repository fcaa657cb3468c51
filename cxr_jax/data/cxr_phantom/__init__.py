"""TFDS builder `cxr_phantom` (import registers it with TFDS)."""

from cxr_jax.data.cxr_phantom.cxr_phantom_dataset_builder import Builder, CxrPhantomConfig

__all__ = ['Builder', 'CxrPhantomConfig']
