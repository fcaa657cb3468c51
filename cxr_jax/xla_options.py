"""XLA compiler options for this library's programs, and `jit`: `jax.jit` with them.

On the CPU backend the jaxlib we run (0.10.x) hands convolutions, matrix products and reductions
to YNNPACK fusions by default. Its convolutions run the backward passes of a train step several
times slower than XLA's own (Eigen) convolutions; its products and reductions are faster than
XLA's. So CPU programs are compiled with YNNPACK for products and reductions only
(`DEFAULT_CPU_FUSIONS`). Measured on 2 cores, batch 16: fwd + both gradients of one 3x3
convolution, 224 px 64 -> 64 channels, 4.9 s with YNNPACK vs 1.35 s without (torch 1.55 s);
ResNet-50 train step at 224 px (`conv_impl='xla'`) 8.0 s with jaxlib's defaults, 8.2 s with
every YNNPACK fusion off, 4.2 s with these options (README, Speed; `benchmarks/conv_impl.py`).

YNNPACK's element-wise fusions ('eltwise') are a per-config choice, `config.cpu_fusions`,
passed to the train step. Measured (224 px, batch 16, each program in fresh processes,
`benchmarks/conv_impl.py --isolate`): ResNet-50 4.2 s per step with the defaults ('matmul'
convolutions) and with 'eltwise' alone, 3.5 s with 'eltwise' and XLA's convolutions
(`conv_impl='xla'`); DenseNet-121 3.9 -> 3.65 s ('matmul'; 3.2 s with 'xla' once BatchNorm's
gradient was hand-written, cxr_jax/models/batch_norm.py); small networks get slower,
MobileNet above all: its depthwise layers (sums of shifted slices times per-channel weights)
then get each weight broadcast to a full-size tensor in memory (the demo's MobileNet, 64 px,
batch 32: 0.067-0.075 -> 0.084-0.103 s per step). The full configs of papers 001, 002 and 004
add it (their ResNets and DenseNets with the default 'auto' convolutions: since the 1x1 weight
gradients' layout fix in cxr_jax/models/conv.py, 'matmul' beats XLA's own convolutions there
too, ResNet-50 5.19 vs 4.35 img/s), their demos do not (no gain at demo size); paper 003's
custom CNN adds it everywhere (LRN and ReLU around small convolutions: 1.2-1.7x faster).

The options are per program (`jax.jit(..., compiler_options=...)`), not `XLA_FLAGS`: a jaxlib
that does not know an option or one of its values rejects it with a Python error (checked once,
then no options), where an unknown flag in `XLA_FLAGS` aborts the process. A user's own
`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=...` wins over both.
"""

import functools
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax

# YNNPACK fusion types, by the lower-case names of XLA's LIBRARY_FUSION_TYPE_* values (also what
# XLA_FLAGS and `config.cpu_fusions` take).
CPU_FUSION_TYPES = ('dot', 'reduce', 'individual_dot', 'eltwise', 'individual_convolution')
# Products and reductions; not 'individual_convolution' (slow backward convolutions) nor
# 'eltwise', a per-model choice (`config.cpu_fusions`; see the module docstring).
DEFAULT_CPU_FUSIONS = ('dot', 'reduce', 'individual_dot')
_FLAG = 'xla_cpu_experimental_ynn_fusion_type'


def check_cpu_fusions(fusions: Sequence[str], key: str = 'config.cpu_fusions') -> tuple[str, ...]:
  """`fusions` (names, or comma-separated names) as a tuple of known YNNPACK fusion types, or a
  ValueError naming `key`."""
  if isinstance(fusions, str):
    fusions = (fusions,)
  # 'dot,eltwise' (a flag's value) and ('dot', 'eltwise') alike.
  fusions = tuple(f.strip() for item in fusions for f in item.split(',') if f.strip())
  unknown = [f for f in fusions if f not in CPU_FUSION_TYPES]
  if unknown:
    raise ValueError(f'{key}: unknown YNNPACK fusion type(s) {", ".join(map(repr, unknown))}; '
                     f'valid: {", ".join(CPU_FUSION_TYPES)} (any subset, () for none)')
  return tuple(fusions)


def cpu_options(fusions: Sequence[str] = DEFAULT_CPU_FUSIONS) -> dict[str, str]:
  """The per-program compiler options that give YNNPACK exactly `fusions` on XLA:CPU."""
  return {_FLAG: ','.join(f'LIBRARY_FUSION_TYPE_{f.upper()}' for f in check_cpu_fusions(
      fusions, 'cpu_fusions'))}


# What CPU programs get by default.
CPU_OPTIONS = cpu_options(DEFAULT_CPU_FUSIONS)


@functools.cache
def compiler_options(cpu_fusions: tuple[str, ...] = DEFAULT_CPU_FUSIONS) -> dict[str, str]:
  """The options for programs on the default backend: `cpu_options(cpu_fusions)` on the CPU
  where this jaxlib accepts them and XLA_FLAGS does not set them, else none. Starts the
  backend."""
  if jax.default_backend() != 'cpu':
    return {}
  if f'--{_FLAG}' in os.environ.get('XLA_FLAGS', ''):
    return {}
  options = cpu_options(cpu_fusions)
  try:
    jax.jit(lambda x: x + 1, compiler_options=options).lower(0.0).compile()
  except Exception as e:  # noqa: BLE001  (an option this jaxlib does not have: XLA's defaults)
    logging.info('XLA compiler options %s not accepted by this jaxlib (%s); using defaults',
                 options, e)
    return {}
  return options


class _Jit:
  """`jax.jit(fun, compiler_options=compiler_options(cpu_fusions), **kwargs)`, built on first
  use."""

  def __init__(self, fun: Callable, cpu_fusions: tuple[str, ...], kwargs: dict[str, Any]):
    self._fun, self._cpu_fusions, self._kwargs, self._jitted = fun, cpu_fusions, kwargs, None
    functools.update_wrapper(self, fun)

  def _get(self) -> Any:
    if self._jitted is None:
      self._jitted = jax.jit(self._fun, compiler_options=compiler_options(self._cpu_fusions),
                             **self._kwargs)
    return self._jitted

  def __call__(self, *args, **kwargs):
    return self._get()(*args, **kwargs)

  def __getattr__(self, name: str) -> Any:  # lower, trace, eval_shape, ...
    if name.startswith('__'):
      raise AttributeError(name)
    return getattr(self._get(), name)


def jit(fun: Callable | None = None, *, cpu_fusions: Sequence[str] = DEFAULT_CPU_FUSIONS,
        **kwargs: Any) -> Any:
  """`jax.jit` (same keyword arguments; usable as a decorator with or without them) compiled
  with `compiler_options(cpu_fusions)`. The options are looked up at the first call or
  `.lower`, not here, so that decorating at import time does not start the backend
  (`jax.distributed.initialize` and the device-count flags must come first)."""
  cpu_fusions = check_cpu_fusions(cpu_fusions, 'cpu_fusions')
  if fun is None:
    return functools.partial(jit, cpu_fusions=cpu_fusions, **kwargs)
  return _Jit(fun, cpu_fusions, kwargs)
