"""Out-of-distribution gate: does an input look like the chest X-rays a model was trained on?

Chester (Cohen et al. 2019) refuses to predict on images that are not chest X-rays; the viewer
warns before its findings. The gate combines two classic detectors, fitted on a run's training
split (stage `fit_ood`, cxr_jax/stages/ood.py) and thresholded on its validation split:

- reconstruction: the model input (channel mean) area-averaged to s x s thumbnails
  (config.ood.image_size, 32) and projected onto the principal components that keep
  `variance` of the training thumbnails' variance (a linear autoencoder, fitted in closed form);
  the score is the log of the mean squared residual (the Q or SPE statistic of PCA monitoring).
  Photos, text, blank and inverted images, CT or MR slices are not X-ray shaped: they reconstruct
  badly.
  Thumbnails are standardised first (zero mean, unit variance), so brightness and contrast do
  not become the first components (blank and inverted images would reconstruct well).
- features (optional, config.ood.features): the Mahalanobis distance (Lee et al. 2018) of the
  model's globally averaged last feature map to the training split's mean, with a Ledoit-Wolf
  shrunk covariance; the score is the log of the squared distance. Off by default: on real
  NIH samples it flagged 30-45% of X-rays from other sources or patient lists (the features
  shift with the population; benchmarks/ood_gate.py), for few extra detections.
- flat images: a thumbnail whose contrast is below a quarter of the lowest training contrast
  is always flagged (blank images carry nothing to reconstruct).

Each score is standardised into a robust z score (median and 1.4826 MAD) using *cross-fitted*
training scores (k folds: each image scored by the detectors fitted without it, so a perfectly
reconstructed training image does not shrink the scale), and the gate's score is the larger of
the z scores. The threshold is the (1 - false_alarm_rate) quantile of the validation split's
scores ('higher' interpolation), so at most that fraction of validation X-rays is flagged.
Everything here is numpy on arrays; cxr_jax/inference/ood.py wires it to a model.
"""

import dataclasses
from typing import Any

import numpy as np
from PIL import Image

COMPONENTS = ('reconstruction', 'features')
METHOD = 'PCA reconstruction error of standardised thumbnails (robust z)'
METHOD_FEATURES = ('max robust z of PCA reconstruction error and feature Mahalanobis '
                   'distance')
FLAT_FRACTION = 0.25
_EPS = 1e-12


def thumbnails(inputs: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
  """Model inputs [N, H, W, C] -> (their channel means area-averaged to [N, size * size], each
  standardised to zero mean and unit variance (a flat image gives zeros); their contrast [N],
  the standard deviation before standardising).

  Standardising takes global brightness and contrast out of the principal components: without
  it the first component is brightness, and blank or inverted images reconstruct well.
  """
  inputs = np.asarray(inputs, np.float32)
  if inputs.ndim != 4:
    raise ValueError(f'expected model inputs [N, H, W, C], got shape {inputs.shape}')
  grey = inputs.mean(axis=-1)
  out = np.empty((len(grey), size * size), np.float32)
  contrast = np.empty(len(grey), np.float64)
  for i, g in enumerate(grey):
    small = np.asarray(Image.fromarray(g, mode='F').resize((size, size), Image.Resampling.BOX),
                       np.float64).ravel()
    contrast[i] = small.std()
    out[i] = (small - small.mean()) / contrast[i] if contrast[i] > 1e-6 else 0.0
  return out, contrast


def pooled(features: np.ndarray) -> np.ndarray:
  """Feature maps [N, h, w, C] -> their global averages [N, C] (what the head pools)."""
  features = np.asarray(features, np.float32)
  return features.reshape(len(features), -1, features.shape[-1]).mean(axis=1)


@dataclasses.dataclass
class GateInputs:
  """What the gate looks at for N images: standardised thumbnails [N, D], their contrast [N],
  pooled features [N, C] (None: the gate does not use them)."""

  thumbs: np.ndarray
  contrast: np.ndarray
  features: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.thumbs)

  def subset(self, keep: np.ndarray) -> 'GateInputs':
    return GateInputs(self.thumbs[keep], self.contrast[keep],
                      None if self.features is None else self.features[keep])


@dataclasses.dataclass
class _Detectors:
  """The raw detectors fitted on one set of training images."""

  mean: np.ndarray                      # [D] thumbnail mean
  components: np.ndarray                # [k, D] orthonormal principal directions
  feature_mean: np.ndarray | None       # [C]
  feature_precision: np.ndarray | None  # [C, C]

  @classmethod
  def fit(cls, inputs: GateInputs, variance: float) -> '_Detectors':
    thumbs = np.asarray(inputs.thumbs, np.float64)
    mean = thumbs.mean(axis=0)
    _, s, vt = np.linalg.svd(thumbs - mean, full_matrices=False)
    energy = s ** 2
    k = 0
    if energy.sum() > _EPS:
      # Components up to `variance` of the energy, and never all of them: with n images the
      # last direction would reconstruct every training image exactly.
      k = int(np.searchsorted(np.cumsum(energy) / energy.sum(), variance) + 1)
      k = max(0, min(k, len(thumbs) - 2, vt.shape[0]))
    feature_mean = feature_precision = None
    if inputs.features is not None:
      from sklearn.covariance import LedoitWolf
      lw = LedoitWolf().fit(np.asarray(inputs.features, np.float64))
      feature_mean, feature_precision = lw.location_, lw.precision_
    return cls(mean, vt[:k], feature_mean, feature_precision)

  def raw(self, inputs: GateInputs) -> np.ndarray:
    """Log scores [N, 2] (reconstruction, features); features NaN without a feature part."""
    centred = np.asarray(inputs.thumbs, np.float64) - self.mean
    residual = centred - (centred @ self.components.T) @ self.components
    recon = np.log(np.mean(residual ** 2, axis=1) + _EPS)
    if self.feature_mean is None or inputs.features is None:
      maha = np.full(len(recon), np.nan)
    else:
      d = np.asarray(inputs.features, np.float64) - self.feature_mean
      maha = np.log(np.einsum('nc,cd,nd->n', d, self.feature_precision, d) + _EPS)
    return np.stack([recon, maha], axis=1)


@dataclasses.dataclass
class OODGate:
  """A fitted gate; `score` > `threshold` means "does not look like the training X-rays".

  Attributes:
    detectors: PCA (and Mahalanobis) parts fitted on the whole training sample.
    center, scale: [2] robust standardisation of the two log scores (cross-fitted training).
    threshold: on the gate's score (the larger z).
    contrast_floor: flatter thumbnails are flagged whatever their score.
    image_size: thumbnail side s.
    false_alarm_rate: the target rate the threshold was set for on validation.
  """

  detectors: _Detectors
  center: np.ndarray
  scale: np.ndarray
  threshold: float
  contrast_floor: float
  image_size: int
  false_alarm_rate: float

  @property
  def uses_features(self) -> bool:
    return self.detectors.feature_mean is not None

  def z_scores(self, inputs: GateInputs) -> np.ndarray:
    """Robust z scores [N, 2] of (reconstruction, features); NaN for an unused part."""
    return (self.detectors.raw(inputs) - self.center) / self.scale

  def score(self, inputs: GateInputs) -> np.ndarray:
    """The gate's score [N]: the larger z score; +inf for a flat image."""
    score = np.nanmax(self.z_scores(inputs), axis=1)
    return np.where(np.asarray(inputs.contrast) < self.contrast_floor, np.inf, score)

  def flagged(self, inputs: GateInputs) -> np.ndarray:
    """[N] bool: out of distribution."""
    return self.score(inputs) > self.threshold

  # ---------------------------------------------------------------------------- storage
  def to_arrays(self) -> dict[str, np.ndarray]:
    d = self.detectors
    arrays = {'mean': d.mean, 'components': d.components, 'center': self.center,
              'scale': self.scale, 'threshold': np.float64(self.threshold),
              'contrast_floor': np.float64(self.contrast_floor),
              'image_size': np.int64(self.image_size),
              'false_alarm_rate': np.float64(self.false_alarm_rate)}
    if d.feature_mean is not None:
      arrays.update(feature_mean=d.feature_mean, feature_precision=d.feature_precision)
    return arrays

  @classmethod
  def from_arrays(cls, arrays: dict[str, Any]) -> 'OODGate':
    missing = {'mean', 'components', 'center', 'scale', 'threshold', 'contrast_floor',
               'image_size', 'false_alarm_rate'} - set(arrays)
    if missing:
      raise ValueError(f'OOD gate arrays lack {sorted(missing)}')
    detectors = _Detectors(np.asarray(arrays['mean']), np.asarray(arrays['components']),
                           arrays.get('feature_mean'), arrays.get('feature_precision'))
    return cls(detectors, np.asarray(arrays['center']), np.asarray(arrays['scale']),
               float(arrays['threshold']), float(arrays['contrast_floor']),
               int(arrays['image_size']), float(arrays['false_alarm_rate']))


def _robust(values: np.ndarray) -> tuple[float, float]:
  """(median, 1.4826 MAD) of finite values; the standard deviation, then 1, when MAD is 0."""
  values = values[np.isfinite(values)]
  if not len(values):
    return 0.0, 1.0
  center = float(np.median(values))
  scale = 1.4826 * float(np.median(np.abs(values - center)))
  if scale <= _EPS:
    scale = float(np.std(values))
  return center, scale if scale > _EPS else 1.0


def fit(train: GateInputs, validation: GateInputs, *, image_size: int, variance: float = 0.95,
        false_alarm_rate: float = 0.05, folds: int = 5, seed: int = 0
        ) -> tuple[OODGate, dict[str, Any]]:
  """Fits the gate (module doc) on training inputs and thresholds it on validation inputs;
  features are used when `train.features` is given. Returns the gate and a summary (counts,
  components kept, validation false-alarm rate)."""
  n = len(train)
  if n < 4:
    raise ValueError(f'the OOD gate needs at least 4 training images, got {n}')
  if not len(validation):
    raise ValueError('the OOD gate needs validation images to set its threshold')
  if not 0.0 < false_alarm_rate < 1.0:
    raise ValueError(f'false_alarm_rate={false_alarm_rate!r}: expected a rate in (0, 1)')
  if not 0.0 < variance <= 1.0:
    raise ValueError(f'variance={variance!r}: expected a fraction in (0, 1]')
  folds = max(2, min(int(folds), n // 2))
  fold_of = np.random.default_rng(seed).permutation(n) % folds
  cross = np.empty((n, 2))
  for f in range(folds):
    held = fold_of == f
    cross[held] = _Detectors.fit(train.subset(~held), variance).raw(train.subset(held))
  center, scale = zip(*(_robust(cross[:, j]) for j in range(2)), strict=True)
  detectors = _Detectors.fit(train, variance)
  floor = FLAT_FRACTION * float(np.min(train.contrast))
  gate = OODGate(detectors, np.asarray(center), np.asarray(scale), 0.0, floor, int(image_size),
                 float(false_alarm_rate))
  if train.features is not None and validation.features is None:
    raise ValueError('the gate uses features: give the validation features too')
  val_scores = gate.score(validation)
  finite = val_scores[np.isfinite(val_scores)]
  gate.threshold = float(np.quantile(finite if len(finite) else [0.0], 1.0 - false_alarm_rate,
                                     method='higher'))
  summary = {
      'method': METHOD_FEATURES if gate.uses_features else METHOD,
      'components': list(COMPONENTS if gate.uses_features else COMPONENTS[:1]),
      'image_size': int(image_size), 'pca_components': int(len(detectors.components)),
      'variance': float(variance), 'uses_features': gate.uses_features,
      'contrast_floor': floor, 'num_train': int(n), 'folds': folds,
      'num_validation': int(len(validation)), 'threshold': gate.threshold,
      'false_alarm_rate_target': float(false_alarm_rate),
      'false_alarm_rate_validation': float(np.mean(val_scores > gate.threshold))}
  return gate, summary
