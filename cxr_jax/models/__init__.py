"""Backbones and classifiers, registered by name in `MODELS`.

A config names its model (`config.model.name`) and passes the rest of `config.model` as keyword
arguments; `build_model` adds the number of classes and the compute dtype.
"""

import sys
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from cxr_jax.registry import Registry

MODELS: Registry[type[nn.Module]] = Registry('model')

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def parse_dtype(name: str) -> Any:
  """Maps a config string ('float32', 'bfloat16', 'float16') to a JAX dtype."""
  try:
    return DTYPES[name]
  except KeyError:
    raise ValueError(f'Unknown dtype {name!r}; valid: {sorted(DTYPES)}') from None


def build_model(model_cfg: ml_collections.ConfigDict, *, num_classes: int,
                dtype: str = 'float32', bn_axis_name: str | None = None) -> nn.Module:
  """Instantiates `model_cfg.name` with the remaining fields of `model_cfg` as arguments."""
  kwargs = dict(model_cfg.to_dict())
  name = kwargs.pop('name')
  cls = MODELS.get(name)
  try:
    return cls(num_classes=num_classes, dtype=parse_dtype(dtype), bn_axis_name=bn_axis_name,
               **kwargs)
  except TypeError as e:
    raise ValueError(f'config.model: bad arguments for model {name!r}: {e}') from None


def model_function(model: nn.Module, name: str) -> Callable[..., Any] | None:
  """`name` ('head_fn', 'score_map_fn') of the module that defines `model`'s class, or None.

  Each model module may define `head_fn(model, variables)`: features [N, h, w, C] -> logits
  [N, K] (what feature-level PDA and Grad-CAM re-evaluate) and `score_map_fn(model, variables)`:
  features -> class score maps [N, h, w, K] whose spatial mean is the logits (CAM).
  """
  module = sys.modules[type(model).__module__]
  return getattr(module, name, None)


# Importing the modules registers their models.
from cxr_jax.models import alexnet, custom_cnn, densenet, mobilenet, mobilenet_lstm_attention, resnet, unet, vgg  # noqa: E402,E501,F401,I001
