"""XLA compiler options for this library's programs, and `jit`: `jax.jit` with them.

On the CPU backend the jaxlib we run (0.10.x) hands convolutions, matrix products and reductions
to YNNPACK fusions by default. Its convolutions run the backward passes of a train step several
times slower than XLA's own (Eigen) convolutions; its products and reductions are faster than
XLA's. So CPU programs are compiled with YNNPACK for products and reductions only. Measured on 2
cores, batch 16: fwd + both gradients of one 3x3 convolution, 224 px 64 -> 64 channels, 4.9 s with
YNNPACK vs 1.35 s without (torch 1.55 s); ResNet-50 train step at 224 px (`conv_impl='xla'`) 8.0 s
with jaxlib's defaults, 8.2 s with every YNNPACK fusion off, 4.2 s with these options (README,
Speed; `benchmarks/conv_impl.py`, A/B with XLA_FLAGS, which win).

The options are per program (`jax.jit(..., compiler_options=...)`), not `XLA_FLAGS`: a jaxlib
that does not know an option or one of its values rejects it with a Python error (checked once,
then no options), where an unknown flag in `XLA_FLAGS` aborts the process. A user's own
`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=...` wins over this default.
"""

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import jax

# The YNNPACK fusion types to use: products and reductions; not INDIVIDUAL_CONVOLUTION (slow
# backward convolutions) nor ELTWISE (measured: ResNet-50 at 224 px 4.2 s -> 3.2 s per step with
# it, but the demo's MobileNet (64 px, width 1/8) 0.059 s -> 0.09 s: users training the large
# networks on a CPU can add it, e.g.
# XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=dot,reduce,individual_dot,eltwise).
CPU_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': ','.join(
    f'LIBRARY_FUSION_TYPE_{t}' for t in ('DOT', 'REDUCE', 'INDIVIDUAL_DOT'))}


@functools.cache
def compiler_options() -> dict[str, str]:
  """The options for programs on the default backend: `CPU_OPTIONS` on the CPU where this
  jaxlib accepts them and XLA_FLAGS does not set them, else none. Starts the backend."""
  if jax.default_backend() != 'cpu':
    return {}
  flags = os.environ.get('XLA_FLAGS', '')
  options = {k: v for k, v in CPU_OPTIONS.items() if f'--{k}' not in flags}
  if not options:
    return {}
  try:
    jax.jit(lambda x: x + 1, compiler_options=options).lower(0.0).compile()
  except Exception as e:  # noqa: BLE001  (an option this jaxlib does not have: XLA's defaults)
    logging.info('XLA compiler options %s not accepted by this jaxlib (%s); using defaults',
                 options, e)
    return {}
  return options


class _Jit:
  """`jax.jit(fun, compiler_options=compiler_options(), **kwargs)`, built on first use."""

  def __init__(self, fun: Callable, kwargs: dict[str, Any]):
    self._fun, self._kwargs, self._jitted = fun, kwargs, None
    functools.update_wrapper(self, fun)

  def _get(self) -> Any:
    if self._jitted is None:
      self._jitted = jax.jit(self._fun, compiler_options=compiler_options(), **self._kwargs)
    return self._jitted

  def __call__(self, *args, **kwargs):
    return self._get()(*args, **kwargs)

  def __getattr__(self, name: str) -> Any:  # lower, trace, eval_shape, ...
    if name.startswith('__'):
      raise AttributeError(name)
    return getattr(self._get(), name)


def jit(fun: Callable | None = None, **kwargs: Any) -> Any:
  """`jax.jit` (same keyword arguments; usable as a decorator with or without them) compiled
  with `compiler_options()`. The options are looked up at the first call or `.lower`, not here,
  so that decorating at import time does not start the backend (`jax.distributed.initialize`
  and the device-count flags must come first)."""
  if fun is None:
    return functools.partial(jit, **kwargs)
  return _Jit(fun, kwargs)
