"""The viewer's HTTP side (Starlette): the page, its three static files, a small JSON API.

Routes (ids are random 128-bit hex strings made by the server; nothing the client sends is ever
used as a file path):

  GET  /                                             the page (static/index.html)
  GET  /static/viewer.js | viewer.css                its script and style (held in memory)
  GET  /api/info                                     models, classes, thresholds, methods, OOD
  POST /api/analyze                                  body: the file; header X-Filename: its name
  GET  /api/analyses/{id}/image.png                  the X-ray as the page shows it
  GET  /api/analyses/{id}/runs/{r}/heatmap/{method}?cls=&step=   a heat map, its range, boxes
  POST /api/analyses/{id}/runs/{r}/jobs/{method}     starts a slow method (PDA)
  GET  /api/jobs/{job} ; DELETE /api/jobs/{job}      its progress ; cancel it
  GET  /api/analyses/{id}/contours                   lung/heart outlines (--segmentation)
  GET  /api/analyses/{id}/runs/{r}/record.json       download: the JSON predict writes
  GET  /api/analyses/{id}/runs/{r}/overlay.png?method=&cls=&step=&opacity=   download: overlay

Errors are JSON {"error": message} with 4xx codes; an unexpected failure answers 500 with a
generic message and logs only the exception's type (never a file name or a DICOM tag).
"""

import importlib.resources
import logging
import urllib.parse
from collections.abc import Sequence
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cxr_jax.inference import RunError
from cxr_jax.serve.decode import UploadError
from cxr_jax.serve.service import BadRequest, NotFound, Viewer

log = logging.getLogger('cxr_jax.serve')

LOCAL_HOSTS = ('127.0.0.1', 'localhost', '::1', '[::1]')
STATIC = {'index.html': 'text/html; charset=utf-8',
          'viewer.js': 'text/javascript; charset=utf-8',
          'viewer.css': 'text/css; charset=utf-8'}
# The page loads nothing from elsewhere (works offline, no CDN); images are data: URLs or ours.
SECURITY_HEADERS = {
    'Content-Security-Policy': "default-src 'self'; img-src 'self' data: blob:; "
                               "style-src 'self'; script-src 'self'; object-src 'none'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    'X-Content-Type-Options': 'nosniff',
    'Referrer-Policy': 'no-referrer',
    'Cache-Control': 'no-store',
}


def static_files() -> dict[str, bytes]:
  """The page's files, read once from the package (package_data)."""
  root = importlib.resources.files('cxr_jax.serve') / 'static'
  return {name: (root / name).read_bytes() for name in STATIC}


class _SecurityHeaders:
  """Pure ASGI middleware adding SECURITY_HEADERS to every response."""

  def __init__(self, app):
    self.app = app

  async def __call__(self, scope, receive, send):
    if scope['type'] != 'http':
      return await self.app(scope, receive, send)

    async def send_with_headers(message):
      if message['type'] == 'http.response.start':
        headers = list(message.get('headers', []))
        present = {k.lower() for k, _ in headers}
        headers += [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()
                    if k.lower().encode() not in present]
        message = {**message, 'headers': headers}
      await send(message)

    await self.app(scope, receive, send_with_headers)


def _error(message: str, status: int) -> JSONResponse:
  return JSONResponse({'error': message}, status_code=status)


async def _call(fn, *args: Any, **kwargs: Any) -> Any:
  """Runs blocking work in the thread pool and maps the viewer's errors onto responses."""
  try:
    return await run_in_threadpool(fn, *args, **kwargs)
  except UploadError as e:
    return _error(str(e), 422)
  except NotFound as e:
    return _error(str(e), 404)
  except (BadRequest, RunError) as e:
    return _error(str(e), 400)
  except Exception as e:  # the server keeps serving; the log names the type only
    log.error('request failed: %s', type(e).__name__)
    return _error(f'the server could not do this ({type(e).__name__}); see its log.', 500)


def _int(value: str | None, name: str, default: int = 0) -> int:
  try:
    return default if value in (None, '') else int(value)
  except ValueError:
    raise BadRequest(f'{name}={value!r}: expected an integer.') from None


def create_app(viewer: Viewer, *, allowed_hosts: Sequence[str] = LOCAL_HOSTS,
               start: bool = True) -> Starlette:
  """The Starlette app serving `viewer`; the lifespan starts it (workers, compiled models) and
  closes it (temporary folder removed). allowed_hosts: Host headers answered (DNS rebinding:
  a local server answers only to local names)."""
  files = static_files()

  async def page(request: Request) -> Response:
    return Response(files['index.html'], media_type=STATIC['index.html'])

  async def static(request: Request) -> Response:
    name = request.path_params['name']
    if name not in files or name == 'index.html':
      return _error('not found', 404)
    return Response(files[name], media_type=STATIC[name])

  async def info(request: Request) -> Response:
    return JSONResponse(viewer.info())

  async def analyze(request: Request) -> Response:
    limit = viewer.max_upload_bytes
    declared = request.headers.get('content-length')
    if declared and declared.isdigit() and int(declared) > limit:
      return _error(f'the file is larger than the {limit >> 20} MiB this server accepts.', 413)
    body = bytearray()
    async for chunk in request.stream():
      body += chunk
      if len(body) > limit:
        return _error(f'the file is larger than the {limit >> 20} MiB this server accepts.',
                      413)
    name = urllib.parse.unquote(request.headers.get('x-filename', ''))
    result = await _call(lambda: viewer.summary(viewer.analyze(bytes(body), name)))
    return result if isinstance(result, Response) else JSONResponse(result)

  async def image(request: Request) -> Response:
    result = await _call(viewer.get, request.path_params['aid'])
    return result if isinstance(result, Response) else Response(result.png,
                                                                media_type='image/png')

  async def heatmap(request: Request) -> Response:
    p, q = request.path_params, request.query_params
    result = await _call(lambda: viewer.heatmap(p['aid'], p['run'], p['method'], q.get('cls'),
                                                _int(q.get('step'), 'step')))
    return result if isinstance(result, Response) else JSONResponse(result)

  async def start_job(request: Request) -> Response:
    p = request.path_params
    result = await _call(viewer.start_job, p['aid'], p['run'], p['method'])
    return result if isinstance(result, Response) else JSONResponse(result.status(), 202)

  async def job(request: Request) -> Response:
    fn = viewer.cancel if request.method == 'DELETE' else viewer.job
    result = await _call(fn, request.path_params['job'])
    return result if isinstance(result, Response) else JSONResponse(result.status())

  async def contours(request: Request) -> Response:
    result = await _call(viewer.contours, request.path_params['aid'])
    return result if isinstance(result, Response) else JSONResponse({'structures': result})

  async def record(request: Request) -> Response:
    p = request.path_params
    result = await _call(viewer.record, p['aid'], p['run'])
    if isinstance(result, Response):
      return result
    return JSONResponse(result, headers={
        'Content-Disposition': f'attachment; filename="{_download_name(result["image"])}.json"'})

  async def overlay(request: Request) -> Response:
    p, q = request.path_params, request.query_params

    def render():
      try:
        opacity = float(q.get('opacity', '0.45'))
      except ValueError:
        raise BadRequest(f'opacity={q.get("opacity")!r}: expected a number.') from None
      png = viewer.overlay_png(p['aid'], p['run'], q.get('method', ''), q.get('cls'),
                               _int(q.get('step'), 'step'), opacity,
                               q.get('boxes', '1') != '0')
      return png, viewer.get(p['aid']).name

    result = await _call(render)
    if isinstance(result, Response):
      return result
    png, name = result
    method = q.get('method', '')
    return Response(png, media_type='image/png', headers={
        'Content-Disposition': f'attachment; filename="{_download_name(name)}.{method}.png"'})

  @asynccontextmanager
  async def lifespan(app):
    if start:
      await run_in_threadpool(viewer.start)
    try:
      yield
    finally:
      viewer.close()

  run = '{run:int}'
  routes = [
      Route('/', page), Route('/static/{name}', static), Route('/api/info', info),
      Route('/api/analyze', analyze, methods=['POST']),
      Route('/api/analyses/{aid}/image.png', image),
      Route(f'/api/analyses/{{aid}}/runs/{run}/heatmap/{{method}}', heatmap),
      Route(f'/api/analyses/{{aid}}/runs/{run}/jobs/{{method}}', start_job, methods=['POST']),
      Route('/api/jobs/{job}', job, methods=['GET', 'DELETE']),
      Route('/api/analyses/{aid}/contours', contours),
      Route(f'/api/analyses/{{aid}}/runs/{run}/record.json', record),
      Route(f'/api/analyses/{{aid}}/runs/{run}/overlay.png', overlay),
  ]
  middleware = [Middleware(_SecurityHeaders)]
  if '*' not in allowed_hosts:
    middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts)))
  return Starlette(routes=routes, middleware=middleware, lifespan=lifespan)


def _download_name(name: str) -> str:
  """A file name safe inside a Content-Disposition header."""
  return ''.join(c if c.isalnum() or c in '._-' else '_' for c in name)[:100] or 'upload'
