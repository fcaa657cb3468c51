"""The out-of-distribution gate of a trained stage: fitted on the run's data, applied to an image.

The detectors are in cxr_jax/ood.py; this module feeds them a `Predictor`'s inputs and pooled
feature maps, the same way for the `fit_ood` stage (training and validation splits) and for the
viewer (one uploaded image), and reads the gate back from the run (cxr_jax/layout.py).
"""

from collections.abc import Iterable
from typing import Any

import numpy as np

from cxr_jax import layout, ood
from cxr_jax.inference.explanations import training_images
from cxr_jax.inference.predictor import Intermediates, Predictor
from cxr_jax.inference.run import RunError


def _pooled_features(predictor: Predictor, inter: Intermediates) -> np.ndarray | None:
  try:
    return ood.pooled(predictor.feature_maps(inter))
  except ValueError:  # the model sows no feature map: the gate uses the images alone
    return None


def gate_inputs(predictor: Predictor, images: Iterable[np.ndarray], *, features: bool,
                batch_size: int = 64) -> ood.GateInputs:
  """What the gate looks at for preprocessed images [H, W, C] (cxr_jax.ood.GateInputs); the
  model runs only when `features`, `batch_size` images per pass (the last one padded)."""
  size = int(ood_settings(predictor)['image_size'])
  thumbs, contrast, feats, chunk = [], [], [], []

  def flush():
    n = len(chunk)
    x = np.stack(chunk + [np.zeros_like(chunk[0])] * (batch_size - n))
    t, c = ood.thumbnails(x[:n], size)
    thumbs.append(t)
    contrast.append(c)
    if features:
      f = _pooled_features(predictor, predictor.forward(x)[1])
      if f is None:
        raise RunError(f'config.ood.features: the model of stage {predictor.stage!r} sows no '
                       'feature map; set it to False.')
      feats.append(f[:n])
    chunk.clear()

  for x in images:
    chunk.append(np.asarray(x, np.float32))
    if len(chunk) == batch_size:
      flush()
  if chunk:
    flush()
  if not thumbs:
    return ood.GateInputs(np.zeros((0, size * size), np.float32), np.zeros(0))
  return ood.GateInputs(np.concatenate(thumbs), np.concatenate(contrast),
                        np.concatenate(feats) if features else None)


def ood_settings(predictor: Predictor) -> dict[str, Any]:
  """The run's config.ood, with the defaults of cxr_jax.config_lib for a run without one."""
  from cxr_jax.config_lib import base_config
  settings = base_config().ood.to_dict()
  settings.update(predictor.config_section('ood'))
  return settings


def fit_gate(predictor: Predictor) -> tuple[ood.OODGate, dict[str, Any]]:
  """Fits the gate on the run's training split, thresholded on its validation split."""
  cfg = ood_settings(predictor)
  limit, batch = int(cfg['max_images']), int(cfg['batch_size'])
  use = bool(cfg['features'])
  train = gate_inputs(predictor, training_images(predictor, limit), features=use,
                      batch_size=batch)
  val_split = predictor.config.data.eval_splits.get('validation')
  if not val_split:
    raise RunError('config.data.eval_splits has no validation split to set the OOD threshold '
                   'on.')
  val = gate_inputs(predictor, training_images(predictor, limit, val_split), features=use,
                    batch_size=batch)
  gate, summary = ood.fit(train, val, image_size=int(cfg['image_size']),
                          variance=float(cfg['variance']),
                          false_alarm_rate=float(cfg['false_alarm_rate']),
                          folds=int(cfg['folds']), seed=int(predictor.config.seed))
  summary.update(stage=predictor.stage, train_split=predictor.config.data.train_split,
                 validation_split=val_split)
  return gate, summary


def load_gate(predictor: Predictor) -> tuple[ood.OODGate, dict[str, Any]] | None:
  """The gate the fit_ood stage stored for the predictor's stage, or None."""
  found = layout.Run(predictor.workdir).read_ood_gate(predictor.stage)
  if found is None:
    return None
  arrays, summary = found
  return ood.OODGate.from_arrays(arrays), summary


def score_image(gate: ood.OODGate, predictor: Predictor, x: np.ndarray,
                inter: Intermediates) -> dict[str, Any]:
  """The gate on one preprocessed image x [H, W, C] whose forward pass gave `inter`:
  {'score', 'threshold', 'flagged', 'z': {component: z score}}."""
  thumbs, contrast = ood.thumbnails(np.asarray(x, np.float32)[None], gate.image_size)
  features = _pooled_features(predictor, inter) if gate.uses_features else None
  inputs = ood.GateInputs(thumbs, contrast, features)
  z = gate.z_scores(inputs)[0]
  score = float(gate.score(inputs)[0])
  # A flat image scores +inf; JSON has no infinity, so it is reported as a large number.
  score = min(score, 1e9)
  return {'score': score, 'threshold': gate.threshold, 'flagged': bool(score > gate.threshold),
          'false_alarm_rate': gate.false_alarm_rate,
          'z': {c: (None if np.isnan(v) else float(v))
                for c, v in zip(ood.COMPONENTS, z, strict=True)}}

