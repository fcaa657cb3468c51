"""Device mesh and host<->device transfer for data parallelism over a 1-D `data` axis.

The product card's "pmap'd train step" is written as `jax.jit` of a `jax.shard_map` over the
`data` axis of this mesh (pmap is in maintenance mode and runs on shard_map itself): every
device holds a full replica of the parameters and its slice of the global batch.
"""

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = 'data'


def match_varying(a: jax.Array, like: jax.Array) -> jax.Array:
  """`a` marked varying over the mesh axes `like` varies over (inside `shard_map`; a no-op
  outside), as autodiff marks a replicated parameter that meets per-device data. A
  `jax.custom_vjp` taking a parameter needs this: its per-device gradient must have the type of
  its input, and the transpose of this cast sums that gradient over the axes, as autodiff does."""
  def vma(x: jax.Array) -> frozenset:
    aval = jax.typeof(x)
    if hasattr(aval, 'vma'):  # JAX 0.11+
      return frozenset(aval.vma)
    manual = getattr(aval, 'manual_axis_type', None)  # JAX 0.10
    return frozenset(manual.varying) if manual is not None else frozenset()

  missing = tuple(sorted(vma(like) - vma(a)))
  if not missing:
    return a
  if hasattr(jax.lax, 'pcast'):
    return jax.lax.pcast(a, missing, to='varying')
  return jax.lax.pvary(a, missing)  # JAX versions before pcast


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh over all (or the first `num_devices`) devices of all processes."""
  devices = jax.devices()
  if num_devices is not None:
    if not 1 <= num_devices <= len(devices):
      raise ValueError(f'num_devices={num_devices}, but {len(devices)} device(s) are available.')
    devices = devices[:num_devices]
  return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: jax.sharding.Mesh) -> None:
  """Raises a ValueError naming config.batch_size unless it splits evenly over devices."""
  n = mesh.devices.size
  if global_batch_size % n:
    raise ValueError(
        f'config.batch_size={global_batch_size} is not divisible by the number of devices ({n}); '
        f'use a multiple of {n}, e.g. --config.batch_size={max(n, global_batch_size // n * n)}.')


def to_global(local_batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """This process's numpy batch -> global arrays sharded over `data` (numeric keys only)."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local_batch.items() if np.asarray(v).dtype.kind in 'biuf'}


def to_host(tree: Any) -> Any:
  """Global arrays -> full numpy arrays on every host (an all-gather when multi-process)."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def encode_strings(strings: np.ndarray, width: int = 64) -> np.ndarray:
  """Strings/bytes [B] -> uint8 [B, width], so ids can travel with the batch between hosts."""
  out = np.zeros((len(strings), width), np.uint8)
  for i, s in enumerate(strings):
    b = s if isinstance(s, bytes) else str(s).encode()
    out[i, :min(len(b), width)] = np.frombuffer(b[:width], np.uint8)
  return out


def decode_strings(codes: np.ndarray) -> list[str]:
  return [bytes(row).rstrip(b'\0').decode() for row in np.asarray(codes, np.uint8)]
