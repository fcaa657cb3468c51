"""All checkpoint IO: training states, inference variables and imported weights (orbax).

Under a training stage's folder (paths from cxr_jax/layout.py):
  checkpoints/<step>/   the last `keep` train states (state pytree + JSON host state)
  best/<step>/          the single best train state by the validation metric
Orbax writes each step to a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoints intact and a half-written one is never picked up.

Inference (`restore_variables`) reads only `params` and `batch_stats` of the best state: no
optimiser is built and its state is not read.

Imported weights (`save_imported` / `load_imported`, written by
`python -m cxr_jax.tools.import_weights`): variables (orbax) and a JSON description in one folder,
written to `<folder>.tmp` and renamed at the end.
"""

import json
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from cxr_jax import layout

Variables = dict[str, Any]


class Checkpoints:
  """The latest-N and best checkpoints of one training stage."""

  def __init__(self, directory: str | epath.Path, *, keep: int = 2):
    stage = layout.StageDir(epath.Path(directory).absolute())  # orbax wants absolute paths
    # Both managers may save the same step at once; across processes their async writes meet
    # at barriers named after the step, so each gets a prefix of its own (else the second one
    # finds "barrier _async_write_complete.<step> is already ongoing" and times out).
    self._latest = ocp.CheckpointManager(stage.checkpoints_dir, options=_options(keep, 'latest'))
    self._best = ocp.CheckpointManager(stage.best_dir, options=_options(1, 'best'))

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


def _options(keep: int, prefix: str) -> ocp.CheckpointManagerOptions:
  return ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True,
      multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=prefix))


def restore_variables(stage_dir: str | epath.PathLike, abstract_variables: Variables,
                      *, which: str = 'best') -> tuple[Variables, dict[str, Any]]:
  """The model variables of a stage's best (or latest) train state, as host numpy arrays.

  Args:
    stage_dir: a training stage's folder.
    abstract_variables: {'params': ..., 'batch_stats': ...} of shape/dtype structs (e.g.
      `jax.eval_shape` of the model's init); the checkpoint must hold exactly these leaves.
    which: 'best' or 'latest'.

  Returns:
    (variables, meta): numpy pytrees shaped like `abstract_variables`, and the JSON host state
    saved with them ({'best_value', 'best_step', ...}) plus 'step'.

  Only `params` and `batch_stats` are read: the optimiser state stays on disk.
  """
  stage = layout.StageDir(epath.Path(stage_dir).absolute())
  directory = stage.best_dir if which == 'best' else stage.checkpoints_dir
  if not directory.exists():
    raise FileNotFoundError(f'No {which} checkpoint under {stage.path}: its training stage has '
                            'not saved one yet.')
  target = {k: v for k, v in abstract_variables.items() if k in ('params', 'batch_stats') and v}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
  with ocp.CheckpointManager(directory) as manager:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f'No {which} checkpoint under {directory}.')
    try:
      out = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                       partial_restore=True),
          meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError) as e:
      raise ValueError(f'{directory / str(step)}: does not hold the variables of the model '
                       f'described by {stage.model_info_file}: {e}') from None
  variables = out['state']
  _check_shapes(target, variables, directory / str(step))
  return variables, {**out['meta'], 'step': int(step)}


def _check_shapes(want: Any, got: Any, where: epath.Path) -> None:
  shapes = lambda tree: {jax.tree_util.keystr(p): tuple(np.shape(x))  # noqa: E731
                         for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  a, b = shapes(want), shapes(got)
  if a != b:
    bad = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    raise ValueError(f'{where}: variables differ from the model: {bad[:8]} '
                     f'(model {[a.get(k) for k in bad[:8]]}, checkpoint '
                     f'{[b.get(k) for k in bad[:8]]}).')


# ------------------------------------------------------------------------------ imported weights
def save_imported(directory: str | epath.PathLike, variables: Variables, meta: dict[str, Any],
                  *, overwrite: bool = False) -> epath.Path:
  """Writes `variables` (orbax) and `meta` (JSON) to `directory`, atomically.

  Everything goes to `<directory>.tmp` first and is renamed at the end, so a crash never
  leaves a half-written `directory`. A non-empty `directory` is refused unless `overwrite`.
  """
  directory = epath.Path(directory).absolute()
  if directory.exists() and any(directory.iterdir()) and not overwrite:
    raise FileExistsError(f'{directory} exists and is not empty (pass --overwrite)')
  tmp = directory.parent / (directory.name + '.tmp')
  if tmp.exists():
    tmp.rmtree()
  tmp.mkdir(parents=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp / layout.IMPORT_VARIABLES, jax.tree.map(np.asarray, variables))
    ckptr.wait_until_finished()
  (tmp / layout.IMPORT_META).write_text(json.dumps(meta, indent=2) + '\n')
  if directory.exists():
    directory.rmtree()
  tmp.rename(directory)
  return directory


def read_imported_meta(directory: str | epath.PathLike) -> dict[str, Any]:
  """The JSON description of an imported-weights folder (model, config, head_paths, source)."""
  path = epath.Path(directory) / layout.IMPORT_META
  if not path.exists():
    raise FileNotFoundError(
        f'{directory}: no imported weights there ({layout.IMPORT_META} missing). Convert the '
        'file you downloaded with `python -m cxr_jax.tools.import_weights --source=torchvision '
        f'--arch=... --input=FILE --output={directory}` (WORKSPACE.md).')
  return layout.read_json(path, 'the description of imported weights')


def load_imported(directory: str | epath.PathLike) -> tuple[dict[str, Any], Variables]:
  """(description, variables as numpy) of a folder written by `save_imported`."""
  directory = epath.Path(directory).absolute()
  meta = read_imported_meta(directory)
  with ocp.StandardCheckpointer() as ckptr:
    variables = ckptr.restore(directory / layout.IMPORT_VARIABLES)
  return meta, jax.tree.map(np.asarray, variables)
