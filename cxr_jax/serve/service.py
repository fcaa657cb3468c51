"""What the viewer does, without HTTP: served models, analyses of uploads, heat maps, jobs.

`Viewer` holds the models (loaded once), the OOD gates, the optional segmenter, the decoding
workers and a bounded in-memory store of analyses; cxr_jax/serve/app.py maps routes onto it.
Nothing here writes outside the server's temporary folder, and nothing logs an upload's name,
content or DICOM tags.
"""

import base64
import collections
import dataclasses
import importlib
import io
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath
from PIL import Image

from cxr_jax import inference, losses
from cxr_jax.explain import boxes as boxes_lib
from cxr_jax.explain import overlays
from cxr_jax.inference import Predictor, RunError
from cxr_jax.inference import ood as ood_lib
from cxr_jax.serve import decode, methods

log = logging.getLogger('cxr_jax.serve')

HEATMAP_SIZE = 512      # longest side of a heat-map PNG (the page scales it over the X-ray)
SEGMENTER_SIZE = 256    # input side for a segmenter that does not say its own
MAX_CONTOUR_POINTS = 400
ID_PATTERN = re.compile(r'^[0-9a-f]{32}$')
COLORMAP = 'jet'        # as cxr_jax/explain/overlays.py draws


class NotFound(LookupError):
  """An analysis, run, job, class or method the client named does not exist."""


class BadRequest(ValueError):
  """A request the viewer cannot serve; the message says why."""


# ------------------------------------------------------------------------------ runs
@dataclasses.dataclass
class ServedRun:
  """One model on the page: a trained stage, its OOD gate and its methods."""

  label: str
  predictor: Predictor
  gate: Any | None
  gate_summary: dict[str, Any] | None
  state: methods.RunState
  methods: list[methods.Method]

  def info(self) -> dict[str, Any]:
    p = self.predictor
    ood = None
    if self.gate_summary is not None:
      ood = {k: self.gate_summary.get(k) for k in (
          'method', 'threshold', 'false_alarm_rate_target', 'false_alarm_rate_validation',
          'false_alarm_rate_test', 'num_train')}
    return {'label': self.label, 'stage': p.stage, 'model': p.model_name,
            'workdir': os.path.basename(os.fspath(p.workdir).rstrip('/')),
            'classes': list(p.class_names), 'thresholds': [float(t) for t in p.thresholds],
            'threshold_source': p.operating.source, 'input_size': list(p.image_shape[:2]),
            'ood': ood,
            'methods': [{'name': m.name, 'label': m.label, 'description': m.description,
                         'slow': m.slow} for m in self.methods]}


def parse_run_spec(spec: str) -> tuple[str, str | None]:
  """'RUN' or 'RUN:STAGE' -> (workdir, stage or None); an existing folder is always a RUN."""
  if os.path.isdir(spec) or ':' not in spec:
    return spec, None
  workdir, stage = spec.rsplit(':', 1)
  return workdir, stage or None


def load_run(spec: str, pda_reference: list[str] | None = None) -> ServedRun:
  """Loads the model of a `--workdir` value once, with its OOD gate when fit_ood ran."""
  workdir, stage = parse_run_spec(spec)
  predictor = inference.load_predictor(workdir, stage)
  if predictor.needs_lung_masks:
    raise RunError(f'--workdir={spec}: the model of stage {predictor.stage!r} was trained on lung '
                   'ROIs cut from lung masks (paper 003, lung_roi); the viewer does not cut ROIs '
                   'yet: use `python -m cxr_jax.predict --segmentation=UNET_RUN`, or a model '
                   'trained without the ROI (config argument roi=none).')
  found = ood_lib.load_gate(predictor)
  gate, summary = found if found is not None else (None, None)
  name = os.path.basename(os.path.normpath(workdir))
  return ServedRun(f'{name} / {predictor.stage}', predictor, gate, summary,
                   methods.RunState(pda_reference), methods.supported_methods(predictor))


# ------------------------------------------------------------------------------ segmentation
class Segmentation:
  """Lung/heart outlines from a segmenter with `segment(images [N, H, W]) -> [N, H, W, S]`."""

  def __init__(self, segmenter: Any):
    self.segmenter = segmenter
    names = (getattr(segmenter, 'structure_names', None)
             or getattr(segmenter, 'structures', None)
             or getattr(segmenter, 'class_names', None))
    self.lock = threading.Lock()
    self.names = tuple(names) if names else None

  def input_size(self) -> tuple[int, int]:
    size = (getattr(self.segmenter, 'image_size', None)
            or getattr(self.segmenter, 'image_shape', None))
    if size is None:
      return SEGMENTER_SIZE, SEGMENTER_SIZE
    if isinstance(size, int):
      return size, size
    return int(size[0]), int(size[1])

  def contours(self, image: np.ndarray) -> list[dict[str, Any]]:
    """Outlines (probability 0.5) of each structure in image [H, W] grey in [0, 1], as
    polylines of (x, y) in [0, 1] image coordinates."""
    import contourpy
    h, w = self.input_size()
    small = np.asarray(Image.fromarray(np.asarray(image, np.float32), mode='F').resize(
        (w, h), Image.Resampling.BILINEAR), np.float32)
    with self.lock:
      probs = np.asarray(self.segmenter.segment(np.clip(small, 0.0, 1.0)[None]), np.float32)
    if probs.ndim != 4 or probs.shape[0] != 1:
      raise RunError(f'the segmenter returned shape {probs.shape}; expected [1, H, W, S]')
    h, w = probs.shape[1:3]  # a segmenter may answer at its own resolution
    names = self.names or tuple(f'structure {s + 1}' for s in range(probs.shape[-1]))
    out = []
    for s, name in enumerate(names[:probs.shape[-1]]):
      lines = contourpy.contour_generator(z=probs[0, ..., s]).lines(0.5)
      polys = []
      for line in lines:
        line = np.asarray(line, np.float64)
        if len(line) < 3:
          continue
        step = max(1, len(line) // MAX_CONTOUR_POINTS)
        xy = (line[::step] + 0.5) / np.array([w, h])  # pixel centres -> [0, 1]
        polys.append(np.round(xy, 4).tolist())
      out.append({'name': str(name), 'lines': polys})
    return out


def load_segmentation(workdir: str) -> Segmentation:
  """The segmenter of a segmentation run (cxr_jax.inference.segmentation, paper 004)."""
  try:
    module = importlib.import_module('cxr_jax.inference.segmentation')
  except ModuleNotFoundError as e:
    if e.name not in ('cxr_jax.inference.segmentation',):
      raise
    raise RunError(f'--segmentation={workdir}: lung/heart outlines need '
                   'cxr_jax.inference.segmentation (the U-Net segmentation of paper 004), which '
                   'this installation of cxr_jax does not have yet; serve without '
                   '--segmentation.') from None
  return Segmentation(module.load_segmenter(workdir))


# ------------------------------------------------------------------------------ analyses
@dataclasses.dataclass
class RunResult:
  """One model's view of one upload."""

  x: np.ndarray                   # preprocessed model input [H, W, C]
  inter: dict[str, Any]           # its intermediates (host arrays)
  probs: np.ndarray               # [K]
  ood: dict[str, Any] | None
  maps: dict[str, methods.Maps] = dataclasses.field(default_factory=dict)
  lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


@dataclasses.dataclass
class Analysis:
  """One upload: its name (as the client gave it; shown, never used as a path), the image at
  display size [h, w] in [0, 1], the reader's meta, the display PNG, and each model's result."""

  id: str
  name: str
  image: np.ndarray
  original_size: tuple[int, int]
  meta: dict[str, Any]
  png: bytes
  results: list[RunResult]
  contours: list[dict[str, Any]] | None = None
  seconds: float = 0.0


@dataclasses.dataclass
class Job:
  """A slow method on one analysis and model; progress in [0, 1]."""

  id: str
  analysis_id: str
  run: int
  method: str
  state: str = 'queued'   # queued | running | done | error | cancelled
  progress: float = 0.0
  message: str = ''
  cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
  created: float = dataclasses.field(default_factory=time.time)

  def status(self) -> dict[str, Any]:
    return {'job': self.id, 'state': self.state, 'progress': round(self.progress, 4),
            'message': self.message, 'method': self.method, 'run': self.run,
            'analysis': self.analysis_id}


class _Bounded(collections.OrderedDict):
  """An LRU dict holding at most `limit` entries."""

  def __init__(self, limit: int):
    super().__init__()
    self.limit = limit

  def put(self, key: str, value: Any) -> None:
    self[key] = value
    self.move_to_end(key)
    while len(self) > self.limit:
      self.popitem(last=False)


def clean_name(name: str | None) -> str:
  """The client's file name reduced to a label: last path part, printable, at most 120 chars."""
  name = (name or '').replace('\\', '/').rsplit('/', 1)[-1]
  name = ''.join(c for c in name if c.isprintable()).strip()
  return name[:120] or 'upload'


class Viewer:
  """The served models and everything the page asks of them (module doc).

  Args:
    runs: the models, in page order.
    segmentation: outlines of lungs and heart, or None.
    max_upload_bytes: larger uploads are refused.
    decode_workers, decode_timeout_s: the decoding processes and their time limit.
    model_slots: analyses running a model at once (more wait; CPU cores are the limit).
    max_analyses: uploads kept in memory (least recently used dropped first).
  """

  def __init__(self, runs: Sequence[ServedRun], segmentation: Segmentation | None = None, *,
               max_upload_bytes: int = 64 << 20, decode_workers: int = 2,
               decode_timeout_s: float = 30.0, model_slots: int = 2, job_workers: int = 2,
               max_analyses: int = 16):
    from concurrent.futures import ThreadPoolExecutor
    if not runs:
      raise RunError('the viewer needs at least one run (--workdir=RUN).')
    self.runs = list(runs)
    self.segmentation = segmentation
    self.max_upload_bytes = int(max_upload_bytes)
    self.tmp = tempfile.mkdtemp(prefix='cxr_jax_serve_')  # 0700, removed by close()
    self.pool = decode.DecodePool(decode_workers, decode_timeout_s)
    self._slots = threading.BoundedSemaphore(model_slots)
    self._jobs_pool = ThreadPoolExecutor(job_workers, thread_name_prefix='cxr-viewer-job')
    self._lock = threading.Lock()
    self._analyses = _Bounded(max_analyses)
    self._jobs = _Bounded(256)
    self._closed = False

  # ---------------------------------------------------------------------------- set-up
  def start(self) -> None:
    """Starts the decoding workers and compiles each model once (first upload is then fast)."""
    self.pool.start()
    for run in self.runs:
      p = run.predictor
      p.forward(p.preprocess(np.zeros((16, 16), np.float32))[None])

  def close(self) -> None:
    if self._closed:
      return
    self._closed = True
    for job in list(self._jobs.values()):
      job.cancel.set()
    self._jobs_pool.shutdown(wait=False, cancel_futures=True)
    self.pool.close()
    shutil.rmtree(self.tmp, ignore_errors=True)

  def info(self) -> dict[str, Any]:
    import matplotlib
    cmap = matplotlib.colormaps[COLORMAP]
    stops = [matplotlib.colors.to_hex(cmap(i / 10)) for i in range(11)]
    return {'runs': [r.info() for r in self.runs],
            'segmentation': self.segmentation is not None,
            'colormap': stops, 'max_upload_bytes': self.max_upload_bytes,
            'formats': 'PNG or JPEG (8 or 16 bit), DICOM'}

  # ---------------------------------------------------------------------------- analyses
  def analyze(self, data: bytes, name: str | None) -> Analysis:
    """Decodes an upload in a worker and runs every model on it (UploadError on bad files)."""
    t0 = time.perf_counter()
    name = clean_name(name)
    if len(data) > self.max_upload_bytes:
      raise decode.UploadError(f'{name}: {len(data):,} bytes; at most '
                               f'{self.max_upload_bytes:,} are accepted.')
    if not data:
      raise decode.UploadError(f'{name}: the file is empty.')
    image, meta, png = self.pool.decode(data, name, self.tmp)
    display = np.asarray(Image.open(io.BytesIO(png)), np.float32) / 255.0
    results = []
    with self._slots:
      for run in self.runs:
        p = run.predictor
        x = p.preprocess(image)
        logits, inter = p.forward(x[None])
        # Multi-label models' sigmoid, or a single-label model's softmax (ModelInfo.output).
        probs = np.asarray(losses.probabilities(np.asarray(logits, np.float32),
                                                p.info.output))[0]
        inter = jax.tree.map(np.asarray, inter)
        gate = None if run.gate is None else ood_lib.score_image(run.gate, p, x, inter)
        results.append(RunResult(x, inter, probs, gate))
    analysis = Analysis(secrets.token_hex(16), name, display, tuple(image.shape), meta, png,
                        results, seconds=time.perf_counter() - t0)
    with self._lock:
      self._analyses.put(analysis.id, analysis)
    return analysis

  def get(self, analysis_id: str) -> Analysis:
    with self._lock:
      analysis = self._analyses.get(analysis_id) if ID_PATTERN.match(analysis_id) else None
      if analysis is None:
        raise NotFound('this image is no longer on the server (it keeps the last few uploads); '
                       'upload it again.')
      self._analyses.move_to_end(analysis_id)
      return analysis

  def _run(self, analysis: Analysis, run: int) -> tuple[ServedRun, RunResult]:
    if not 0 <= run < len(self.runs):
      raise NotFound(f'run {run}: the viewer serves runs 0..{len(self.runs) - 1}.')
    return self.runs[run], analysis.results[run]

  def summary(self, analysis: Analysis) -> dict[str, Any]:
    """What the page shows first: per model, probabilities, thresholds, findings, OOD."""
    h, w = analysis.original_size
    runs = []
    for run, res in zip(self.runs, analysis.results, strict=True):
      p = run.predictor
      found = dict(p.findings(res.probs))
      runs.append({'label': run.label, 'ood': res.ood, 'findings': list(found),
                   'rows': [{'name': n, 'probability': float(pr), 'threshold': float(t),
                             'detected': n in found}
                            for n, pr, t in zip(p.class_names, res.probs, p.thresholds,
                                                strict=True)]})
    return {'id': analysis.id, 'name': analysis.name, 'width': w, 'height': h,
            'meta': _jsonable(analysis.meta), 'seconds': round(analysis.seconds, 3),
            'ood_flagged': any(r['ood'] and r['ood']['flagged'] for r in runs), 'runs': runs}

  # ---------------------------------------------------------------------------- heat maps
  def _method(self, run: ServedRun, name: str) -> methods.Method:
    for m in run.methods:
      if m.name == name:
        return m
    raise NotFound(f'method {name!r}: the model of {run.label} offers '
                   f'{", ".join(m.name for m in run.methods) or "none"}.')

  def _maps(self, run: ServedRun, res: RunResult, method: methods.Method,
            progress: Callable[[float], None] | None = None) -> methods.Maps:
    with res.lock:
      cached = res.maps.get(method.name)
    if cached is not None:
      return cached
    ctx = methods.Context(run.predictor, res.x, res.inter, run.state,
                          progress or (lambda fraction: None))
    maps = method.compute(ctx)
    with res.lock:
      res.maps[method.name] = maps
    return maps

  def heatmap(self, analysis_id: str, run: int, method: str, cls: str | None = None,
              step: int = 0) -> dict[str, Any]:
    """One heat map as a PNG (data URL) with its colour range and boxes (in [0, 1] image
    coordinates); a slow method must have been computed by a job first."""
    analysis = self.get(analysis_id)
    served, res = self._run(analysis, run)
    m = self._method(served, method)
    with res.lock:
      ready = res.maps.get(m.name)
    if ready is None and m.slow:
      raise BadRequest(f'{m.label} takes a while: start it as a job first.')
    maps = ready or self._maps(served, res, m)
    heat, title, index = self._select(served, res, maps, m, cls, step)
    lo, hi = overlays.value_range(heat)
    return {'method': m.name, 'label': m.label, 'title': title, 'png': _heat_png(
        heat, analysis.original_size, (lo, hi)), 'value_range': [lo, hi],
        'colorbar': maps.colorbar, 'boxes': self._boxes(served, heat, maps.signed),
        'steps': list(maps.step_names), 'step': index, 'per_class': maps.per_class}

  def _select(self, run: ServedRun, res: RunResult, maps: methods.Maps,
              m: methods.Method, cls: str | None, step: int
              ) -> tuple[np.ndarray, str, int]:
    names = run.predictor.class_names
    if maps.per_class:
      if cls is None:
        cls = names[int(np.argmax(res.probs))]
      if cls not in names:
        raise NotFound(f'class {cls!r}: the model of {run.label} has {", ".join(names)}.')
      k = names.index(cls)
      return maps.maps[k], f'{cls} (p={res.probs[k]:.2f}), {m.label}', k
    if not 0 <= step < len(maps.maps):
      raise NotFound(f'step {step}: {m.label} has steps 1..{len(maps.maps)}.')
    name = maps.step_names[step] if maps.step_names else f'{step + 1}'
    return maps.maps[step], f'{m.label}, {name}', step

  def _boxes(self, run: ServedRun, heat: np.ndarray, signed: bool) -> list[list[float]]:
    """Boxes from the map alone (no ground truth), as `localize` and `predict` draw them:
    the map upsampled to the model input, the run's config.localize.boxes settings; for
    signed maps (PDA) the evidence for the class (> 0)."""
    hh, ww = run.predictor.image_shape[:2]
    up = overlays.upsample(heat, (hh, ww))
    if signed:
      up = np.maximum(up, 0.0)
    found = boxes_lib.heatmap_to_boxes(up, inference.box_settings(run.predictor))
    return [[round(x / ww, 5), round(y / hh, 5), round(w / ww, 5), round(h / hh, 5)]
            for x, y, w, h in found]

  # ---------------------------------------------------------------------------- jobs
  def start_job(self, analysis_id: str, run: int, method: str) -> Job:
    analysis = self.get(analysis_id)
    served, res = self._run(analysis, run)
    m = self._method(served, method)
    job = Job(secrets.token_hex(16), analysis.id, run, m.name)
    with self._lock:
      self._jobs.put(job.id, job)

    def progress(fraction: float) -> None:
      if job.cancel.is_set():
        raise methods.Cancelled()
      job.progress = max(job.progress, float(fraction))

    def work() -> None:
      if job.cancel.is_set():
        job.state = 'cancelled'
        return
      job.state = 'running'
      try:
        self._maps(served, res, m, progress)
      except methods.Cancelled:
        job.state, job.message = 'cancelled', 'cancelled'
        return
      except Exception as e:  # shown in the page; the server goes on
        job.state, job.message = 'error', f'{m.label} failed: {e}'
        log.warning('job %s (%s) failed: %s', job.id[:8], m.name, type(e).__name__)
        return
      job.progress, job.state = 1.0, 'done'

    self._jobs_pool.submit(work)
    return job

  def job(self, job_id: str) -> Job:
    with self._lock:
      job = self._jobs.get(job_id) if ID_PATTERN.match(job_id) else None
    if job is None:
      raise NotFound('no such job.')
    return job

  def cancel(self, job_id: str) -> Job:
    job = self.job(job_id)
    job.cancel.set()
    if job.state == 'queued':
      job.state = 'cancelled'
    return job

  # ---------------------------------------------------------------------------- outlines
  def contours(self, analysis_id: str) -> list[dict[str, Any]]:
    if self.segmentation is None:
      raise NotFound('no segmentation run is served (--segmentation=UNET_RUN).')
    analysis = self.get(analysis_id)
    if analysis.contours is None:
      analysis.contours = self.segmentation.contours(analysis.image)
    return analysis.contours

  # ---------------------------------------------------------------------------- downloads
  def record(self, analysis_id: str, run: int) -> dict[str, Any]:
    """The JSON `python -m cxr_jax.predict` writes for the image (its keys and values; the
    image is named by its upload name), plus the OOD gate's verdict."""
    analysis = self.get(analysis_id)
    served, res = self._run(analysis, run)
    p = served.predictor
    names = p.class_names
    return {'image': analysis.name, 'image_meta': _jsonable(analysis.meta),
            'workdir': os.path.abspath(os.fspath(p.workdir)), 'stage': p.stage,
            'model': p.model_name,
            'probabilities': {n: float(v) for n, v in zip(names, res.probs, strict=True)},
            'thresholds': {n: float(t) for n, t in zip(names, p.thresholds, strict=True)},
            'threshold_source': p.operating.source,
            'findings': [n for n, _ in p.findings(res.probs)], 'overlays': [],
            'ood': res.ood}

  def overlay_png(self, analysis_id: str, run: int, method: str, cls: str | None = None,
                  step: int = 0, opacity: float = 0.45, boxes: bool = True) -> bytes:
    """The heat map over the X-ray as `predict` draws it (colour bar, findings, boxes)."""
    if not 0.0 <= opacity <= 1.0:
      raise BadRequest(f'opacity={opacity}: expected a value in [0, 1].')
    analysis = self.get(analysis_id)
    served, res = self._run(analysis, run)
    m = self._method(served, method)
    info = self.heatmap(analysis_id, run, m.name, cls, step)
    maps = res.maps[m.name]
    heat, title, _ = self._select(served, res, maps, m, cls, step)
    h, w = analysis.image.shape
    pred = [(x * w, y * h, bw * w, bh * h) for x, y, bw, bh in info['boxes']] if boxes else []
    fig = overlays.overlay_heatmap(
        analysis.image, heat, title=f'{analysis.name}: {title}',
        findings=served.predictor.findings(res.probs), alpha=float(opacity),
        vrange=tuple(info['value_range']), colorbar_label=maps.colorbar, pred_boxes=pred)
    return overlays.png_bytes(fig)


def _heat_png(heat: np.ndarray, original_size: tuple[int, int],
              value_range: tuple[float, float]) -> str:
  """heat [h, w] -> a jet-coloured PNG data URL with the image's aspect ratio."""
  import matplotlib
  h, w = original_size
  scale = HEATMAP_SIZE / max(h, w)
  up = overlays.upsample(heat, (max(1, round(h * scale)), max(1, round(w * scale))))
  lo, hi = value_range
  norm = np.clip((up - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)
  rgb = (matplotlib.colormaps[COLORMAP](norm)[..., :3] * 255).round().astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(rgb, mode='RGB').save(buf, format='PNG')
  return 'data:image/png;base64,' + base64.b64encode(buf.getvalue()).decode('ascii')


def _jsonable(meta: dict[str, Any]) -> dict[str, Any]:
  return {k: (list(v) if isinstance(v, tuple) else v) for k, v in meta.items()}


def load_viewer(workdirs: Sequence[str], segmentation: str | None = None, *,
                pda_reference: str | epath.PathLike | None = None,
                **kwargs: Any) -> Viewer:
  """Loads every run once (and the segmenter) and returns the viewer (not started)."""
  ref = None
  if pda_reference:
    from cxr_jax.predict import list_images  # one image finder for both command lines
    ref = list_images(os.fspath(pda_reference))
  runs = [load_run(w, ref) for w in workdirs]
  seg = load_segmentation(segmentation) if segmentation else None
  return Viewer(runs, seg, **kwargs)
