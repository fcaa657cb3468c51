"""TFDS builder `cxr_samples` (import registers it with TFDS)."""

from cxr_jax.data.cxr_samples.cxr_samples_dataset_builder import Builder, SamplesConfig

__all__ = ['Builder', 'SamplesConfig']
