"""Prediction Difference Analysis (Zintgraf et al. 2017), vectorised, for sigmoid multi-label nets.

Paper 000 (Saednia et al., section II-C) explains its classifiers' decisions with PDA, reference
[2]: the relevance of a window of the input is the weight of evidence

  WE_c(window) = log2 odds(p(c | x)) - log2 odds(p(c | x without window)),
  p(c | x without window) = 1/S * sum_s p(c | x with the window replaced by sample s),

with odds(p) = p / (1 - p). Positive relevance: the window's actual values speak for class c;
negative: against it. The probabilities get Laplace's correction p <- (p N + 1) / (N + 2) before
the odds (N = the number of training examples), which keeps the odds finite. Zintgraf et al.
correct over the K outcomes of a softmax; here every class is its own sigmoid, i.e. a binary
problem with two outcomes (c, not c), so the denominator is N + 2 for every class. The odds are
computed from p and 1 - p averaged separately (1 - sigmoid(l) = sigmoid(-l)), so no precision is
lost when p is close to 1.

Two levels share one implementation, `prediction_difference`:
- `pda_features(head_fn, features [h, w, C], ...)`: windows over the classifier's last feature
  map (every channel of a location at once); only the head is re-evaluated. This is what paper
  000 does.
- `pda_pixels(logits_fn, image [H, W, C], ...)`: windows over input pixels; whole network.

Windows: size `window` (int or (kh, kw)), top-left corners every `stride` pixels (stride ==
window: non-overlapping; smaller: overlapping). Windows lie fully inside the map; where the
stride does not reach the last row/column exactly, one more window aligned with the far edge is
added, so every pixel is covered. A pixel's relevance is the mean WE of all windows covering it
(Zintgraf et al. average overlapping windows the same way).

Samplers (what "x without window" means):
- `MarginalSampler`: the window's values are taken, jointly, from the same window of a training
  map/image chosen uniformly at random (with replacement) for each sample.
- `ConditionalSampler`: a multivariate Gaussian over patches of (window + `padding` on every
  side) x C values, fitted on training patches pooled over all positions (translation invariant,
  as we read Zintgraf et al.'s code): a position-specific Gaussian would need P times as many
  parameters (P = number of windows, 46k for 10 x 10 windows at stride 1 on 224 px) and would
  get P times fewer fitting patches each. A window is drawn from the Gaussian conditional on its
  observed surround (the padding ring): mean_a + S_ab S_bb^-1 (x_b - mean_b), covariance
  S_aa - S_ab S_bb^-1 S_ba, after adding `ridge` x the mean variance to the diagonal (the
  surround of features, or of grey images replicated to 3 channels, is often rank deficient).
  Near the border the part of the ring outside the map is unobserved and marginalised out: the
  Gaussian is conditioned on the in-map part only. The few distinct border cases (at most
  (2 padding + 1)^2) are conditioned once, at fit time. With fewer fitting patches n than patch
  dimensions D (feature maps: D = 9 x 512 for 1 x 1 windows with padding 1) the covariance is
  ridge I + F F^T with F [D, n], and the conditioning goes through n x n systems
  (push-through/Woodbury identity) instead of D x D ones: same result, a fraction of the time.
  Samples are clipped to the training data's range by default, like the reference code, since
  out-of-range values (e.g. negative post-ReLU features) were never seen by the network.

Vectorisation: the P x S perturbed inputs ("items", P windows x S samples) are split into chunks of
at most `chunk_size` items; within a chunk, sampling and pasting are `jax.vmap`ped over items and
the network sees one batch [chunk, H, W, C]; `lax.scan` runs the chunks one after the other inside
one `jax.jit`, carrying the per-window sums of p and 1 - p, so memory is bounded by one chunk
whatever P x S is. A scan rather than a Python loop inside jit: its body is compiled once, whereas a
Python loop would unroll all chunks (1,800 for the 462k passes of 10 x 10 windows at stride 1 on 224
px) into one huge program. Chunks are built from static index arrays (window positions and chunk
boundaries are known from the shapes at trace time). Items are ordered by the sampler's border case
so that a chunk holds one case only and the conditional sampler multiplies a chunk's noise by one
Cholesky factor instead of gathering one per item. Every item's randomness comes from `fold_in(key,
window_index * S + sample_index)`, so results do not depend on `chunk_size`.

Keys are typed (`jax.random.key`). Everything is a pure function of its arguments (no IO).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from flax import struct
from jax import lax

from cxr_jax import xla_options

LogitsFn = Callable[[jax.Array], jax.Array]

DEFAULT_LAPLACE_N = 10_000  # Only keeps the odds finite; pass the real training set size.


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(v, int | np.integer):
    return int(v), int(v)
  a, b = v
  return int(a), int(b)


def window_positions(size: int, window: int, stride: int) -> np.ndarray:
  """Top-left coordinates along one axis: 0, stride, ... plus a last window flush with the end.

  Returns int array [n]; every index of [0, size) lies in at least one window.
  """
  if window < 1 or stride < 1:
    raise ValueError(f'window ({window}) and stride ({stride}) must be >= 1')
  if window > size:
    raise ValueError(f'window {window} is larger than the map ({size})')
  pos = list(range(0, size - window + 1, stride))
  if pos[-1] != size - window:
    pos.append(size - window)
  return np.asarray(pos, np.int32)


def coverage_matrix(size: int, positions: np.ndarray, window: int) -> np.ndarray:
  """[size, n] 0/1 matrix: (i, j) = 1 iff index i lies in the window starting at positions[j]."""
  idx = np.arange(size)[:, None]
  return ((idx >= positions[None, :]) & (idx < positions[None, :] + window)).astype(np.float32)


def average_over_windows(we: jax.Array, rows: np.ndarray, cols: np.ndarray,
                         window: tuple[int, int], shape: tuple[int, int]) -> jax.Array:
  """Per-pixel mean of the window values over the windows covering each pixel.

  Args:
    we: [K, nr, nc] one value per class and window (windows on the grid rows x cols).
    rows, cols: [nr], [nc] top-left coordinates of the windows.
    window: (kh, kw).
    shape: (H, W) of the map.
  Returns:
    [K, H, W].
  """
  mr = coverage_matrix(shape[0], rows, window[0])  # [H, nr]
  mc = coverage_matrix(shape[1], cols, window[1])  # [W, nc]
  # The windows form a grid, so the sum over covering windows separates into rows and columns.
  total = jnp.einsum('hr,krc,wc->khw', mr, we, mc)
  count = mr.sum(1)[:, None] * mc.sum(1)[None, :]
  return total / count


def log2_odds(p: jax.Array, q: jax.Array, laplace_n: int | None) -> jax.Array:
  """log2 of the odds p / q with Laplace's correction for two outcomes.

  Args:
    p: probability of the class (any shape); q: probability of its complement, 1 - p, passed
      separately because 1 - p rounds to 0 in float32 long before p does.
    laplace_n: number of training examples N; p <- (p N + 1) / (N + 2) (and q likewise, so the
      corrected pair still sums to 1). None: no correction.
  """
  if laplace_n is None:
    return jnp.log2(p) - jnp.log2(q)
  # The common denominator N + 2 cancels in the ratio.
  return jnp.log2(p * laplace_n + 1.0) - jnp.log2(q * laplace_n + 1.0)


# ----------------------------------------------------------------------------------------------
# Samplers. Each one is a pytree (passed to jit as an argument, not baked in as a constant) with
#   window_groups(rows, cols, window, shape) -> np [P] static border-case id per window,
#   prepare(x, rows_p, cols_p, groups, window) -> per-window state (pytree, leading axis P),
#   draw(keys [B], win [B], group (scalar), rows [B], cols [B], state, window) -> [B, kh, kw, C].
# ----------------------------------------------------------------------------------------------


@struct.dataclass
class MarginalSampler:
  """Replaces a window by the same window of a random training example (joint over the window).

  Attributes:
    data: [M, H, W, C] training feature maps or images (same preprocessing as the explained one).
  """

  data: jax.Array

  @classmethod
  def fit(cls, data: Any, *, max_examples: int | None = None, seed: int = 0) -> MarginalSampler:
    """Keeps (a random subset of at most `max_examples` of) data [M, H, W, C]."""
    data = np.asarray(data, np.float32)
    if data.ndim != 4:
      raise ValueError(f'MarginalSampler.fit wants [M, H, W, C] data, got shape {data.shape}')
    if max_examples is not None and data.shape[0] > max_examples:
      idx = np.random.default_rng(seed).choice(data.shape[0], max_examples, replace=False)
      data = data[np.sort(idx)]
    return cls(data=jnp.asarray(data))

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.data.shape[1:])

  def window_groups(self, rows: np.ndarray, cols: np.ndarray, window: tuple[int, int],
                    shape: tuple[int, int]) -> np.ndarray:
    del cols, window, shape
    return np.zeros(len(rows), np.int32)

  def prepare(self, x: jax.Array, rows: jax.Array, cols: jax.Array, groups: np.ndarray,
              window: tuple[int, int]) -> None:
    del x, rows, cols, groups, window

  def draw(self, keys: jax.Array, win: jax.Array, group: jax.Array, rows: jax.Array,
           cols: jax.Array, state: None, window: tuple[int, int]) -> jax.Array:
    del win, group, state
    c = self.data.shape[-1]

    def one(key, r, col):
      i = jax.random.randint(key, (), 0, self.data.shape[0])
      return lax.dynamic_slice(self.data, (i, r, col, 0), (1, *window, c))[0]

    return jax.vmap(one)(keys, rows, cols)


def _patches(data: Any, patch: tuple[int, int], max_patches: int | None, seed: int
             ) -> np.ndarray:
  """Flattened patches [n, ph pw C] (row-major) at every position fully inside the maps of data
  [M, H, W, C], pooled over positions and examples; a random subset of `max_patches` of them."""
  data = np.asarray(data, np.float32)
  m, h, w, _ = data.shape
  ph, pw = patch
  if ph > h or pw > w:
    raise ValueError(f'patch {patch} (window + 2 padding) does not fit in maps of {(h, w)}')
  ni, nj = h - ph + 1, w - pw + 1
  total = m * ni * nj
  flat = np.arange(total)
  if max_patches is not None and total > max_patches:
    flat = np.sort(np.random.default_rng(seed).choice(total, max_patches, replace=False))
  mi, rest = np.divmod(flat, ni * nj)
  ii, jj = np.divmod(rest, nj)
  view = np.lib.stride_tricks.sliding_window_view(data, (ph, pw), axis=(1, 2))  # [m,ni,nj,C,ph,pw]
  return view[mi, ii, jj].transpose(0, 2, 3, 1).reshape(len(flat), -1)


def patch_gaussian(data: Any, patch: tuple[int, int], *, max_patches: int | None = 50_000,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Mean [D] and covariance [D, D] (float64) of the patches [ph, pw, C] of data [M, H, W, C]
  (D = ph pw C, row-major), pooled over all positions fully inside the maps."""
  patches = _patches(data, patch, max_patches, seed).astype(np.float64)
  mean = patches.mean(0)
  centred = patches - mean
  return mean, centred.T @ centred / max(len(patches) - 1, 1)


def _condition_dense(cov: np.ndarray, a: np.ndarray, b: np.ndarray, obs_b: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Gain [d_a, d_b] (S_ao S_oo^-1 on the observed part o of b, zero elsewhere) and conditional
  covariance S_aa - S_ao S_oo^-1 S_oa [d_a, d_a] of a dense covariance."""
  o = b[obs_b]
  s_aa = cov[np.ix_(a, a)]
  gain = np.zeros((len(a), len(b)))
  if not len(o):
    return gain, s_aa
  s_ao = cov[np.ix_(a, o)]
  gain_o = scipy.linalg.cho_solve(scipy.linalg.cho_factor(cov[np.ix_(o, o)], lower=True),
                                  s_ao.T).T
  gain[:, obs_b] = gain_o
  return gain, s_aa - gain_o @ s_ao.T


def _condition_low_rank(f_a: np.ndarray, f_b: np.ndarray, gram_b: np.ndarray, lam: float,
                        obs_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The same for cov = lam I + F F^T (F [D, n]; f_a, f_b its window and ring rows, gram_b =
  f_b^T f_b) through n x n systems (push-through identity): with M = lam I + F_o^T F_o,
  S_ao S_oo^-1 = F_a M^-1 F_o^T and the conditional covariance is lam I + lam F_a M^-1 F_a^T."""
  f_u = f_b[~obs_b]
  gram = lam * np.eye(f_b.shape[1]) + gram_b - f_u.T @ f_u
  left = scipy.linalg.cho_solve(scipy.linalg.cho_factor(gram, lower=True), f_a.T).T  # F_a M^-1
  gain = (left @ f_b.T) * obs_b[None, :]
  return gain, lam * np.eye(len(f_a)) + lam * left @ f_a.T


def _clip_cases(size: int, window: int, padding: int) -> list[tuple[int, int]]:
  """Distinct (cut before, cut after) of a padded window's surround along one axis of a map."""
  return sorted({(max(0, padding - r), max(0, r + window + padding - size))
                 for r in range(size - window + 1)})


@struct.dataclass
class ConditionalSampler:
  """Gaussian sample of a window given its observed surround (see the module docstring).

  Attributes:
    mean_a: [d_a] mean of the window's values (d_a = kh kw C, order [kh, kw, C]).
    mean_b: [d_b] mean of the surround's values (patch order, window removed).
    cond_matrix: [G, d_a, d_b] S_ab S_bb^-1 per border case (zero columns where unobserved).
    cond_chol: [G, d_a, d_a] Cholesky factor of the conditional covariance per border case.
    low, high: clip range of the samples (+-inf when not clipping).
    window, padding, image_shape: static geometry the sampler was fitted for.
    row_cases, col_cases: static border cases along rows/columns; case id = row * ncol + col.
  """

  mean_a: jax.Array
  mean_b: jax.Array
  cond_matrix: jax.Array
  cond_chol: jax.Array
  low: jax.Array
  high: jax.Array
  window: tuple[int, int] = struct.field(pytree_node=False)
  padding: int = struct.field(pytree_node=False)
  image_shape: tuple[int, int, int] = struct.field(pytree_node=False)
  row_cases: tuple[tuple[int, int], ...] = struct.field(pytree_node=False)
  col_cases: tuple[tuple[int, int], ...] = struct.field(pytree_node=False)

  @classmethod
  def fit(cls, data: Any, *, window: int | Sequence[int], padding: int, ridge: float = 1e-3,
          max_patches: int | None = 50_000, seed: int = 0, clip: bool = True
          ) -> ConditionalSampler:
    """Fits the patch Gaussian on data [M, H, W, C] (training maps or images) and conditions it.

    Args:
      window: (kh, kw) or int, must be the window later passed to the PDA functions.
      padding: width of the observed ring around the window.
      ridge: added to the covariance diagonal, relative to the mean variance.
      max_patches: cap on the number of fitting patches (random subset).
      clip: clip samples to [min, max] of data.
    """
    data = np.asarray(data, np.float32)
    kh, kw = _pair(window)
    patches = _patches(data, (kh + 2 * padding, kw + 2 * padding), max_patches, seed)
    patches = patches.astype(np.float64)
    mean = patches.mean(0)
    # Covariance = factor factor^T, factor [D, n]. With fewer patches than dimensions (feature
    # maps: D = 9 x 512 for 1 x 1 windows with padding 1), conditioning goes through the n x n
    # Gram matrix instead of D x D solves (Woodbury), exactly and far faster.
    factor = (patches - mean).T / math.sqrt(max(len(patches) - 1, 1))
    clip_range = (float(data.min()), float(data.max())) if clip else None
    kwargs = dict(window=(kh, kw), padding=padding, image_shape=data.shape[1:], ridge=ridge,
                  clip_range=clip_range)
    if factor.shape[1] < factor.shape[0]:
      return cls._build(mean, factor=factor, **kwargs)
    return cls._build(mean, cov=factor @ factor.T, **kwargs)

  @classmethod
  def from_gaussian(cls, mean: Any, cov: Any, *, window: int | Sequence[int], padding: int,
                    image_shape: Sequence[int], ridge: float = 0.0,
                    clip_range: tuple[float, float] | None = None) -> ConditionalSampler:
    """Conditions a patch Gaussian (mean [D], cov [D, D], patch order [ph, pw, C]) for every
    border case of maps of `image_shape` (H, W, C)."""
    return cls._build(np.asarray(mean, np.float64), cov=np.asarray(cov, np.float64),
                      window=_pair(window), padding=padding, image_shape=image_shape,
                      ridge=ridge, clip_range=clip_range)

  @classmethod
  def _build(cls, mean: np.ndarray, *, window: tuple[int, int], padding: int,
             image_shape: Sequence[int], ridge: float, clip_range: tuple[float, float] | None,
             cov: np.ndarray | None = None, factor: np.ndarray | None = None
             ) -> ConditionalSampler:
    """Covariance given densely (cov [D, D]) or as ridge I + factor factor^T (factor [D, n])."""
    kh, kw = window
    h, w, c = (int(v) for v in image_shape)
    ph, pw = kh + 2 * padding, kw + 2 * padding
    d = ph * pw * c
    if mean.shape != (d,) or (cov is not None and cov.shape != (d, d)) or (
        factor is not None and factor.shape[0] != d):
      raise ValueError(f'Gaussian of mean shape {mean.shape} does not match patches '
                       f'{(ph, pw, c)}')
    mean_var = float(np.mean(np.diag(cov))) if cov is not None else float(
        np.sum(factor ** 2)) / d
    lam = ridge * max(mean_var, 1e-12)
    a_idx, b_idx = _patch_index_sets(window=(kh, kw), padding=padding, channels=c)
    row_cases = _clip_cases(h, kh, padding)
    col_cases = _clip_cases(w, kw, padding)
    if cov is not None:
      cov = cov + lam * np.eye(d)
    else:
      if lam <= 0:
        raise ValueError('conditioning a low-rank covariance needs ridge > 0')
      f_a, f_b = factor[a_idx], factor[b_idx]
      gram_b = f_b.T @ f_b
    gains, chols = [], []
    for rc in row_cases:
      for cc in col_cases:
        obs = np.zeros((ph, pw, c), bool)
        obs[rc[0]:ph - rc[1], cc[0]:pw - cc[1]] = True
        obs_b = obs.reshape(-1)[b_idx]
        if cov is not None:
          gain, cond_cov = _condition_dense(cov, a_idx, b_idx, obs_b)
        else:
          gain, cond_cov = _condition_low_rank(f_a, f_b, gram_b, lam, obs_b)
        gains.append(gain)
        chols.append(np.linalg.cholesky((cond_cov + cond_cov.T) / 2))
    low, high = clip_range if clip_range is not None else (-np.inf, np.inf)
    return cls(mean_a=jnp.asarray(mean[a_idx], jnp.float32),
               mean_b=jnp.asarray(mean[b_idx], jnp.float32),
               cond_matrix=jnp.asarray(np.stack(gains), jnp.float32),
               cond_chol=jnp.asarray(np.stack(chols), jnp.float32),
               low=jnp.float32(low), high=jnp.float32(high), window=(kh, kw),
               padding=int(padding), image_shape=(h, w, c), row_cases=tuple(row_cases),
               col_cases=tuple(col_cases))

  def window_groups(self, rows: np.ndarray, cols: np.ndarray, window: tuple[int, int],
                    shape: tuple[int, int]) -> np.ndarray:
    (kh, kw), p = window, self.padding
    rcase = [self.row_cases.index((max(0, p - r), max(0, r + kh + p - shape[0]))) for r in rows]
    ccase = [self.col_cases.index((max(0, p - c), max(0, c + kw + p - shape[1]))) for c in cols]
    return (np.asarray(rcase) * len(self.col_cases) + np.asarray(ccase)).astype(np.int32)

  def prepare(self, x: jax.Array, rows: jax.Array, cols: jax.Array, groups: np.ndarray,
              window: tuple[int, int]) -> jax.Array:
    """Conditional means [P, d_a] of every window given x's surround."""
    p, c = self.padding, x.shape[-1]
    ph, pw = window[0] + 2 * p, window[1] + 2 * p
    _, b_idx = _patch_index_sets(window=window, padding=p, channels=c)
    # Zeros outside the map are never used: their columns of cond_matrix are zero.
    xp = jnp.pad(x, ((p, p), (p, p), (0, 0)))
    means = jnp.zeros((len(groups), self.mean_a.shape[0]), jnp.float32)
    for g in np.unique(groups):  # static: at most (2p+1)^2 border cases, one matmul each
      idx = np.flatnonzero(groups == g)
      patches = jax.vmap(lambda r, col: lax.dynamic_slice(xp, (r, col, 0), (ph, pw, c)))(
          rows[idx], cols[idx]).reshape(len(idx), -1)
      xb = patches[:, b_idx] - self.mean_b
      means = means.at[idx].set(xb @ self.cond_matrix[g].T + self.mean_a)
    return means

  def draw(self, keys: jax.Array, win: jax.Array, group: jax.Array, rows: jax.Array,
           cols: jax.Array, state: jax.Array, window: tuple[int, int]) -> jax.Array:
    del rows, cols
    d_a = self.mean_a.shape[0]
    z = jax.vmap(lambda k: jax.random.normal(k, (d_a,), jnp.float32))(keys)
    values = state[win] + z @ self.cond_chol[group].T
    values = jnp.clip(values, self.low, self.high)
    return values.reshape(len(keys), *window, -1)


@functools.lru_cache(maxsize=64)
def _patch_index_sets(*, window: tuple[int, int], padding: int, channels: int
                      ) -> tuple[np.ndarray, np.ndarray]:
  """Flat indices (row-major [ph, pw, C]) of the window (a) and of its surround ring (b)."""
  kh, kw = window
  ph, pw = kh + 2 * padding, kw + 2 * padding
  inside = np.zeros((ph, pw, channels), bool)
  inside[padding:padding + kh, padding:padding + kw] = True
  flat = inside.reshape(-1)
  return np.flatnonzero(flat), np.flatnonzero(~flat)


Sampler = MarginalSampler | ConditionalSampler


# ----------------------------------------------------------------------------------------------
# The analysis.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static bookkeeping: window grid, item order grouped by border case, chunk boundaries."""

  rows: np.ndarray          # [nr] window top rows
  cols: np.ndarray          # [nc] window left columns
  win_rows: np.ndarray      # [P] per window (P = nr nc, index = i nc + j)
  win_cols: np.ndarray      # [P]
  groups: np.ndarray        # [P] border case per window
  order: np.ndarray         # [P] windows sorted by group
  group_offset: np.ndarray  # [G] start of each group in `order` (dense group index)
  group_count: np.ndarray   # [G] windows per group
  group_id: np.ndarray      # [G] sampler's case id of each group
  chunk_group: np.ndarray   # [n_chunks] dense group index
  chunk_start: np.ndarray   # [n_chunks] first item (within its group) of each chunk
  chunk_size: int


def _make_plan(sampler: Sampler, shape: tuple[int, int], window: tuple[int, int],
               stride: tuple[int, int], num_samples: int, chunk_size: int) -> _Plan:
  rows = window_positions(shape[0], window[0], stride[0])
  cols = window_positions(shape[1], window[1], stride[1])
  win_rows = np.repeat(rows, len(cols))
  win_cols = np.tile(cols, len(rows))
  groups = sampler.window_groups(win_rows, win_cols, window, shape)
  order = np.argsort(groups, kind='stable').astype(np.int32)
  group_id, group_count = np.unique(groups, return_counts=True)
  group_offset = np.concatenate([[0], np.cumsum(group_count)[:-1]])
  # Chunks never straddle two groups, so a group's last chunk is padded. Border groups are
  # small (a few windows), so the full chunk_size would mostly compute padding: take the size
  # <= chunk_size that minimises padded items + a per-chunk overhead worth 16 items.
  items = group_count * num_samples
  cost = lambda b: int(np.sum(-(-items // b)) * (b + 16))
  size = min(range(1, int(min(chunk_size, items.max())) + 1), key=lambda b: (cost(b), -b))
  chunk_group, chunk_start = [], []
  for g, n in enumerate(group_count):
    for start in range(0, int(n) * num_samples, size):
      chunk_group.append(g)
      chunk_start.append(start)
  return _Plan(rows, cols, win_rows, win_cols, groups, order, group_offset.astype(np.int32),
               group_count.astype(np.int32), group_id.astype(np.int32),
               np.asarray(chunk_group, np.int32), np.asarray(chunk_start, np.int32), size)


def _check_sampler(sampler: Sampler, x_shape: tuple[int, ...], window: tuple[int, int],
                   padding: int | None) -> None:
  if tuple(sampler.image_shape) != tuple(x_shape):
    raise ValueError(f'sampler was fitted on maps of shape {tuple(sampler.image_shape)}, '
                     f'the explained one has shape {tuple(x_shape)}')
  if isinstance(sampler, ConditionalSampler):
    if sampler.window != window:
      raise ValueError(f'ConditionalSampler fitted for window {sampler.window}, PDA asked for '
                       f'{window}')
    if padding is not None and padding != sampler.padding:
      raise ValueError(f'ConditionalSampler fitted with padding {sampler.padding}, PDA asked for '
                       f'{padding}')
  elif not isinstance(sampler, MarginalSampler):
    raise TypeError(f'unknown sampler type {type(sampler).__name__}')


def prediction_difference(logits_fn: LogitsFn, x: jax.Array, sampler: Sampler, *,
                          window: int | Sequence[int], stride: int | Sequence[int] | None = None,
                          padding: int | None = None, num_samples: int = 10,
                          key: jax.Array, chunk_size: int = 256,
                          laplace_n: int | None = DEFAULT_LAPLACE_N) -> jax.Array:
  """Weight-of-evidence relevance map of one input, per class.

  Args:
    logits_fn: maps a batch [N, H, W, C] to logits [N, K] (sigmoid outputs). Static for jit: pass
      the same function object again to reuse the compiled program.
    x: [H, W, C] the explained map (one feature map or one image).
    sampler: a fitted `MarginalSampler` or `ConditionalSampler` for maps of x's shape.
    window: window size (int or (kh, kw)).
    stride: step between windows (default: window, i.e. non-overlapping).
    padding: optional; checked against the conditional sampler's (the ring is fixed at fit).
    num_samples: S samples per window.
    key: typed PRNG key (`jax.random.key`).
    chunk_size: at most this many perturbed inputs per forward call (the memory bound); the
      plan may take fewer to avoid padding chunks (results do not depend on it).
    laplace_n: number of training examples N of Laplace's correction; None: none.
  Returns:
    relevance [K, H, W] float32, in log2 odds (bits of evidence) per class.
  """
  x = jnp.asarray(x, jnp.float32)
  if x.ndim != 3:
    raise ValueError(f'x must be one map [H, W, C], got shape {x.shape}')
  window = _pair(window)
  stride = window if stride is None else _pair(stride)
  if num_samples < 1 or chunk_size < 1:
    raise ValueError(f'num_samples ({num_samples}) and chunk_size ({chunk_size}) must be >= 1')
  _check_sampler(sampler, x.shape, window, padding)
  if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    raise TypeError('key must be a typed key from jax.random.key (not jax.random.PRNGKey)')
  return _pda_jit(logits_fn, x, sampler, key, window=window, stride=stride,
                  num_samples=int(num_samples), chunk_size=int(chunk_size), laplace_n=laplace_n)


@functools.partial(xla_options.jit, static_argnames=('logits_fn', 'window', 'stride',
                                                     'num_samples', 'chunk_size', 'laplace_n'))
def _pda_jit(logits_fn: LogitsFn, x: jax.Array, sampler: Sampler, key: jax.Array, *,
             window: tuple[int, int], stride: tuple[int, int], num_samples: int,
             chunk_size: int, laplace_n: int | None) -> jax.Array:
  h, w, _ = x.shape
  plan = _make_plan(sampler, (h, w), window, stride, num_samples, chunk_size)
  s, size = num_samples, plan.chunk_size
  win_rows, win_cols = jnp.asarray(plan.win_rows), jnp.asarray(plan.win_cols)
  state = sampler.prepare(x, win_rows, win_cols, plan.groups, window)
  order = jnp.asarray(plan.order)
  group_offset, group_count = jnp.asarray(plan.group_offset), jnp.asarray(plan.group_count)
  group_id = jnp.asarray(plan.group_id)
  num_windows = len(plan.win_rows)

  def chunk(carry, xs):
    psum, qsum = carry
    g, start = xs
    u = start + jnp.arange(size)                      # item index within the group
    valid = u < group_count[g] * s
    local = jnp.minimum(u // s, group_count[g] - 1)   # padding items repeat a real window
    win = order[group_offset[g] + local]
    sample = u % s
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(win * s + sample)
    rows, cols = win_rows[win], win_cols[win]
    values = sampler.draw(keys, win, group_id[g], rows, cols, state, window)
    batch = jax.vmap(lambda v, r, c: lax.dynamic_update_slice(x, v.astype(x.dtype), (r, c, 0)))(
        values, rows, cols)
    logits = logits_fn(batch).astype(jnp.float32)    # [size, K]
    weight = valid.astype(jnp.float32)[:, None]
    psum = psum.at[win].add(jax.nn.sigmoid(logits) * weight)
    qsum = qsum.at[win].add(jax.nn.sigmoid(-logits) * weight)
    return (psum, qsum), None

  logits0 = logits_fn(x[None]).astype(jnp.float32)[0]  # [K]
  k = logits0.shape[0]
  zeros = jnp.zeros((num_windows, k), jnp.float32)
  (psum, qsum), _ = lax.scan(chunk, (zeros, zeros),
                             (jnp.asarray(plan.chunk_group), jnp.asarray(plan.chunk_start)))
  we = (log2_odds(jax.nn.sigmoid(logits0), jax.nn.sigmoid(-logits0), laplace_n)
        - log2_odds(psum / s, qsum / s, laplace_n))  # [P, K]
  we = we.T.reshape(k, len(plan.rows), len(plan.cols))
  return average_over_windows(we, plan.rows, plan.cols, window, (h, w))


def pda_features(head_fn: LogitsFn, features: jax.Array, sampler: Sampler, **kwargs: Any
                 ) -> jax.Array:
  """Feature-level PDA: windows over features [h, w, C] (all channels), head re-evaluated.

  `head_fn` maps features [N, h, w, C] -> logits [N, K]; keyword arguments as in
  `prediction_difference`. Returns relevance [K, h, w].
  """
  return prediction_difference(head_fn, features, sampler, **kwargs)


def pda_pixels(logits_fn: LogitsFn, image: jax.Array, sampler: Sampler, **kwargs: Any
               ) -> jax.Array:
  """Pixel-level PDA: windows over image [H, W, C] (all channels), whole network re-evaluated.

  `logits_fn` maps images [N, H, W, C] -> logits [N, K]; keyword arguments as in
  `prediction_difference`. Returns relevance [K, H, W].
  """
  return prediction_difference(logits_fn, image, sampler, **kwargs)


def make_sampler(kind: str, data: Any, *, window: int | Sequence[int], padding: int = 0,
                 **kwargs: Any) -> Sampler:
  """'marginal' or 'conditional' sampler fitted on data [M, H, W, C] (config.explain.sampler)."""
  if kind == 'marginal':
    return MarginalSampler.fit(data, **kwargs)
  if kind == 'conditional':
    return ConditionalSampler.fit(data, window=window, padding=padding, **kwargs)
  raise ValueError(f'unknown PDA sampler {kind!r}; valid: conditional, marginal')


def num_forward_passes(shape: tuple[int, int], window: int | Sequence[int],
                       stride: int | Sequence[int] | None, num_samples: int) -> int:
  """Perturbed inputs one heat map needs: windows x samples (plus 1 unperturbed pass)."""
  window = _pair(window)
  stride = window if stride is None else _pair(stride)
  n = (len(window_positions(shape[0], window[0], stride[0]))
       * len(window_positions(shape[1], window[1], stride[1])))
  return n * num_samples + 1


__all__ = [
    'ConditionalSampler', 'MarginalSampler', 'average_over_windows', 'log2_odds', 'make_sampler',
    'num_forward_passes', 'patch_gaussian', 'pda_features', 'pda_pixels', 'prediction_difference',
    'window_positions',
]
