"""Analytic FLOP counts: the multiply-adds of a function's convolutions and matrix products.

Counted from the operand shapes of a traced program (`jax.make_jaxpr`), not from XLA's cost
analysis of the compiled one: the count is the model's arithmetic, the same on every backend and
for every lowering, so that achieved FLOP/s can be compared across devices, dtypes and
frameworks. The convention is the one of torchvision's model table and of
`torch.utils.flop_counter.FlopCounterMode`: 2 FLOPs per multiply-add of a convolution or a
matrix product, everything else (element-wise ops, normalisation, pooling, softmax) not counted.

A training step is counted as 3x its forward pass (the forward, the input gradient and the
weight gradient each cost one forward's products; the usual "model FLOPs" convention, which
ignores that the first layer needs no input gradient and that frozen layers need no weight
gradient).

Count a model built with `conv_impl='xla'` and `depthwise_impl='xla'`: the CPU rewrites
('shifts' depthwise convolutions, 'patches' gradients) compute the same products as
element-wise ops, which this counter does not see. ('matmul' 1x1 convolutions are matrix
products and count the same.)
"""

from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np


def conv_flops(rhs_shape: tuple[int, ...], out_shape: tuple[int, ...], dimension_numbers: Any,
               lhs_dilation: tuple[int, ...] = ()) -> int:
  """FLOPs of one `lax.conv_general_dilated`: 2 x output elements x the taps each sums.

  Every output element sums `I x prod(kernel window)` products, where I is the kernel's input
  feature dimension (already divided by `feature_group_count`). A transposed convolution
  (`lhs_dilation` > 1) is counted without the inserted zeros, i.e. divided by the dilation's
  product, as torch counts `conv_transpose` (exact up to the border).
  """
  rhs_spec = dimension_numbers.rhs_spec  # (O, I, *spatial)
  taps = int(np.prod([rhs_shape[d] for d in rhs_spec[1:]]))
  dilation = int(np.prod(lhs_dilation)) if lhs_dilation else 1
  return 2 * int(np.prod(out_shape)) * taps // dilation


def dot_flops(lhs_shape: tuple[int, ...], rhs_shape: tuple[int, ...],
              dimension_numbers: Any) -> int:
  """FLOPs of one `lax.dot_general`: 2 x lhs elements x rhs's free (non-contracting, non-batch)
  elements."""
  (_, rhs_contract), (_, rhs_batch) = dimension_numbers
  rhs_free = [rhs_shape[d] for d in range(len(rhs_shape))
              if d not in rhs_contract and d not in rhs_batch]
  return 2 * int(np.prod(lhs_shape)) * int(np.prod(rhs_free))


def _sub_jaxprs(params: dict[str, Any]) -> Iterable[Any]:
  for value in params.values():
    for v in (value if isinstance(value, (tuple, list)) else (value,)):
      if hasattr(v, 'eqns'):
        yield v
      elif hasattr(v, 'jaxpr') and hasattr(v.jaxpr, 'eqns'):
        yield v.jaxpr


def jaxpr_flops(jaxpr: Any) -> int:
  """FLOPs of a (closed) jaxpr's convolutions and matrix products, sub-programs included.

  Sub-programs run a known number of times: scan's body `length` times, one branch of a cond
  (the dearest is counted), every other call-like primitive (jit, remat, custom_jvp/vjp,
  shard_map, ...) once. A while loop's trip count is not known from shapes, so one with
  products is refused rather than guessed.
  """
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    shapes = [tuple(v.aval.shape) for v in eqn.invars]
    if name == 'conv_general_dilated':
      total += conv_flops(shapes[1], tuple(eqn.outvars[0].aval.shape),
                          eqn.params['dimension_numbers'], eqn.params['lhs_dilation'])
    elif name == 'dot_general':
      total += dot_flops(shapes[0], shapes[1], eqn.params['dimension_numbers'])
    elif name == 'while':
      if any(jaxpr_flops(j) for j in _sub_jaxprs(eqn.params)):
        raise ValueError('count_flops: a while loop contains convolutions or matrix products; '
                         'its trip count is unknown from shapes (use lax.scan or a fixed loop)')
    elif name == 'cond':
      total += max((jaxpr_flops(j) for j in _sub_jaxprs(eqn.params)), default=0)
    else:
      sub = sum(jaxpr_flops(j) for j in _sub_jaxprs(eqn.params))
      total += sub * (eqn.params['length'] if name == 'scan' else 1)
  return total


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
  """Forward FLOPs of `fn(*args, **kwargs)` (arrays or `jax.ShapeDtypeStruct`s; traced only,
  nothing is computed)."""
  return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs))


def train_flops(forward_flops: int) -> int:
  """The training step's FLOPs for a forward pass of `forward_flops` (3x, see the module doc)."""
  return 3 * forward_flops
