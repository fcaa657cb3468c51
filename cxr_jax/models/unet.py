"""U-Net (Ronneberger et al. 2015) for paper 004's lung and heart masks, and the Dice loss.

Paper 004 trains "U-Net [39]" on JSRT/SCR masks (left lung, right lung, heart) with the Dice
loss, then binarises its masks. The architecture follows the original paper with the common
'same'-padding change (the output has the input's size, so masks need no cropping): `depth`
down-steps of [conv 3x3 - (BN) - ReLU] x 2 + max-pool 2x2, a bottleneck block, and `depth`
up-steps of transposed conv 2x2/2 (halving channels) - concatenation with the skip - [conv 3x3 -
(BN) - ReLU] x 2; channels base_width * 2^level. A 1x1 convolution gives one logit per mask:
independent sigmoids (masks may overlap, e.g. 'lungs' and 'left lung'), so the output is
[B, H, W, K] logits.

Parameters: `down1` ... `down{depth}`, `middle`, `upconv{depth}` ... `upconv1` (transposed
convolutions), `up{depth}` ... `up1` and the 1x1 `head`. Sown into 'intermediates': `enc1` ...
`enc{depth}` (skip maps), `bottleneck`, `dec{depth}` ... `dec1`, `features` (= dec1, the last
map before the 1x1 head).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxr_jax import losses
from cxr_jax.models import MODELS, pooling
from cxr_jax.models.batch_norm import batch_norm


class DoubleConv(nn.Module):
  """[conv 3x3 'same' - (BatchNorm) - ReLU] x 2."""

  features: int
  batch_norm: bool = True
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32
  bn_impl: str = 'auto'  # see cxr_jax/models/batch_norm.py

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    for i in (1, 2):
      # No bias before BatchNorm: its shift would be removed by the normalisation anyway.
      x = nn.Conv(self.features, (3, 3), padding='SAME', use_bias=not self.batch_norm,
                  kernel_init=nn.initializers.he_normal(), dtype=self.dtype, name=f'conv{i}')(x)
      if self.batch_norm:
        x = batch_norm(self.bn_axis_name, self.dtype, f'bn{i}', train, activation='relu',
                       impl=self.bn_impl)(x)
      else:
        x = nn.relu(x)
    return x


@MODELS.register('unet')
class UNet(nn.Module):
  """U-Net segmenter: images [B, H, W, C] -> per-pixel mask logits [B, H, W, num_classes].

  Attributes:
    num_classes: number of (sigmoid) masks, e.g. 3 (left lung, right lung, heart) or 4.
    depth: down-sampling steps; H and W must be divisible by 2**depth.
    base_width: channels of the first level (64 in Ronneberger et al.).
    batch_norm: BatchNorm after every 3x3 convolution (the 2015 U-Net had none).
    dtype: compute dtype; parameters stay float32.
    bn_axis_name: mesh axis over which BatchNorm averages batch statistics while training.
    bn_impl: BatchNorm + ReLU's training gradient: 'fused' (hand-written), 'autodiff' (flax's)
      or 'auto' ('fused' on the CPU); same parameters and values (cxr_jax/models/batch_norm.py).
  """

  num_classes: int = 3
  depth: int = 4
  base_width: int = 64
  batch_norm: bool = True
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  bn_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False,
               return_features: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Maps images [B, H, W, C] to logits [B, H, W, num_classes] (float32).

    With `return_features`, returns (logits, features [B, H, W, base_width]).
    """
    _, h, w, _ = x.shape
    if h % 2**self.depth or w % 2**self.depth:
      raise ValueError(f'UNet(depth={self.depth}) needs H and W divisible by {2**self.depth}, '
                       f'got {h}x{w}')
    block = lambda width, name: DoubleConv(width, self.batch_norm, self.bn_axis_name,
                                           self.dtype, self.bn_impl, name=name)
    x = x.astype(self.dtype)
    skips = []
    for level in range(self.depth):
      x = block(self.base_width * 2**level, f'down{level + 1}')(x, train=train)
      self.sow('intermediates', f'enc{level + 1}', x)
      skips.append(x)
      x = pooling.max_pool(x, 2, 2)
    x = block(self.base_width * 2**self.depth, 'middle')(x, train=train)
    self.sow('intermediates', 'bottleneck', x)
    for level in reversed(range(self.depth)):
      width = self.base_width * 2**level
      x = nn.ConvTranspose(width, (2, 2), strides=(2, 2), dtype=self.dtype,
                           name=f'upconv{level + 1}')(x)
      x = jnp.concatenate([skips[level], x], axis=-1)
      x = block(width, f'up{level + 1}')(x, train=train)
      self.sow('intermediates', f'dec{level + 1}', x)
    features = x
    self.sow('intermediates', 'features', features)
    x = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name='head')(x)
    logits = x.astype(jnp.promote_types(self.dtype, jnp.float32))
    return (logits, features) if return_features else logits


def dice_loss(logits: jax.Array, masks: jax.Array, *, smooth: float = 1.0,
              weights: jax.Array | None = None) -> jax.Array:
  """Soft Dice loss of sigmoid(logits) against masks, 1 - mean Dice over images and masks.

  Paper 004's Eq. (2): dice = 2 |M_gt n M_prob| / (|M_gt| + |M_prob|), computed per image and
  mask channel with probabilities in place of the binary prediction, `smooth` added to the
  numerator and denominator (an empty mask predicted empty scores 1, not 0/0).

  Args:
    logits: [B, H, W, K] per-pixel logits.
    masks: [B, H, W, K] targets in [0, 1].
    smooth: additive smoothing.
    weights: optional [B] per-image weights (e.g. 0 for padded examples).

  Returns:
    A scalar: ~0 for a perfect prediction, ~1 for a disjoint one.
  """
  dice = losses.soft_dice_per_structure(logits, masks, smooth)  # [B, K]
  per_image = 1.0 - jnp.mean(dice, axis=-1)
  if weights is None:
    return jnp.mean(per_image)
  weights = weights.astype(jnp.float32)
  return jnp.sum(per_image * weights) / jnp.maximum(jnp.sum(weights), 1e-12)
