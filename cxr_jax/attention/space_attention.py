r"""Space attention module of paper 001 (Ma et al., section 3.2): global and local features fused.

The last feature map [B, h, w, C] (7 x 7 for ResNet-101 at 224 px) is global-average-pooled to a
vector, the vector is tiled back to h x w ("resize it to 7 x 7", ParseNet's unpooling) and
concatenated with the local features, so every location carries [local C | global C] features.
The paper insists on no convolution between pooling and tiling. A 1 x 1 classifier then scores
every location and the scores are average-pooled into the image's logits: the class score map
[B, h, w, K] before that last pooling is the paper's heat map ("computed from the model without
the last average pooling", Fig. 4 right).

`pool='before_classifier'` is Fig. 4's other placement (average pooling between ResNet5c and the
classifier). The classifier is linear, so both placements compute the same logits from the same
parameters (mean over locations commutes with a linear map; a test checks it); they differ in
what the model exposes: only the 'after_classifier' head sows its class score map.

What the head computes, as the paper describes it (`normalize=False`)
---------------------------------------------------------------------
Write the classifier kernel [2C, K] as its local and global halves, W = [W_l; W_g], the local
features f_ij [C] and their mean g = mean_ij f_ij. The class score map and the logits are

    s_ij = f_ij W_l + g W_g + b,        logits = mean_ij s_ij = g (W_l + W_g) + b.

So the head is GAP + a dense layer with the effective kernel W_e = W_l + W_g: it adds no
capacity over the baseline's GAP + `fc`. Per image, dL/dW_l = g^T dL/dlogits = dL/dW_g: both
halves get the same gradient, and any optimiser whose update of a parameter depends only on that
parameter's gradient history and value (SGD, momentum, Adam) moves them by the same amount.
Hence
- the difference D = W_l - W_g never learns: without weight decay it keeps its initial value;
  L2 decay only shrinks it geometrically (paper 001's recipe: lr 0.01 then 0.001 with momentum
  0.9, i.e. steps of lr / 0.1, decay 1e-4, 20 + 10 epochs of ~811 steps: D keeps
  exp(-0.1 * 1e-4 * 16220 - 0.01 * 1e-4 * 8110) ~ 84% of its initial value);
- W_e moves twice as far per step as a single dense layer would: the head is the baseline's with
  the classifier's learning rate doubled (BSL+FAM vs BSL+FAM+SAM in Table 1 compares that, not
  global/local fusion);
- the exposed map is s_ij = f_ij (W_e + D) / 2 + g W_g + b: the CAM of W_e / 2, plus the CAM of
  D / 2, plus a constant per image and class (gone after a heat map's min-max normalisation).
  With independent random halves (flax's default LeCun-normal over fan-in 2C,
  `classifier_init='lecun'`), D has the same scale as W_e at initialisation, so the heat map
  carries a CAM of init noise for the whole run.

Initialisation (`classifier_init`). 'tied' (default) draws W_0 ~ LeCun-normal with fan-in C
(the baseline's `fc` initialisation) and sets W_l = W_g = W_0 / 2. Then W_e = W_0 starts
exactly as the baseline classifier does (same backbone gradients at step 0, unlike a zero
kernel), D = 0 and stays 0 up to float rounding (identical gradients, identical values), and the
exposed map is the CAM of the effective classifier, W_e / 2, plus the per-image constant
g W_g + b: no init noise.
'zeros' (zero kernel) has the same property but the backbone gets no gradient through the head
at step 0; 'lecun' is the plain `nn.Dense` initialisation (independent halves, the behaviour
described above, kept for comparison and for reproducing older runs). The parameters are
`classifier/kernel` [2C, K] and `classifier/bias` [K] under every init, so checkpoints and weight
import are unaffected.

ParseNet normalisation (`normalize=True`, not in paper 001's text)
------------------------------------------------------------------
Paper 001 cites ParseNet (Liu, Rabinovich, Berg 2015, its ref. [16]) for the fusion. ParseNet
L2-normalises each branch over channels before concatenating (the global vector after pooling,
the local feature at every location) and multiplies each by a learned per-channel scale:

    s_ij = (a * f_ij / |f_ij|) W_l + (c * g / |g|) W_g + b,      a, c [C] learned,

`local_scale` = a and `global_scale` = c (parameters of this module, present only with
normalisation). The mean over locations of f_ij / |f_ij| is not a function of g, so W_l and W_g
now see different inputs, get different gradients, and the logits depend on more than the GAP
vector: the head gains capacity. Both pool placements still agree (the classifier is still linear
in the fused features) and the score map still averages to the logits. The local map becomes a
score of each location's feature direction, its magnitude divided out.
Scales start at 10 (`norm_scale_init`): ParseNet reports that unit-norm features (entries
~ 1 / sqrt(C)) barely train and that scaling them to a norm of 10 or 20 learns well (SSD uses 20
on conv4_3); we take ParseNet's lower value (a choice, not tuned here). With 'tied' init,
W_l = W_g only at step 0. `NORM_EPS` is added
to the squared norm, so an all-zero location (possible after ReLU) maps to zero instead of NaN
and its gradient stays bounded (<= 1 / sqrt(NORM_EPS) = 1e3 times the upstream gradient).
The normalisation runs in float32 whatever the compute dtype: a bfloat16 sum of C squares loses
the norm's low bits.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

POOLS = ('after_classifier', 'before_classifier')
INITS = ('tied', 'zeros', 'lecun')
NORM_EPS = 1e-6
NORM_SCALE_INIT = 10.0


def tied_kernel_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32
                     ) -> jax.Array:
  """Kernel [2C, K] whose halves are both W_0 / 2, W_0 [C, K] LeCun-normal (fan-in C): the
  effective kernel W_l + W_g starts as a GAP + dense head's would, W_l - W_g at 0."""
  if len(shape) != 2 or shape[0] % 2:
    raise ValueError(f'tied init needs a [2C, K] kernel, got shape {shape}')
  half = nn.initializers.lecun_normal()(key, (shape[0] // 2, shape[1]), dtype) / 2
  return jnp.concatenate([half, half], axis=0)


KERNEL_INITS: dict[str, Callable[..., jax.Array]] = {
    'tied': tied_kernel_init,
    'zeros': nn.initializers.zeros,
    'lecun': nn.initializers.lecun_normal(),  # nn.Dense's default: fan-in 2C
}


def _l2_normalize(x: jax.Array) -> jax.Array:
  """x [..., C] divided by its L2 norm over channels (float32 or wider)."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + NORM_EPS)


def fuse_global_local(features: jax.Array,
                      scales: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
  """features [B, h, w, C] -> [B, h, w, 2C]: local features, then their global average tiled.

  With `scales` = (local [C], global [C]), ParseNet's variant: each branch L2-normalised over
  channels (the average before normalising) and multiplied by its scale; in `features`' dtype.
  """
  pooled = jnp.mean(features, axis=(1, 2), keepdims=True)
  local, glob = features, pooled
  if scales is not None:
    local = (_l2_normalize(features) * scales[0]).astype(features.dtype)
    glob = (_l2_normalize(pooled) * scales[1]).astype(features.dtype)
  return jnp.concatenate([local, jnp.broadcast_to(glob, features.shape)], axis=-1)


def class_score_map(features: jax.Array, kernel: jax.Array, bias: jax.Array,
                    scales: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
  """features [B, h, w, C] -> class scores [B, h, w, K] of the 1 x 1 classifier (kernel
  [2C, K], bias [K]) on the fused features (`scales`: see `fuse_global_local`)."""
  return fuse_global_local(features, scales) @ kernel + bias


class SpaceAttentionHead(nn.Module):
  """features [B, h, w, C] -> logits [B, K] (float32); sows 'class_scores' [B, h, w, K].

  Attributes:
    num_classes: K.
    pool: 'after_classifier' (paper: score every location, then average) or
      'before_classifier' (average the fused features, then the classifier).
    normalize: ParseNet's L2 normalisation + learned per-channel scale of each branch (module
      docstring); False is the paper's plain concatenation.
    classifier_init: kernel initialisation, 'tied' (W_l = W_g, default), 'zeros' or 'lecun'
      (independent halves; the map then carries init noise, module docstring).
    norm_scale_init: initial value of the branch scales when `normalize`.
    dtype: compute dtype.
  """

  num_classes: int
  pool: str = 'after_classifier'
  normalize: bool = False
  classifier_init: str = 'tied'
  norm_scale_init: float = NORM_SCALE_INIT
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    if self.pool not in POOLS:
      raise ValueError(f'space attention pool={self.pool!r}; valid: {POOLS}')
    if self.classifier_init not in INITS:
      raise ValueError(f'space attention classifier_init={self.classifier_init!r}; '
                       f'valid: {INITS}')
    scales = None
    if self.normalize:
      scale_init = nn.initializers.constant(self.norm_scale_init)
      channels = features.shape[-1]
      scales = (self.param('local_scale', scale_init, (channels,)),
                self.param('global_scale', scale_init, (channels,)))
    fused = fuse_global_local(features.astype(self.dtype), scales)
    # A 1 x 1 convolution is a dense layer over the channel axis.
    classifier = nn.Dense(self.num_classes, dtype=self.dtype,
                          kernel_init=KERNEL_INITS[self.classifier_init], name='classifier')
    if self.pool == 'after_classifier':
      scores = classifier(fused)
      self.sow('intermediates', 'class_scores', scores)
      logits = jnp.mean(scores, axis=(1, 2))
    else:
      logits = classifier(jnp.mean(fused, axis=(1, 2)))
    return logits.astype(jnp.promote_types(self.dtype, jnp.float32))


def _head_node(variables: dict, path: tuple[str, ...]) -> dict:
  node = variables['params']
  for name in path:
    node = node[name]
  return node


def head_params(variables: dict, path: tuple[str, ...]) -> tuple[jax.Array, jax.Array]:
  """(kernel [2C, K], bias [K]) of the head at `path` (e.g. ('space_attention',))."""
  node = _head_node(variables, path)
  return node['classifier']['kernel'], node['classifier']['bias']


def head_scales(variables: dict, path: tuple[str, ...]
                ) -> tuple[jax.Array, jax.Array] | None:
  """(local_scale [C], global_scale [C]) of a normalising head at `path`, None otherwise."""
  node = _head_node(variables, path)
  if 'local_scale' not in node:
    return None
  return node['local_scale'], node['global_scale']
