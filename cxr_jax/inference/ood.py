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


def gate_inputs(predictor: Predictor, images: Iterable[np.ndarray], batch_size: int = 64
                ) -> tuple[np.ndarray, np.ndarray | None]:
  """Thumbnails [N, s * s] and pooled features [N, C] (None without a feature map) of
  preprocessed images [H, W, C], `batch_size` per forward pass (the last one padded)."""
  size = int(ood_settings(predictor)['image_size'])
  thumbs, feats, chunk = [], [], []

  def flush():
    n = len(chunk)
    x = np.stack(chunk + [np.zeros_like(chunk[0])] * (batch_size - n))
    thumbs.append(ood.thumbnails(x[:n], size))
    f = _pooled_features(predictor, predictor.forward(x)[1])
    feats.append(None if f is None else f[:n])
    chunk.clear()

  for x in images:
    chunk.append(np.asarray(x, np.float32))
    if len(chunk) == batch_size:
      flush()
  if chunk:
    flush()
  if not thumbs:
    return np.zeros((0, size * size), np.float32), None
  features = None if any(f is None for f in feats) else np.concatenate(feats)
  return np.concatenate(thumbs), features


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
  train = gate_inputs(predictor, training_images(predictor, limit), batch)
  val_split = predictor.config.data.eval_splits.get('validation')
  if not val_split:
    raise RunError('config.data.eval_splits has no validation split to set the OOD threshold '
                   'on.')
  val = gate_inputs(predictor, training_images(predictor, limit, val_split), batch)
  gate, summary = ood.fit(*train, *val, image_size=int(cfg['image_size']),
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
  thumbs = ood.thumbnails(np.asarray(x, np.float32)[None], gate.image_size)
  features = _pooled_features(predictor, inter) if gate.uses_features else None
  z = gate.z_scores(thumbs, features)[0]
  score = float(np.nanmax(z))
  return {'score': score, 'threshold': gate.threshold, 'flagged': bool(score > gate.threshold),
          'false_alarm_rate': gate.false_alarm_rate,
          'z': {c: (None if np.isnan(v) else float(v))
                for c, v in zip(ood.COMPONENTS, z, strict=True)}}

