"""The heat-map methods the viewer offers, in a registry: one entry per method.

A method says whether a model supports it and computes its maps for one analysed image: one map
per class (CAM, Grad-CAM, PDA) or a few class-independent ones (the attention of each recurrent
step). Another method (e.g. paper 003's activation maps) is one more `METHODS.register` call
with a `Method`; the page lists whatever the served model supports.

Long methods (`slow`) run as cancellable jobs: they call `ctx.progress(fraction)`, which raises
`Cancelled` once the user cancelled.
"""

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from cxr_jax import inference
from cxr_jax.inference import Predictor
from cxr_jax.registry import Registry


class Cancelled(Exception):
  """The user cancelled a job."""


@dataclasses.dataclass(frozen=True)
class Maps:
  """A method's maps for one image: maps [M, h, w]; per_class: M is the number of classes
  (indexed like the model's classes), else M class-independent steps. signed: the values mean
  evidence for (> 0) and against (< 0), so boxes come from the positive part."""

  maps: np.ndarray
  per_class: bool
  colorbar: str
  signed: bool = False
  step_names: tuple[str, ...] = ()


@dataclasses.dataclass
class Context:
  """What a method gets: the model, the preprocessed image x [H, W, C], its forward pass's
  intermediates, per-model state shared by every analysis (e.g. PDA's fitted sampler), and the
  progress callback (raises Cancelled)."""

  predictor: Predictor
  x: np.ndarray
  inter: dict[str, Any]
  state: 'RunState'
  progress: Callable[[float], None] = lambda fraction: None


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  label: str
  description: str
  supported: Callable[[Predictor], bool]
  compute: Callable[[Context], Maps]
  slow: bool = False


METHODS: Registry[Method] = Registry('heat map method')
_ORDER: list[str] = []  # registration order: the order of the page's list


def register(method: Method) -> Method:
  """Adds a method to the viewer (a second one of the same name is an error)."""
  METHODS.register(method.name)(method)
  _ORDER.append(method.name)
  return method


def supported_methods(predictor: Predictor) -> list[Method]:
  """The registered methods the model supports, in registration order."""
  return [METHODS.get(n) for n in _ORDER if METHODS.get(n).supported(predictor)]


class RunState:
  """Per served model: lazily fitted PDA sampler, one PDA at a time, its progress sink."""

  def __init__(self, pda_reference: list[str] | None = None):
    self.pda_reference = pda_reference  # image files to fit PDA's sampler on (else training)
    self.lock = threading.Lock()
    self.pda_lock = threading.Lock()
    self.values: dict[str, Any] = {}
    self._sink: Callable[[int], None] | None = None
    self._wrapped: dict[int, Callable] = {}

  def get(self, key: str, make: Callable[[], Any]) -> Any:
    with self.lock:
      if key not in self.values:
        self.values[key] = make()
      return self.values[key]

  def counted(self, fn: Callable) -> Callable:
    """fn wrapped to report each batch it evaluates to the current sink; one wrapper per fn,
    so PDA's compiled program is reused."""
    if id(fn) not in self._wrapped:
      def wrapped(x):
        jax.debug.callback(self._tick, x.shape[0])
        return fn(x)
      self._wrapped[id(fn)] = wrapped
    return self._wrapped[id(fn)]

  def _tick(self, n) -> None:
    if self._sink is not None:
      self._sink(int(n))


# ------------------------------------------------------------------------------ methods
def _cam(kind: str) -> Callable[[Context], Maps]:
  def compute(ctx: Context) -> Maps:
    maps = inference.class_heatmaps(ctx.predictor, ctx.inter, kind)[0]  # [h, w, K]
    return Maps(np.moveaxis(maps, -1, 0), True,
                f'{kind.replace("_", "-").upper()} (class score)')
  return compute


def _attention(ctx: Context) -> Maps:
  maps = ctx.predictor.attention_maps(ctx.inter)[0]  # [T, h, w]
  return Maps(maps, False, 'attention weight',
              step_names=tuple(f'step {t + 1}' for t in range(len(maps))))


def _pda(ctx: Context) -> Maps:
  predictor = ctx.predictor
  settings = inference.PDASettings.from_config(predictor.config_section('explain'))
  ctx.progress(0.0)

  def fit():
    if ctx.state.pda_reference:
      from cxr_jax import imageio
      images = (predictor.preprocess(imageio.read_image(p)[0]) for p in ctx.state.pda_reference)
    else:
      images = inference.training_images(predictor, settings.num_reference)
    return inference.fit_pda_sampler(settings,
                                     inference.reference_maps(predictor, settings, images))

  sampler = ctx.state.get('pda_sampler', fit)
  shape = (predictor.feature_maps(ctx.inter).shape[1:3] if settings.level == 'features'
           else ctx.x.shape[:2])
  from cxr_jax.explain import prediction_difference as pda
  total = pda.num_forward_passes(tuple(shape), settings.window, settings.stride,
                                 settings.num_samples)
  done, cancelled = [0], [False]

  def sink(n: int) -> None:
    done[0] += n
    try:
      ctx.progress(min(0.99, done[0] / total))
    except Cancelled:
      cancelled[0] = True  # raised inside the compiled loop: it stops there
      raise

  with ctx.state.pda_lock:  # one PDA per model at a time: the sink is the model's
    ctx.state._sink = sink
    try:
      # The key predict uses for its first image, so both give the same map.
      key = jax.random.fold_in(jax.random.key(settings.seed), 0)
      relevance = inference.pda_heatmaps(predictor, ctx.x, sampler, settings, key,
                                         wrap=ctx.state.counted)
    except Exception:
      if cancelled[0]:
        raise Cancelled() from None
      raise
    finally:
      ctx.state._sink = None
  return Maps(relevance, True, 'contribution to the decision (bits of evidence)', signed=True)


register(Method('attention', 'Attention (recurrent steps)',
                'where each step of the recurrent attention looked (paper 000, Fig. 3)',
                lambda p: p.supports('attention'), _attention))
register(Method('cam', 'CAM', 'class activation map of the linear head (Zhou et al. 2016)',
                lambda p: p.supports('cam'), _cam('cam')))
register(Method('grad_cam', 'Grad-CAM', 'gradient-weighted class activation map '
                '(Selvaraju et al. 2017)', lambda p: p.supports('grad_cam'), _cam('grad_cam')))
register(Method('pda', 'PDA', 'prediction difference analysis on the last feature map '
                '(Zintgraf et al. 2017; paper 000, Fig. 2); takes longer',
                lambda p: p.supports('pda'), _pda, slow=True))
