"""All checkpoint IO: orbax managers for the latest N steps and for the best step.

Layout under a stage directory:
  checkpoints/<step>/   the last `keep` checkpoints (train state + JSON host state)
  best/<step>/          the single best checkpoint by the validation metric
Orbax writes each step to a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoints intact.
"""

from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath


class Checkpoints:
  """The latest-N and best checkpoints of one training stage."""

  def __init__(self, directory: str | epath.Path, *, keep: int = 2):
    directory = epath.Path(directory).absolute()  # orbax insists on absolute paths
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    self._latest = ocp.CheckpointManager(directory / 'checkpoints', options=options)
    self._best = ocp.CheckpointManager(
        directory / 'best', options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))

  def latest_step(self) -> int | None:
    return self._latest.latest_step()

  def best_step(self) -> int | None:
    return self._best.latest_step()

  def save(self, step: int, state: Any, meta: dict[str, Any], *, best: bool = False) -> None:
    """Saves `state` (a pytree) and `meta` (JSON) as `step`; also as the best if `best`."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    self._latest.save(step, args=args, force=True)
    if best:
      self._best.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def _restore(self, manager: ocp.CheckpointManager, step: int, target: Any):
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    out = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return out['state'], out['meta']

  def restore_latest(self, target: Any) -> tuple[Any, dict[str, Any]]:
    """(state, meta) of the latest step, shaped and sharded like `target`."""
    return self._restore(self._latest, self._latest.latest_step(), target)

  def restore_best(self, target: Any) -> tuple[Any, dict[str, Any]]:
    step = self._best.latest_step()
    if step is None:
      raise FileNotFoundError(f'No best checkpoint under {self._best.directory}.')
    return self._restore(self._best, step, target)

  def wait(self) -> None:
    self._latest.wait_until_finished()
    self._best.wait_until_finished()

  def close(self) -> None:
    self._latest.close()
    self._best.close()
