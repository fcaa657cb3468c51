"""Plain Python-loop Prediction Difference Analysis: the reference for tests and the benchmark.

Written independently of the vectorised `cxr_jax.explain.prediction_difference` (own window grid,
own surround extraction, own averaging, float64 bookkeeping); it only shares the samplers' fitted
parameters and the per-item key convention `fold_in(key, window_index * S + sample_index)`, so the
two must agree to float32 rounding. One forward call per window on its S perturbed copies, as the
reference code of Zintgraf et al. batches them. Not part of the package on purpose.
"""

from collections.abc import Callable

import jax
import numpy as np

from cxr_jax.explain.prediction_difference import ConditionalSampler, MarginalSampler


def _positions(size: int, window: int, stride: int) -> list[int]:
  pos = list(range(0, size - window + 1, stride))
  if pos[-1] != size - window:
    pos.append(size - window)
  return pos


def _sigmoid(v: np.ndarray) -> np.ndarray:
  return 1.0 / (1.0 + np.exp(-v))


def _log2_odds(p: np.ndarray, q: np.ndarray, laplace_n: int | None) -> np.ndarray:
  if laplace_n is not None:
    p = (p * laplace_n + 1) / (laplace_n + 2)
    q = (q * laplace_n + 1) / (laplace_n + 2)
  return np.log2(p / q)


def _draw_marginal(sampler: MarginalSampler, key: jax.Array, r: int, c: int, kh: int,
                   kw: int) -> np.ndarray:
  data = np.asarray(sampler.data)
  i = int(jax.random.randint(key, (), 0, data.shape[0]))
  return data[i, r:r + kh, c:c + kw]


def _draw_conditional(sampler: ConditionalSampler, key: jax.Array, x: np.ndarray, r: int,
                      c: int, kh: int, kw: int) -> np.ndarray:
  h, w, ch = x.shape
  p = sampler.padding
  case = (sampler.row_cases.index((max(0, p - r), max(0, r + kh + p - h)))
          * len(sampler.col_cases)
          + sampler.col_cases.index((max(0, p - c), max(0, c + kw + p - w))))
  surround = []  # the ring in row-major patch order; outside the map: 0 (its weight is 0)
  for i in range(r - p, r + kh + p):
    for j in range(c - p, c + kw + p):
      if r <= i < r + kh and c <= j < c + kw:
        continue
      inside = 0 <= i < h and 0 <= j < w
      surround.extend(x[i, j] if inside else np.zeros(ch))
  xb = np.asarray(surround, np.float64) - np.asarray(sampler.mean_b, np.float64)
  mean = (np.asarray(sampler.mean_a, np.float64)
          + np.asarray(sampler.cond_matrix[case], np.float64) @ xb)
  z = np.asarray(jax.random.normal(key, (len(mean),)), np.float64)
  value = mean + np.asarray(sampler.cond_chol[case], np.float64) @ z
  value = np.clip(value, float(sampler.low), float(sampler.high))
  return value.reshape(kh, kw, ch)


def pda_loop(logits_fn: Callable, x, sampler, *, window: int, stride: int | None = None,
             num_samples: int = 10, key: jax.Array, laplace_n: int | None = 10_000,
             jit: bool = True) -> np.ndarray:
  """Relevance [K, H, W] of x [H, W, C] by explicit loops over windows and samples."""
  x = np.asarray(x, np.float32)
  h, w, _ = x.shape
  kh = kw = window
  stride = window if stride is None else stride
  fn = jax.jit(logits_fn) if jit else logits_fn
  l0 = np.asarray(fn(x[None]), np.float64)[0]
  base = _log2_odds(_sigmoid(l0), _sigmoid(-l0), laplace_n)
  total = np.zeros((len(l0), h, w))
  count = np.zeros((h, w))
  cols = _positions(w, kw, stride)
  for ir, r in enumerate(_positions(h, kh, stride)):
    for ic, c in enumerate(cols):
      index = ir * len(cols) + ic
      batch = []
      for s in range(num_samples):
        k = jax.random.fold_in(key, index * num_samples + s)
        if isinstance(sampler, MarginalSampler):
          value = _draw_marginal(sampler, k, r, c, kh, kw)
        else:
          value = _draw_conditional(sampler, k, x, r, c, kh, kw)
        xi = x.copy()
        xi[r:r + kh, c:c + kw] = value
        batch.append(xi)
      logits = np.asarray(fn(np.stack(batch)), np.float64)
      p, q = _sigmoid(logits).mean(0), _sigmoid(-logits).mean(0)
      total[:, r:r + kh, c:c + kw] += (base - _log2_odds(p, q, laplace_n))[:, None, None]
      count[r:r + kh, c:c + kw] += 1
  return total / count
