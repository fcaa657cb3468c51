"""Recurrent (LSTM) soft attention over a feature map: the attention branch of paper 000.

Paper 000 (Saednia et al., section II-B-2) feeds the classifier's last feature map to an LSTM
that, "inspired by" the CNN-RNN of its reference [11] and by Show, Attend and Tell (Xu et al.
2015, its reference [10]), produces a class-probability vector at every time step from the
previous hidden state, the previous step's class-probability vector and an attention context
vector; the last step's sigmoid output, thresholded, is the prediction. The paper gives no
equations, so this module writes down the standard soft-attention reading:

  annotation vectors  a_i = features[:, y, x, :] (C channels), i = 1..L, L = h * w
  initial state       c_0 = tanh(W_c mean_i(a_i) + b_c),  h_0 = tanh(W_h0 mean_i(a_i) + b_h0)
  for t = 1..T:
    score             e_t,i = v^T tanh(W_a a_i + b_a + W_s h_{t-1})      (additive, Bahdanau)
    attention         alpha_t = softmax_i(e_t)                           (sums to 1 over L)
    context           z_t = sum_i alpha_t,i a_i
    LSTM step         (c_t, h_t) = LSTM((c_{t-1}, h_{t-1}), concat(p_{t-1}, z_t))
    class logits      s_t = W_o h_t + b_o,  p_t = sigmoid(s_t)

Readings chosen where the paper is silent or ambiguous:
- Soft (deterministic) attention, not the stochastic "hard" variant of Show, Attend and Tell:
  the paper trains with plain cross entropy and Adam, which fits soft attention trained by
  backpropagation; there is no sampling here, so the module needs no random key.
- The initial state: "The hidden activation of LSTM was a linear projection of the stochastic
  context vector followed by a tanh activation function" is read as Show, Attend and Tell's
  initialisation (c_0 and h_0 predicted from the mean annotation vector, the expected context
  under uniform attention), each by its own dense layer + tanh (one layer rather than an MLP).
- p_0 = zeros (no class evidence before the first glimpse), the usual start input of a CNN-RNN.
  A constant or learned p_0 would only add a step-1 offset to the LSTM gates, which the learned
  initial state can already shift. Gradients flow through p_{t-1} into earlier steps.
- Hidden size 16: the paper's "output unit size of 16 before the fully-connected layer", i.e. the
  LSTM's h_t (16 units) feeds one dense layer to the K logits. The same dense layer serves every
  step, so each step's logits are comparable and any step can be supervised.
- attention_size (64) is the width of the additive score's hidden layer (W_a, W_s project to it);
  the paper does not give one. 64 keeps the branch small next to C = 1024 channels.
- T = 3 steps by default (the paper does not state T).
- feedback='none' drops p_{t-1} from the LSTM input (an ablation of the class feedback).

The flax LSTM cell is `nn.OptimizedLSTMCell` (fused gate matmuls, same parameters and results as
`nn.LSTMCell`: gates i, f, g, o; c' = f c + i g; h' = o tanh(c')). Computation runs in `dtype`;
parameters, the softmax and all outputs are float32.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

FEEDBACK_MODES = ('probs', 'none')


class LSTMAttention(nn.Module):
  """LSTM with additive soft attention over the h*w locations of a feature map.

  Attributes:
    num_classes: K, the number of sigmoid outputs per step.
    num_steps: T, the number of glimpses (LSTM steps).
    hidden_size: LSTM state size; the dense classifier reads these units.
    attention_size: hidden width of the additive attention score.
    feedback: 'probs' feeds the previous step's class probabilities into the LSTM (the paper);
      'none' feeds only the context vector (ablation).
    dtype: compute dtype; parameters stay float32, outputs are float32.
  """

  num_classes: int
  num_steps: int = 3
  hidden_size: int = 16
  attention_size: int = 64
  feedback: str = 'probs'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array) -> dict[str, jax.Array]:
    """Runs T attention steps over a feature map.

    Args:
      features: annotation vectors [B, h, w, C] (any h, w, C).

    Returns:
      {'logits': [B, T, K], 'probs': [B, T, K] sigmoid of the logits,
       'attention': [B, T, h, w] weights over locations, non-negative, summing to 1 per step},
      all float32. The prediction is the last step: logits[:, -1].
    """
    if features.ndim != 4:
      raise ValueError(f'LSTMAttention expects features [B, h, w, C]; got shape {features.shape}')
    if self.feedback not in FEEDBACK_MODES:
      raise ValueError(f'LSTMAttention.feedback={self.feedback!r}; valid: {list(FEEDBACK_MODES)}')
    if self.num_steps < 1:
      raise ValueError(f'LSTMAttention.num_steps must be >= 1; got {self.num_steps}')
    batch, height, width, channels = features.shape
    dense = lambda n, name, use_bias=True: nn.Dense(n, use_bias=use_bias, dtype=self.dtype,
                                                    name=name)

    annotations = features.reshape(batch, height * width, channels).astype(self.dtype)
    mean_annotation = jnp.mean(annotations, axis=1)  # [B, C]
    c = jnp.tanh(dense(self.hidden_size, 'init_c')(mean_annotation))
    h = jnp.tanh(dense(self.hidden_size, 'init_h')(mean_annotation))

    # W_a a_i + b_a does not depend on the step: project every location once.
    projected = dense(self.attention_size, 'attention_features')(annotations)  # [B, L, A]
    attention_hidden = dense(self.attention_size, 'attention_hidden', use_bias=False)
    # A bias on the score would cancel in the softmax.
    attention_score = dense(1, 'attention_score', use_bias=False)
    cell = nn.OptimizedLSTMCell(self.hidden_size, dtype=self.dtype, name='lstm')
    classifier = dense(self.num_classes, 'classifier')

    probs = jnp.zeros((batch, self.num_classes), jnp.float32)  # p_0
    step_logits, step_probs, step_attention = [], [], []
    # T is small (3): a Python loop unrolls into one straight-line program, clearer than nn.scan.
    for _ in range(self.num_steps):
      scores = attention_score(jnp.tanh(projected + attention_hidden(h)[:, None, :]))[..., 0]
      # Softmax in float32: in bfloat16 the weights of many near-equal locations lose their sum.
      alpha = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)  # [B, L]
      context = jnp.einsum('bl,blc->bc', alpha.astype(self.dtype), annotations)  # [B, C]
      if self.feedback == 'probs':
        lstm_input = jnp.concatenate([probs.astype(self.dtype), context], axis=-1)
      else:
        lstm_input = context
      (c, h), out = cell((c, h), lstm_input)
      logits = classifier(out).astype(jnp.float32)
      probs = jax.nn.sigmoid(logits)
      step_logits.append(logits)
      step_probs.append(probs)
      step_attention.append(alpha.reshape(batch, height, width))
    return {
        'logits': jnp.stack(step_logits, axis=1),
        'probs': jnp.stack(step_probs, axis=1),
        'attention': jnp.stack(step_attention, axis=1),
    }
