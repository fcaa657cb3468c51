"""Paper 004's feature weighting (section 3.3, Eq. 3): F_l = F_g (x) M_g.

The lung and heart masks [B, H, W, S] of the classifier's input (cached by the `segment` stage
and cropped with the image, never recomputed in the train step) are merged into the global mask
M_g ("pixels are either 1 for the lung and heart regions or 0 for other regions by pixel-wise
summation": any structure present, binarised at `mask_threshold`), "resized into a size of
1 x h x w equal to ... the global attention map F_g by adaptive average pooling", and multiplied
into the backbone's last feature map F_g [B, h, w, C] element-wise, zeroing the features outside
the lungs and heart. Section 3.1 once says "element-wise summation" for this step; Eq. 3, the
rest of the text ("zeroing", "logical AND") and the released code multiply.

Our readings (config values of the model; defaults as the released code, CXRDC net/CXRNet.py):
- `binarize=True`: the pooled mask is binarised at 0.5 (`mask.ge(0.5)`, the text's "logical
  AND"), so a feature cell counts as inside when at least half its pixels are; False multiplies
  by the pooled fraction itself (a soft weighting).
- `sigmoid=True` (applied by the model, see models/densenet.py): the released code passes the
  DenseNet features through a sigmoid before masking (torchvision's `features`, i.e. after
  `norm5` and before the ReLU); False masks the usual ReLU features.
"""

import jax
import jax.numpy as jnp


def adaptive_avg_pool(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """torch's AdaptiveAvgPool2d on [B, H, W, C] -> [B, h, w, C].

  Output cell (i, j) averages rows floor(i H / h) .. ceil((i + 1) H / h) - 1 and the same for
  columns; for H divisible by h that is plain h x h average pooling of H / h blocks.
  """
  b, h_in, w_in, c = x.shape
  h, w = size

  def bounds(n_in: int, n_out: int) -> list[tuple[int, int]]:
    return [((i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)) for i in range(n_out)]

  if h_in % h == 0 and w_in % w == 0:
    return x.reshape(b, h, h_in // h, w, w_in // w, c).mean(axis=(2, 4))
  rows = jnp.stack([x[:, r0:r1].mean(axis=1) for r0, r1 in bounds(h_in, h)], axis=1)
  return jnp.stack([rows[:, :, c0:c1].mean(axis=2) for c0, c1 in bounds(w_in, w)], axis=2)


def global_mask(masks: jax.Array, threshold: float = 0.5) -> jax.Array:
  """M_g: [B, H, W, S] masks (0/1 or probabilities) -> [B, H, W, 1] float 0/1, 1 where any
  structure is (>= threshold)."""
  return (jnp.max(masks, axis=-1, keepdims=True) >= threshold).astype(jnp.float32)


def pooled_mask(masks: jax.Array, size: tuple[int, int], *, binarize: bool = True,
                threshold: float = 0.5) -> jax.Array:
  """M_g pooled to the feature grid: [B, H, W, S] -> [B, h, w, 1] (0/1 when `binarize`)."""
  if masks.ndim != 4:
    raise ValueError(f'masks must be [B, H, W, S], got shape {masks.shape}')
  pooled = adaptive_avg_pool(global_mask(masks, threshold), size)
  return (pooled >= 0.5).astype(pooled.dtype) if binarize else pooled


def weigh_features(features: jax.Array, masks: jax.Array, *, binarize: bool = True,
                   threshold: float = 0.5) -> jax.Array:
  """Eq. 3, F_l = F_g (x) M_g: features [B, h, w, C] x masks [B, H, W, S] -> [B, h, w, C]."""
  m = pooled_mask(masks, features.shape[1:3], binarize=binarize, threshold=threshold)
  return features * m.astype(features.dtype)
