"""Paper 000's attention-guided model: a MobileNet v1 classifier plus recurrent attention.

The MobileNet (`backbone`, trained in stage 1 and frozen by default in stage 2) yields the last
feature map before pooling; the LSTM attention branch (`lstm_attention`, see
cxr_jax/attention/lstm_attention.py) attends over its h*w locations for T steps and the last
step's logits are the model's output. Per-step attention weights and logits are sown into the
'intermediates' collection ('attention' [B, T, h, w], 'step_logits' [B, T, K]) for heat maps.
"""

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxr_jax.attention.lstm_attention import LSTMAttention
from cxr_jax.models import MODELS
from cxr_jax.models.mobilenet import MOBILENET_V1_BLOCKS, MobileNetV1


@MODELS.register('mobilenet_lstm_attention')
class MobileNetLSTMAttention(nn.Module):
  """Attributes: the backbone's (width_multiplier, activation, dropout_rate, blocks,
  depthwise_impl, output_stride: see MobileNetV1; output_stride sets the h x w locations the
  attention chooses from, e.g. 8 x 8 at 64 px with 8) and the attention branch's (num_steps,
  hidden_size, attention_size, feedback); freeze_backbone keeps the backbone's weights and
  BatchNorm statistics fixed (paper 000 trains the branch on the trained classifier's feature
  maps)."""

  num_classes: int
  width_multiplier: float = 1.0
  activation: str = 'relu'
  dropout_rate: float = 0.0
  blocks: Sequence[tuple[int, int]] = MOBILENET_V1_BLOCKS
  depthwise_impl: str = 'shifts'
  output_stride: int = 32
  num_steps: int = 3
  hidden_size: int = 16
  attention_size: int = 64
  feedback: str = 'probs'
  freeze_backbone: bool = True
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  def setup(self):
    self.backbone = MobileNetV1(
        num_classes=self.num_classes, width_multiplier=self.width_multiplier,
        activation=self.activation, dropout_rate=self.dropout_rate, blocks=self.blocks,
        depthwise_impl=self.depthwise_impl, output_stride=self.output_stride, dtype=self.dtype,
        bn_axis_name=self.bn_axis_name)
    self.lstm_attention = LSTMAttention(
        num_classes=self.num_classes, num_steps=self.num_steps, hidden_size=self.hidden_size,
        attention_size=self.attention_size, feedback=self.feedback, dtype=self.dtype)

  def features(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Images [B, H, W, C] -> the backbone's last feature map [B, h, w, C']."""
    _, feats = self.backbone(x, train=train and not self.freeze_backbone, return_features=True)
    return jax.lax.stop_gradient(feats) if self.freeze_backbone else feats

  def attend(self, features: jax.Array) -> dict[str, jax.Array]:
    """Feature map [B, h, w, C'] -> {'logits' [B, T, K], 'probs', 'attention' [B, T, h, w]}."""
    return self.lstm_attention(features)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Images [B, H, W, C] -> logits of the last attention step [B, K] (float32)."""
    out = self.attend(self.features(x, train=train))
    self.sow('intermediates', 'attention', out['attention'])
    self.sow('intermediates', 'step_logits', out['logits'])
    return out['logits'][:, -1].astype(jnp.promote_types(self.dtype, jnp.float32))


def attention_head_fn(model: MobileNetLSTMAttention,
                      variables: dict) -> Callable[[jax.Array], jax.Array]:
  """Feature map [N, h, w, C'] -> final-step logits [N, K]: the part feature-level PDA reruns."""
  def fn(features: jax.Array) -> jax.Array:
    out = model.apply(variables, features, method=MobileNetLSTMAttention.attend)
    return out['logits'][:, -1].astype(jnp.float32)
  return fn


head_fn = attention_head_fn  # the name `models.model_function` looks up
