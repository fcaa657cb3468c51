"""The stage registry: every stage is a function `(config, workdir) -> None` registered by name."""

from collections.abc import Callable

import jax
import ml_collections
from etils import epath

from cxr_jax.registry import Registry

StageFn = Callable[[ml_collections.ConfigDict, epath.Path], None]
STAGES: Registry[StageFn] = Registry('stage')


def is_chief() -> bool:
  """Process 0 alone writes logs, reports and metadata."""
  return jax.process_index() == 0
