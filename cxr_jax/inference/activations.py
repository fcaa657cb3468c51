"""Paper 003's visualisations of a trained run: layers by name, their activations, filters,
activation maximisation, and the figure set (cxr_jax/explain/activations.py draws).

Layer names are those the model sows into 'intermediates' (after the ReLU): `conv1` ...
`conv5` for the custom CNN and AlexNet, `conv1_1` ... `conv5_3` / `conv5_4` (and `conv1` ...
`conv5` = each block's last) for VGG, `lrn1`, `pool1`, ..., `features`; 'logits' is the last FC
layer (FC3 / fc8) before the softmax.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from cxr_jax.explain import activations as A
from cxr_jax.inference.predictor import Predictor, find_sown
from cxr_jax.inference.run import RunError

LOGITS = 'logits'


def _sown_names(tree: Any, ndim: int | None = None, out: dict | None = None) -> dict[str, int]:
  """{sown name: ndim} of every sown value (first occurrence, depth first)."""
  out = {} if out is None else out
  for name, value in tree.items():
    if isinstance(value, tuple) and value and hasattr(value[0], 'ndim'):
      if (ndim is None or value[0].ndim == ndim) and name not in out:
        out[name] = int(value[0].ndim)
    elif isinstance(value, dict):
      _sown_names(value, ndim, out)
  return out


def map_layers(predictor: Predictor) -> list[str]:
  """Names of the model's sown activation maps [B, h, w, C], in the order it sows them."""
  x = np.zeros((1, *predictor.image_shape), np.float32)
  _, inter = predictor.forward(x)
  return list(_sown_names(inter, ndim=4))


def check_layer(predictor: Predictor, layer: str) -> None:
  """RunError naming the valid layers unless `layer` is an activation map of the model."""
  valid = map_layers(predictor)
  if layer not in valid:
    raise RunError(f'--layer={layer!r}: not a layer of {predictor.model_name} (stage '
                   f'{predictor.stage!r}); valid layers: {", ".join(valid)}.')


def layer_activations(predictor: Predictor, x: np.ndarray, layer: str) -> np.ndarray:
  """Post-ReLU activations [h, w, C] of `layer` for one preprocessed image x [H, W, C]."""
  _, inter = predictor.forward(np.asarray(x, np.float32)[None])
  found = find_sown(inter, layer, ndim=4)
  if found is None:
    check_layer(predictor, layer)
  return np.asarray(found[0], np.float32)


def check_channel(acts: np.ndarray, channel: int, layer: str) -> None:
  c = acts.shape[-1]
  if not 0 <= channel < c:
    raise RunError(f'--channel={channel}: {layer} has {c} channels (0 ... {c - 1}, 0-based).')


def layer_fn(predictor: Predictor, layer: str) -> Callable[[jax.Array], jax.Array]:
  """images [N, H, W, C] -> activations of `layer` [N, h, w, C] (or logits [N, K])."""
  model, variables = predictor.model, predictor.variables
  if layer == LOGITS:
    return lambda x: model.apply(variables, x, train=False)

  def fn(x):
    _, state = model.apply(variables, x, train=False, mutable=['intermediates'])
    found = find_sown(state['intermediates'], layer, ndim=4)
    if found is None:
      raise RunError(f'layer {layer!r} not sown by {predictor.model_name}')
    return found
  return fn


def conv_kernel(predictor: Predictor, layer: str) -> np.ndarray:
  """The kernel [kh, kw, C_in, C_out] of the convolution whose ReLU output is `layer`.

  Found by running the model once with every module's output captured and matching
  relu(conv output) to the sown map, so no per-model table of names is needed.
  """
  model, variables = predictor.model, predictor.variables
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, *predictor.image_shape)).astype(np.float32)
  _, state = model.apply(variables, x, train=False, mutable=['intermediates'],
                         capture_intermediates=True)
  inter = state['intermediates']
  target = find_sown(inter, layer, ndim=4)
  if target is None:
    check_layer(predictor, layer)
  params = variables['params']
  for name, value in inter.items():
    out = value.get('__call__') if isinstance(value, dict) else None
    kernel = params.get(name, {}).get('kernel') if isinstance(params.get(name), dict) else None
    if out is None or kernel is None or np.ndim(kernel) != 4:
      continue
    out = np.asarray(out[0])
    if out.shape == target.shape and np.allclose(np.maximum(out, 0), target, atol=1e-5):
      return np.asarray(kernel, np.float32)
  raise RunError(f'{layer!r} is not the output of one convolution of {predictor.model_name}.')


def filter_panel(predictor: Predictor, layer: str, *, num: int = 16, steps: int = 30
                 ) -> np.ndarray:
  """Fig. 2 panel of `layer`: all its filters' weights (C_in 1 or 3) or, deeper, images
  maximising its first `num` channels (activation maximisation), tiled."""
  kernel = conv_kernel(predictor, layer)
  if kernel.shape[2] in (1, 3):
    return A.tile(A.filter_images(kernel))
  n = min(num, kernel.shape[3])
  images = A.maximize_activation(layer_fn(predictor, layer), range(n), predictor.image_shape,
                                 steps=steps)
  return A.tile(A.synthesized_images(images))


def class_visualization(predictor: Predictor, *, steps: int = 30) -> list[A.Panel]:
  """Fig. 2 (i)-(l): one image per class maximising its logit (FC3 / fc8)."""
  names = predictor.class_names
  images = A.maximize_activation(layer_fn(predictor, LOGITS), range(len(names)),
                                 predictor.image_shape, steps=steps)
  return [(f'FC3: {n}', img) for n, img in zip(names, A.synthesized_images(images),
                                                 strict=True)]


def display_image(x: np.ndarray) -> np.ndarray:
  """A preprocessed model input [H, W, C] as grey [H, W] in [0, 1] (what the model saw)."""
  return A.scale01(np.asarray(x, np.float32).mean(axis=-1))


@dataclasses.dataclass(frozen=True)
class ActivationSettings:
  """Fig. 3/4 settings (cxr_jax/explain/activations.py for the readings)."""

  layer: str = 'conv5'
  channels: tuple[int, ...] = ()  # grid channels (): all
  threshold: float = A.DEFAULT_THRESHOLD
  steps: int = A.DEFAULT_STEPS
  alpha: float = A.DEFAULT_ALPHA


def activation_panels(predictor: Predictor, x: np.ndarray, settings: ActivationSettings, *,
                      channel: int | None = None, roi: np.ndarray | None = None
                      ) -> tuple[list[A.Panel], int]:
  """Fig. 3 + 4 for one image: (original, activation grid of the layer, the channel, its
  heat map over the image) and the channel shown (`channel`, else the strongest)."""
  acts = layer_activations(predictor, x, settings.layer)
  if channel is None:
    channel = A.strongest_channel(acts, roi)
  check_channel(acts, channel, settings.layer)
  image = display_image(x)
  grid = A.activation_grid(acts, settings.channels or None)
  heat = A.overlay(image, acts[..., channel], threshold=settings.threshold,
                   steps=settings.steps, alpha=settings.alpha)
  return [('input', image), (f'{settings.layer} ({acts.shape[-1]} channels, ReLU)', grid),
          (f'{settings.layer} channel {channel}', A.scale01(acts[..., channel])),
          (f'channel {channel} over the image', heat)], channel


def figure_set(predictors: Sequence[tuple[str, Predictor]], image: np.ndarray, *,
               filter_layers: Sequence[Sequence[str]], last_layers: Sequence[str],
               channels: Sequence[int | None] = (), num_filters: int = 16, steps: int = 30,
               settings: ActivationSettings = ActivationSettings()) -> dict[str, bytes]:
  """The paper's Fig. 2, 3 and 4 for several models side by side (one row each) on one
  grey X-ray [H, W] in [0, 1]: {'fig2_filters': PNG, 'fig3_activations': PNG,
  'fig4_heatmaps': PNG}. filter_layers[m]: the two layers of model m shown as filters (conv1,
  conv3 / conv1_2, conv3_3 ...), last_layers[m]: its last convolution; channels[m]: the channel
  of Fig. 4 (None: the strongest)."""
  labels = [label for label, _ in predictors]
  fig2, fig3, fig4 = [], [], []
  for m, (_, predictor) in enumerate(predictors):
    fig2.append([(f'{layer}', filter_panel(predictor, layer, num=num_filters, steps=steps))
                 for layer in filter_layers[m]] + class_visualization(predictor, steps=steps))
    x = predictor.preprocess(image)
    chosen = channels[m] if m < len(channels) else None
    panels, channel = activation_panels(
        predictor, x, dataclasses.replace(settings, layer=last_layers[m]), channel=chosen)
    fig3.append(panels[:3])
    fig4.append([panels[0], panels[3]])
  return {
      'fig2_filters': A.png_bytes(A.figure(fig2, row_labels=labels,
                                           suptitle='Fig. 2: filters and FC3 class visualisation')),
      'fig3_activations': A.png_bytes(A.figure(fig3, row_labels=labels,
                                               suptitle='Fig. 3: last convolution (post-ReLU)')),
      'fig4_heatmaps': A.png_bytes(A.figure(fig4, row_labels=labels,
                                            suptitle='Fig. 4: strongest channel over the X-ray')),
  }
