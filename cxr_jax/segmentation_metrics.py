"""Segmentation scores of lung and heart masks (paper 004): Dice and Jaccard per image.

Structures are named by the mask channels of the data (`config.data.structures`; the common
cxr_jax layout is ('left_lung', 'right_lung', 'heart'), patient's sides). Two unions are scored
besides the channels when their parts are present:
  'lungs'  = left lung OR right lung (both lungs together, what SCR and InvertedNet report);
  'global' = every structure OR'ed: paper 004's binarised global mask M_g ("pixels are 1 for
             the lung and heart regions and 0 for other regions").

Scores are computed per image on binary masks (probability >= threshold) and then summarised
over images (mean, sample standard deviation, median, minimum): a structure absent from both
the prediction and the truth of an image scores 1 (nothing to find, nothing found).
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# The mask channels of every cxr_jax data set with masks (cxr_phantom, jsrt_scr, cxr_samples).
STRUCTURES: tuple[str, ...] = ('left_lung', 'right_lung', 'heart')
LUNGS = 'lungs'
GLOBAL = 'global'
# Structure names a config may use; the unions above are derived, never channels.
KNOWN_STRUCTURES = ('left_lung', 'right_lung', 'heart', 'lungs', 'left_clavicle',
                    'right_clavicle')


def check_structures(names: Sequence[str]) -> tuple[str, ...]:
  """Validates config.data.structures: unique names of KNOWN_STRUCTURES; ValueError otherwise."""
  names = tuple(str(n) for n in names)
  if not names:
    raise ValueError('expected at least one structure name, e.g. '
                     f'{list(STRUCTURES)}')
  unknown = [n for n in names if n not in KNOWN_STRUCTURES]
  if unknown or len(set(names)) != len(names):
    raise ValueError(f'{list(names)}: expected unique names out of {list(KNOWN_STRUCTURES)} '
                     '(one per mask channel, in channel order).')
  return names


def scored_structures(names: Sequence[str]) -> tuple[str, ...]:
  """The channels, then 'lungs' (if both lungs are channels) and 'global' (if > 1 channel)."""
  out = list(names)
  if 'left_lung' in names and 'right_lung' in names and LUNGS not in names:
    out.append(LUNGS)
  if len(names) > 1:
    out.append(GLOBAL)
  return tuple(out)


def with_unions(masks: np.ndarray, names: Sequence[str]) -> np.ndarray:
  """Boolean masks [..., K] -> [..., K'] with the unions of `scored_structures` appended."""
  masks = np.asarray(masks, bool)
  extra = []
  scored = scored_structures(names)
  if LUNGS in scored and LUNGS not in names:
    extra.append(masks[..., names.index('left_lung')] | masks[..., names.index('right_lung')])
  if GLOBAL in scored:
    extra.append(global_mask(masks))
  return np.concatenate([masks, np.stack(extra, -1)], -1) if extra else masks


def global_mask(masks: np.ndarray, threshold: float = 0.5) -> np.ndarray:
  """Paper 004's M_g: [..., K] masks or probabilities -> [...] bool, 1 where any structure is
  (>= threshold), i.e. the binarised pixel-wise sum of the structures' masks."""
  return np.any(np.asarray(masks) >= threshold, axis=-1)


def dice_jaccard(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per image and structure: boolean [N, H, W, K] x2 -> (Dice [N, K], Jaccard [N, K]).

  Dice = 2 |P n T| / (|P| + |T|), Jaccard = |P n T| / |P u T|; 1 where both are empty.
  """
  pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
  if pred.shape != truth.shape or pred.ndim != 4:
    raise ValueError(f'prediction {pred.shape} and truth {truth.shape} must both be '
                     '[N, H, W, K].')
  inter = np.sum(pred & truth, axis=(1, 2), dtype=np.int64)
  p, t = np.sum(pred, axis=(1, 2), dtype=np.int64), np.sum(truth, axis=(1, 2), dtype=np.int64)
  union = p + t - inter
  empty = (p + t) == 0
  dice = np.where(empty, 1.0, 2.0 * inter / np.maximum(p + t, 1))
  jaccard = np.where(empty, 1.0, inter / np.maximum(union, 1))
  return dice.astype(np.float64), jaccard.astype(np.float64)


def soft_dice_loss(probs: np.ndarray, truth: np.ndarray, smooth: float = 1.0) -> np.ndarray:
  """Per image: 1 - mean over structures of the soft Dice (losses.soft_dice on probabilities):
  [N, H, W, K] x2 -> [N]; the validation value the best checkpoint is chosen by."""
  probs, truth = np.asarray(probs, np.float64), np.asarray(truth, np.float64)
  inter = np.sum(probs * truth, axis=(1, 2))
  total = np.sum(probs, axis=(1, 2)) + np.sum(truth, axis=(1, 2))
  return 1.0 - np.mean((2.0 * inter + smooth) / (total + smooth), axis=-1)


def _stats(values: np.ndarray) -> dict[str, float]:
  values = np.asarray(values, np.float64)
  return {'mean': float(values.mean()), 'sd': float(values.std(ddof=1)) if len(values) > 1
          else 0.0, 'median': float(np.median(values)), 'min': float(values.min())}


def summarize(dice: np.ndarray, jaccard: np.ndarray, dice_loss: np.ndarray,
              names: Sequence[str], threshold: float) -> dict[str, Any]:
  """Per-image scores -> the metrics dict of a segmentation evaluation.

  Args:
    dice, jaccard: [N, K'] per image, over `scored_structures(names)`.
    dice_loss: [N] soft Dice loss per image (over the K channels).
    names: the K channel names.
    threshold: the binarisation threshold used.

  Returns:
    {'num_examples', 'structures' (K' scored names), 'channels' (K), 'threshold',
     'dice_loss' (mean over images), 'mean_dice' / 'mean_jaccard' (mean over the K channels of
     their mean over images), 'dice' / 'jaccard' {name: mean over images}, 'dice_sd' /
     'jaccard_sd' {name: sample standard deviation over images}, 'dice_median', 'dice_min',
     'jaccard_min' {name: ...}}.
  """
  scored = scored_structures(names)
  n = len(dice)
  if n == 0:
    raise ValueError('no examples to score')
  if dice.shape != (n, len(scored)) or jaccard.shape != dice.shape:
    raise ValueError(f'expected scores [N, {len(scored)}] for {scored}, got {dice.shape}')
  d = {s: _stats(dice[:, i]) for i, s in enumerate(scored)}
  j = {s: _stats(jaccard[:, i]) for i, s in enumerate(scored)}
  k = len(names)
  return {
      'num_examples': int(n), 'structures': list(scored), 'channels': list(names),
      'threshold': float(threshold),
      'dice_loss': float(np.mean(dice_loss)),
      'mean_dice': float(np.mean(dice[:, :k].mean(axis=0))),
      'mean_jaccard': float(np.mean(jaccard[:, :k].mean(axis=0))),
      'dice': {s: v['mean'] for s, v in d.items()},
      'jaccard': {s: v['mean'] for s, v in j.items()},
      'dice_sd': {s: v['sd'] for s, v in d.items()},
      'jaccard_sd': {s: v['sd'] for s, v in j.items()},
      'dice_median': {s: v['median'] for s, v in d.items()},
      'dice_min': {s: v['min'] for s, v in d.items()},
      'jaccard_min': {s: v['min'] for s, v in j.items()},
  }


def flat_summary(metrics: Mapping[str, Any]) -> dict[str, float]:
  """'dice_<structure>' and 'jaccard_<structure>' means (+ 'dice_mean', 'jaccard_mean',
  'dice_loss') as flat keys: what a report's metrics.json leads with."""
  out = {f'dice_{s}': metrics['dice'][s] for s in metrics['structures']}
  out['dice_mean'] = metrics['mean_dice']
  out.update({f'jaccard_{s}': metrics['jaccard'][s] for s in metrics['structures']})
  out['jaccard_mean'] = metrics['mean_jaccard']
  out['dice_loss'] = metrics['dice_loss']
  return out
