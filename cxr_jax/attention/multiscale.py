"""Paper 004's multi-scale spatial attention on the input image (section 3.2, Fig. 2).

The paper: "a spatial feature hierarchy consisting of two convolutional layers with a kernel
step of 2 and three blocks of calculating maximum and average across channels ... convoluted
into a feature map of 1 x 224 x 224 ... After a sigmoid activation function, the feature map is
merged into the original chest X-ray image by element-wise multiplication"; section 4: "apart
from the original image as one feature, we adopt two convolutions of kernel size 5, 9 to
generate the other two features".

The text contradicts itself on the stride (a stride of 2 cannot give a 224 x 224 map without
upsampling), so the default is read from the released code (CXRDC `net/CXRNet.py`,
`MultiScaleAttention`):

  s0 = x;  s1 = conv5x5(x);  s2 = conv9x9(x)         3 -> 3 channels, stride 1, 'same', no bias
  a  = [max_c s0, mean_c s0, max_c s1, mean_c s1, max_c s2, mean_c s2]          [B, H, W, 6]
  m  = sigmoid(conv3x3(a))                                      6 -> 1, 'same', no bias
  out = m * x                                                                    [B, H, W, C]

`stride=2` is the text's reading: the two convolutions step by 2, their channel max and mean
maps are upsampled back to H x W (bilinear, half-pixel centres) before the 3 x 3 convolution.
Parameters: `scale_conv1` (5 x 5), `scale_conv2` (9 x 9), `agg_conv` (3 x 3). The attention map
[B, H, W, 1] is sown into 'intermediates' as 'msa_map'.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def channel_max_mean(x: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, H, W, 2]: the maximum and the mean across channels."""
  return jnp.concatenate([jnp.max(x, axis=-1, keepdims=True),
                          jnp.mean(x, axis=-1, keepdims=True)], axis=-1)


class MultiScaleAttention(nn.Module):
  """Multi-scale spatial attention: images [B, H, W, C] -> attended images [B, H, W, C].

  Attributes:
    kernel_sizes: the convolutions beside the image itself (5 and 9 in the paper).
    stride: 1 (released code, default) or 2 (the text's "kernel step of 2").
    agg_kernel: kernel of the convolution mixing the 2 x (1 + len(kernel_sizes)) maps.
    dtype: compute dtype.
  """

  kernel_sizes: tuple[int, ...] = (5, 9)
  stride: int = 1
  agg_kernel: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.stride not in (1, 2):
      raise ValueError(f'MultiScaleAttention(stride={self.stride}): expected 1 (released code) '
                       'or 2 (the text).')
    b, h, w, c = x.shape
    x = x.astype(self.dtype)
    maps = [channel_max_mean(x)]
    for i, k in enumerate(self.kernel_sizes, start=1):
      # torch's Conv2d(3, 3, k, padding=k // 2): symmetric padding, same output size at stride 1.
      y = nn.Conv(c, (k, k), strides=self.stride, padding=((k // 2, k // 2),) * 2,
                  use_bias=False, dtype=self.dtype, name=f'scale_conv{i}')(x)
      y = channel_max_mean(y)
      if y.shape[1:3] != (h, w):
        y = jax.image.resize(y, (b, h, w, 2), 'bilinear')
      maps.append(y)
    a = jnp.concatenate(maps, axis=-1)
    k = self.agg_kernel
    m = nn.sigmoid(nn.Conv(1, (k, k), padding=((k // 2, k // 2),) * 2, use_bias=False,
                           dtype=self.dtype, name='agg_conv')(a))
    self.sow('intermediates', 'msa_map', m)
    return m * x
