"""AlexNet in torchvision's layout (the single-tower "one weird trick" variant).

torchvision `alexnet`: conv 64@11x11/4 pad 2 - ReLU - maxpool 3/2; conv 192@5x5 pad 2 - ReLU -
maxpool 3/2; conv 384, 256, 256 @3x3 pad 1, each + ReLU; maxpool 3/2; AdaptiveAvgPool2d(6);
Dropout(0.5) - Linear(9216, 4096) - ReLU - Dropout - Linear(4096, 4096) - ReLU - Linear(4096, K).
Note that torchvision drops out *before* fc6 and fc7 (VGG drops out after them).

Parameters carry torchvision's module names (`features_0`, `features_3`, `features_6`,
`features_8`, `features_10`, `classifier_1`, `classifier_4` and the head `classifier_6`);
activations are sown under the Caffe/Matlab names paper 003 uses. Sown into 'intermediates'
(after the ReLU): `conv1` ... `conv5`, `pool1`, `pool2`,
`pool5`, `features` (= conv5, the last map before pooling), `pooled` [B, 9216], `fc6`, `fc7`.
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxr_jax.models import MODELS, vgg

# (name, channels, kernel, stride, padding, max-pool after) of the five convolutions.
ALEXNET_CONVS: tuple[tuple[str, int, int, int, int, bool], ...] = (
    ('conv1', 64, 11, 4, 2, True), ('conv2', 192, 5, 1, 2, True), ('conv3', 384, 3, 1, 1, False),
    ('conv4', 256, 3, 1, 1, False), ('conv5', 256, 3, 1, 1, True),
)
# torchvision `features.N` index of each convolution.
_TORCH_INDEX = (0, 3, 6, 8, 10)


@MODELS.register('alexnet')
class AlexNet(nn.Module):
  """AlexNet classifier (torchvision layout), 61,100,840 parameters with 1000 classes.

  Attributes:
    num_classes: outputs of the head `classifier_6`.
    dropout_rate: dropout before fc6 and fc7.
    pool_size: AdaptiveAvgPool2d output (6 x 6) before the classifier.
    hidden: fc6/fc7 width.
    dtype: compute dtype; parameters stay float32.
    bn_axis_name: unused (no BatchNorm); accepted so that `build_model` can pass it.
  """

  num_classes: int = 1000
  dropout_rate: float = 0.5
  pool_size: int = 6
  hidden: int = 4096
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False,
               return_features: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Maps images [B, H, W, C] (H, W >= 63) to logits [B, num_classes] (float32).

    With `return_features`, returns (logits, features): conv5's map [B, 13, 13, 256] at 224 px.
    """
    x = x.astype(self.dtype)
    for idx, (name, ch, k, stride, pad, pool) in zip(_TORCH_INDEX, ALEXNET_CONVS, strict=True):
      x = nn.relu(vgg.torch_conv(ch, k, stride=stride, padding=pad, dtype=self.dtype,
                             name=f'features_{idx}')(x))
      self.sow('intermediates', name, x)
      if pool:
        features = x
        x = vgg.max_pool(x, 3, 2)
        self.sow('intermediates', name.replace('conv', 'pool'), x)
    self.sow('intermediates', 'features', features)
    x = vgg.flatten_nhwc(vgg.adaptive_avg_pool2d(x, self.pool_size))
    self.sow('intermediates', 'pooled', x)
    for name, idx in (('fc6', 1), ('fc7', 4)):
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
      x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, kernel_init=vgg.TORCH_LINEAR_INIT,
                           name=f'classifier_{idx}')(x))
      self.sow('intermediates', name, x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=vgg.TORCH_LINEAR_INIT,
                 name='classifier_6')(x)
    logits = x.astype(jnp.promote_types(self.dtype, jnp.float32))
    return (logits, features) if return_features else logits


def from_torchvision(state_dict: Mapping[str, Any], *, num_classes: int | None = None,
                     drop_head: bool = False, in_channels: int = 3) -> dict:
  """torchvision AlexNet state dict -> flax variables {'params': ...} for `AlexNet`.

  Strict: missing, unexpected and wrongly shaped tensors are listed in a ValueError. The first
  FC weight is permuted from torch's (C, H, W) flatten order to our (H, W, C) order.
  `drop_head` leaves the head `classifier_6` out (the caller initialises a new head);
  `in_channels=1` sums the first convolution over RGB.
  """
  entries: list[vgg.TorchTensor] = []
  in_ch = 3
  for idx, (_, ch, k, _, _, _) in zip(_TORCH_INDEX, ALEXNET_CONVS, strict=True):
    convert = vgg.rgb_to_channels(in_channels) if idx == 0 else None
    entries += vgg.conv_entries(f'features.{idx}', f'features_{idx}', in_ch, ch, k,
                            **({'convert': convert} if convert else {}))
    in_ch = ch
  entries += vgg.linear_entries('classifier.1', 'classifier_1', 256 * 6 * 6, 4096,
                                convert=vgg.first_linear_kernel(256, 6, 6))
  entries += vgg.linear_entries('classifier.4', 'classifier_4', 4096, 4096)
  head = ['classifier.6.weight', 'classifier.6.bias']
  k = vgg.head_classes(state_dict, head[0], num_classes, drop_head)
  if not drop_head:
    entries += vgg.linear_entries('classifier.6', 'classifier_6', 4096, k)
  return vgg.convert_state_dict(state_dict, entries, optional=head if drop_head else (),
                                arch='alexnet')


def head_fn(model: AlexNet, variables: dict):
  """features (conv5 after its ReLU) [N, h, w, 256] -> logits [N, K]: pool5, adaptive average
  pool, fc6, fc7, fc8 in eval mode (Grad-CAM)."""
  from cxr_jax.models.custom_cnn import fc_head
  params = variables['params']

  def fn(features: jax.Array) -> jax.Array:
    x = vgg.adaptive_avg_pool2d(vgg.max_pool(features.astype(model.dtype), 3, 2),
                                model.pool_size)
    return fc_head(params, vgg.flatten_nhwc(x), model.dtype)

  return fn
