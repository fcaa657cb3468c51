"""Reading a finished (or running) run back: its config, its models, their variables.

A run is a workdir of `python -m cxr_jax.main` (file layout: cxr_jax/layout.py). Everything
here reads; nothing builds an optimiser or touches the training loop.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from cxr_jax import checkpoints, layout
from cxr_jax.metrics import check_thresholds
from cxr_jax.models import build_model


class RunError(ValueError):
  """A run, stage or option that does not exist or does not fit the model (a usage error)."""


def read_config(workdir: str | epath.PathLike, *, validate: bool = True
                ) -> ml_collections.ConfigDict:
  """The config a run was started with, as a ConfigDict, validated.

  Raises RunError naming the saved config when it is missing, malformed or no longer valid.
  """
  run = layout.Run(workdir)
  try:
    raw = run.read_config_json()
  except (FileNotFoundError, ValueError) as e:
    raise RunError(str(e)) from None
  config = ml_collections.ConfigDict(raw)
  if validate:
    from cxr_jax import config_lib
    try:
      config_lib.validate(config)
    except ValueError as e:
      raise RunError(f'{run.config_file}: {e}') from None
  return config


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """What a training stage's model description says: enough to rebuild and feed the model.

  Attributes:
    image_shape: (H, W, C) of the model input.
    class_names: the K outputs, in order.
    model: config.model as a dict (name + constructor arguments).
    dtype: compute dtype name.
    threshold: config.threshold (a probability, or 'per_class').
    threshold_rule: how per-class thresholds are chosen on validation ('max_f1', 'youden').
    pp_eval: the preprocessing string of evaluation.
    data: the data set name the model was trained on.
    num_train_examples: examples in one pass over its training split (None if unknown), e.g.
      PDA's Laplace correction N.
    inputs: the model's inputs besides the image, {name: per-example shape} (e.g. masks).
    output: how logits become probabilities: 'sigmoid' (multi-label; runs written before this
      field) or 'softmax' (single-label softmax models, `losses.output_activation`).
    task: 'classification' (outputs: class logits [K]) or 'segmentation' (per-pixel logits
      [H, W, K]; class_names are then the structures, paper 004's U-Net).
  """

  image_shape: tuple[int, int, int]
  class_names: tuple[str, ...]
  model: dict[str, Any]
  dtype: str = 'float32'
  threshold: float | str = 0.5
  threshold_rule: str = 'max_f1'
  pp_eval: str = ''
  data: str = ''
  num_train_examples: int | None = None
  inputs: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
  output: str = 'sigmoid'
  task: str = 'classification'

  @classmethod
  def from_json(cls, raw: dict[str, Any]) -> 'ModelInfo':
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in raw.items() if k in fields}
    kwargs['image_shape'] = tuple(int(d) for d in raw['image_shape'])
    kwargs['class_names'] = tuple(raw['class_names'])
    kwargs['inputs'] = {k: tuple(int(d) for d in v) for k, v in raw.get('inputs', {}).items()}
    return cls(**kwargs)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @property
  def model_name(self) -> str:
    return str(self.model.get('name'))


def read_model_info(stage_dir: str | epath.PathLike) -> ModelInfo:
  """The ModelInfo of a training stage (its model description, cxr_jax/layout.py)."""
  stage = layout.StageDir(stage_dir)
  try:
    return ModelInfo.from_json(stage.read_model_info())
  except FileNotFoundError as e:
    raise RunError(str(e)) from None
  except (KeyError, TypeError) as e:
    raise RunError(f'{stage.model_info_file}: not a model description ({e}).') from None


def build(info: ModelInfo) -> nn.Module:
  """The flax module described by `info` (eval use: no BatchNorm axis)."""
  return build_model(ml_collections.ConfigDict(info.model), num_classes=len(info.class_names),
                     dtype=info.dtype)


def abstract_variables(model: nn.Module, image_shape: Sequence[int],
                       inputs: dict[str, Sequence[int]] | None = None) -> dict[str, Any]:
  """Shape/dtype structs of `model`'s variables for inputs [1, *image_shape] (and the extra
  `inputs` {name: per-example shape}); nothing runs."""
  def init(key):
    extra = {k: jnp.zeros((1, *shape)) for k, shape in (inputs or {}).items()}
    return model.init({'params': key, 'dropout': key}, jnp.zeros((1, *image_shape)),
                      train=False, **extra)
  return jax.eval_shape(init, jax.random.key(0))


def restore_model(stage_dir: str | epath.PathLike, *, which: str = 'best'
                  ) -> tuple[nn.Module, dict[str, Any], ModelInfo]:
  """(model, variables as host numpy arrays, info) of a training stage's best checkpoint.

  Params-only: no optimiser is built and its state is not read. Works from the model
  description alone, without the config or the data that trained the model.
  """
  info = read_model_info(stage_dir)
  model = build(info)
  try:
    variables, _ = checkpoints.restore_variables(
        stage_dir, abstract_variables(model, info.image_shape, info.inputs), which=which)
  except FileNotFoundError as e:
    raise RunError(str(e)) from None
  return model, variables, info


def default_stage(workdir: str | epath.PathLike) -> str:
  """The last training stage with a model in the run (layout.TRAIN_STAGES order)."""
  run = layout.Run(workdir)
  present = run.trained_stages()
  if not present:
    raise RunError(f'{run.root}: no trained model found (none of '
                   f'{", ".join(layout.TRAIN_STAGES)} has a trained model); train one with '
                   '`python -m cxr_jax.main` or pass --stage.')
  return present[0]


def check_stage(workdir: str | epath.PathLike, stage: str) -> None:
  """RunError unless `stage` of the run has a trained model."""
  run = layout.Run(workdir)
  if not run.stage(stage).has_model():
    present = run.trained_stages()
    raise RunError(f'{run.stage(stage).model_info_file}: not found; stages with a trained '
                   f'model here: {present or "none"}.')


@dataclasses.dataclass(frozen=True)
class OperatingPoint:
  """The decision thresholds of a model [K] and where they come from."""

  thresholds: np.ndarray
  source: str  # 'scalar' | 'per_class (<rule> on <split>)' | 'default 0.5 (...)'


def operating_point(workdir: str | epath.PathLike, stage: str, info: ModelInfo
                    ) -> OperatingPoint:
  """The thresholds `predict`, the viewer and the localisation stage apply.

  Per-class thresholds chosen on the validation split by the evaluate stage when the run has
  them (`layout.Run.read_thresholds`); else the config's scalar threshold; a
  'per_class' run whose evaluate stage has not run yet falls back to 0.5, and says so.
  """
  k = len(info.class_names)
  saved = layout.Run(workdir).read_thresholds(stage)
  if saved is not None:
    values = [saved['thresholds'][c] for c in info.class_names]
    return OperatingPoint(check_thresholds(np.asarray(values, np.float64), k),
                          f'per_class ({saved["rule"]} on {saved["split"]})')
  if isinstance(info.threshold, str):
    return OperatingPoint(np.full((k,), 0.5),
                          'default 0.5 (per-class thresholds not chosen yet: run the evaluate '
                          'stage)')
  return OperatingPoint(check_thresholds(np.asarray(info.threshold, np.float64), k), 'scalar')
