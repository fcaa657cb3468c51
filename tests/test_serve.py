"""The viewer (`python -m cxr_jax.serve`): its HTTP API on a real server, and the page in a real
browser (headless Chromium driven by Playwright; skipped where neither is installed).

One tiny run (train_classifier + fit_ood on `cxr_phantom/tiny`) is trained for the module and
served twice side by side (RUN and RUN:train_classifier), with a fake segmenter for outlines.
"""

import base64
import concurrent.futures
import io
import json
import logging
import os
import pathlib
import re
import shutil
import threading
import time

import numpy as np
import pydicom
import pytest
from conftest import SHARED_DATA, tiny_config
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from cxr_jax import imageio, inference, layout, predict
from cxr_jax.serve import __main__ as serve_cli
from cxr_jax.serve import app as app_lib
from cxr_jax.serve import decode, methods, service

httpx = pytest.importorskip('httpx')
uvicorn = pytest.importorskip('uvicorn')

CHROMIUM = '/usr/bin/chromium'
CHROMIUM_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic',
                  '--no-first-run', '--disable-background-networking',
                  '--disable-component-update', '--disable-sync']
STRUCTURES = ('left lung', 'right lung', 'heart')


class FakeSegmenter:
  """What cxr_jax.inference.segmentation.Segmenter offers: `segment` and structure names.
  Two lungs and a heart as discs at fixed places, whatever the image."""

  structure_names = STRUCTURES

  def __init__(self):
    self.calls = 0

  def segment(self, images: np.ndarray) -> np.ndarray:
    self.calls += 1
    n, h, w = images.shape
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.zeros((n, h, w, 3), np.float32)
    for s, (cy, cx, r) in enumerate(((0.45, 0.3, 0.18), (0.45, 0.7, 0.18), (0.65, 0.55, 0.1))):
      out[..., s] = ((yy + 0.5) / h - cy) ** 2 + ((xx + 0.5) / w - cx) ** 2 < r ** 2
    return out


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope='module')
def served_run(phantom_data_dir, tmp_path_factory) -> str:
  from cxr_jax import stages
  config = tiny_config(phantom_data_dir)
  config.num_train_steps = 2
  workdir = tmp_path_factory.mktemp('serve_run')
  stages.run(config, workdir, only=['train_classifier', 'fit_ood'])
  return str(workdir)


@pytest.fixture(scope='module')
def server(served_run):
  """A real uvicorn server on a free loopback port serving the run twice; yields
  (base URL, Viewer)."""
  viewer = service.load_viewer([served_run, f'{served_run}:train_classifier'])
  viewer.segmentation = service.Segmentation(FakeSegmenter())
  app = app_lib.create_app(viewer)
  config = uvicorn.Config(app, host='127.0.0.1', port=0, log_level='warning')
  srv = uvicorn.Server(config)
  thread = threading.Thread(target=srv.run, daemon=True)
  thread.start()
  deadline = time.time() + 120
  while not srv.started:
    assert thread.is_alive() and time.time() < deadline, 'the server did not start'
    time.sleep(0.05)
  port = srv.servers[0].sockets[0].getsockname()[1]
  yield f'http://127.0.0.1:{port}', viewer
  srv.should_exit = True
  thread.join(30)
  assert not os.path.exists(viewer.tmp)  # the temporary folder went with the server


@pytest.fixture(scope='module')
def client(server):
  with httpx.Client(base_url=server[0], timeout=120) as c:
    yield c


@pytest.fixture(scope='module')
def phantom_png(phantom_data_dir, tmp_path_factory) -> pathlib.Path:
  """A test-split phantom X-ray (the run's own distribution) as an 8-bit PNG."""
  import tensorflow_datasets as tfds
  ds = tfds.builder('cxr_phantom/tiny', data_dir=phantom_data_dir).as_dataset(split='test')
  image = next(iter(tfds.as_numpy(ds)))['image'][..., 0]
  path = tmp_path_factory.mktemp('phantom') / 'phantom_test.png'
  Image.fromarray(image).save(path)
  return path


def _png(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format='PNG')
  return buf.getvalue()


def _dicom(path: pathlib.Path, pixels: np.ndarray, syntax=ExplicitVRLittleEndian) -> None:
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
  ds.PatientName = 'Secret^Patient'  # must never reach a log
  ds.Rows, ds.Columns = pixels.shape
  ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, 'MONOCHROME1'
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
  ds.PixelData = pixels.astype(np.uint16).tobytes()
  ds.save_as(path, enforce_file_format=True)
  if syntax != ExplicitVRLittleEndian:
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = pydicom.encaps.encapsulate([b'\x00' * 32])
    ds['PixelData'].VR = 'OB'
    ds.save_as(path)


def _analyze(client, data: bytes, name: str):
  return client.post('/api/analyze', content=data, headers={'X-Filename': name})


# ------------------------------------------------------------------------------ API
def test_info_lists_models_methods_and_gates(client):
  info = client.get('/api/info').json()
  assert len(info['runs']) == 2 and info['segmentation'] is True
  run = info['runs'][0]
  assert run['stage'] == 'train_classifier' and len(run['classes']) == 13  # NIH13
  assert [m['name'] for m in run['methods']] == ['cam', 'grad_cam', 'pda']  # no attention
  assert [m['slow'] for m in run['methods']] == [False, False, True]
  assert run['ood']['threshold'] is not None and run['ood']['false_alarm_rate_target'] == 0.05
  assert len(info['colormap']) == 11 and info['colormap'][0].startswith('#')
  page = client.get('/')
  assert page.status_code == 200 and '<script src="/static/viewer.js">' in page.text
  assert "default-src 'self'" in page.headers['content-security-policy']
  assert client.get('/static/viewer.css').headers['content-type'].startswith('text/css')
  # No client path reaches the file system; foreign Host headers are refused (DNS rebinding).
  for path in ('/static/../setup.py', '/static/%2e%2e%2fsetup.py', '/static/index.html',
               '/api/analyses/..%2f..%2fetc/image.png'):
    assert client.get(path).status_code == 404, path
  assert client.get('/api/info', headers={'Host': 'evil.example'}).status_code == 400


def test_png_8_and_16_bit_match_predict(client, server, served_run, tmp_path):
  rng = np.random.default_rng(0)
  arrays = {'a8.png': rng.integers(0, 256, (80, 70), dtype=np.uint8),
            'b16.png': rng.integers(0, 65536, (90, 90), dtype=np.uint16)}
  predictor = server[1].runs[0].predictor
  for name, array in arrays.items():
    (tmp_path / name).write_bytes(_png(array))
    res = _analyze(client, _png(array), name)
    assert res.status_code == 200, res.text
    summary = res.json()
    assert summary['name'] == name and (summary['height'], summary['width']) == array.shape
    assert summary['meta']['bit_depth'] == (8 if array.dtype == np.uint8 else 16)
    expected = predict.predict_image(predictor, str(tmp_path / name), str(tmp_path / name),
                                     explain='none')
    record = client.get(f'/api/analyses/{summary["id"]}/runs/0/record.json')
    assert 'attachment' in record.headers['content-disposition']
    record = record.json()
    assert set(record) == set(expected) | {'ood'}
    assert record['image'] == name and record['stage'] == expected['stage']
    for k, p in expected['probabilities'].items():
      assert abs(record['probabilities'][k] - p) < 1e-5
    assert record['thresholds'] == expected['thresholds']
    assert record['findings'] == expected['findings']
    rows = {r['name']: r for r in summary['runs'][0]['rows']}
    assert all(rows[k]['detected'] == (k in expected['findings']) for k in rows)
    assert summary['runs'][1]['rows'] == summary['runs'][0]['rows']  # the same stage twice
    image = client.get(f'/api/analyses/{summary["id"]}/image.png')
    assert Image.open(io.BytesIO(image.content)).size == array.shape[::-1]


def test_dicom_uploads_and_refusals_by_name(client, tmp_path, caplog):
  caplog.set_level(logging.DEBUG)
  pixels = np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (48, 1))
  _dicom(tmp_path / 'plain.dcm', pixels)
  res = _analyze(client, (tmp_path / 'plain.dcm').read_bytes(), 'scan.bin')  # name ignored
  assert res.status_code == 200, res.text
  meta = res.json()['meta']
  assert meta['format'] == 'dicom' and meta['photometric_interpretation'] == 'MONOCHROME1'
  assert meta['sniffed'] == 'dicom'
  # A compressed syntax without a decoder: the same refusal as predict's, naming the upload.
  _dicom(tmp_path / 'j2k.dcm', pixels, syntax=JPEG2000Lossless)
  with pytest.raises(imageio.ImageReadError) as direct:
    imageio.read_image(tmp_path / 'j2k.dcm')
  res = _analyze(client, (tmp_path / 'j2k.dcm').read_bytes(), 'my%20study.dcm')
  assert res.status_code == 422
  message = res.json()['error']
  assert message.startswith('my study.dcm: ') and 'JPEG 2000' in message
  same = str(direct.value).replace(str(tmp_path / 'j2k.dcm'), 'my study.dcm')
  assert re.sub('0x[0-9a-f]+', '', message) == re.sub('0x[0-9a-f]+', '', same)
  if SHARED_DATA.is_dir():  # the real CR plate (MONOCHROME1, 1955 x 1841)
    real = (SHARED_DATA / 'dicom' / 'RG1_UNCR.dcm').read_bytes()
    summary = _analyze(client, real, 'RG1_UNCR.dcm').json()
    assert (summary['height'], summary['width']) == (1955, 1841)
  assert 'Secret' not in caplog.text and 'my study' not in caplog.text


def test_bad_uploads_give_messages_and_the_server_keeps_serving(client, server, caplog):
  caplog.set_level(logging.DEBUG)
  viewer = server[1]
  cases = {
      'notes.txt': (b'hello, not an image', 422, 'not a PNG, JPEG or DICOM file'),
      'secret-broken.png': (b'\x89PNG\r\n\x1a\n garbage', 422, 'secret-broken.png: '),
      'empty.png': (b'', 422, 'empty'),
      'fake.jpg': (_png(np.zeros((8, 8), np.uint8)), 200, ''),  # sniffed: a PNG
  }
  for name, (data, status, text) in cases.items():
    res = _analyze(client, data, name)
    assert res.status_code == status, (name, res.text)
    if status != 200:
      assert text in res.json()['error'], res.json()
  assert _analyze(client, b'x', 'evil/../../etc/passwd').json()['error'].startswith('passwd')
  limit = viewer.max_upload_bytes
  viewer.max_upload_bytes = 1000
  try:
    res = _analyze(client, _png(np.zeros((200, 200), np.uint8)) + b'\0' * 2000, 'big.png')
    assert res.status_code == 413 and 'larger than' in res.json()['error']
  finally:
    viewer.max_upload_bytes = limit
  timeout = viewer.pool.timeout_s
  # A 25-megapixel PNG of zeros (a 25 kB upload) takes far longer to decode than 50 ms; a
  # shorter limit would be unreliable (thread switches take up to 5 ms under the GIL).
  viewer.pool.timeout_s = 0.05
  try:
    res = _analyze(client, _png(np.zeros((5000, 5000), np.uint8)), 'slow.png')
    assert res.status_code == 422 and 'longer than' in res.json()['error']
  finally:
    viewer.pool.timeout_s = timeout
  assert _analyze(client, _png(np.zeros((64, 64), np.uint8)), 'ok.png').status_code == 200
  assert os.listdir(viewer.tmp) == []  # uploads deleted at once
  assert not any(n in caplog.text for n in ('notes.txt', 'secret-broken', 'slow.png'))


def test_heat_maps_boxes_contours_and_overlay(client, server, phantom_png):
  viewer = server[1]
  summary = _analyze(client, phantom_png.read_bytes(), phantom_png.name).json()
  aid, run = summary['id'], viewer.runs[0]
  for method in ('cam', 'grad_cam'):
    res = client.get(f'/api/analyses/{aid}/runs/0/heatmap/{method}', params={'cls': 'Mass'})
    assert res.status_code == 200, res.text
    heat = res.json()
    png = Image.open(io.BytesIO(base64.b64decode(heat['png'].split(',', 1)[1])))
    assert png.size == (512, 512) and heat['title'].startswith('Mass (p=')
    # The boxes are those of inference.class_activation_boxes (GT-blind), in [0, 1] units.
    res_ = viewer.get(aid).results[0]
    (_, _, expected), = inference.class_activation_boxes(run.predictor, res_.inter, method,
                                                         ['Mass'], (1, 1))
    np.testing.assert_allclose(np.asarray(heat['boxes']).reshape(-1, 4),
                               np.asarray(expected).reshape(-1, 4), atol=1e-4)
    lo, hi = heat['value_range']
    assert lo < hi
  assert client.get(f'/api/analyses/{aid}/runs/0/heatmap/attention').status_code == 404
  assert client.get(f'/api/analyses/{aid}/runs/0/heatmap/cam',
                    params={'cls': 'Fracture'}).status_code == 404
  assert client.get(f'/api/analyses/{aid}/runs/0/heatmap/pda').status_code == 400  # job first
  overlay = client.get(f'/api/analyses/{aid}/runs/1/overlay.png',
                       params={'method': 'cam', 'cls': 'Mass', 'opacity': '0.7'})
  assert overlay.status_code == 200 and Image.open(io.BytesIO(overlay.content)).format == 'PNG'
  assert client.get(f'/api/analyses/{aid}/runs/0/overlay.png',
                    params={'method': 'cam', 'opacity': '7'}).status_code == 400
  outlines = client.get(f'/api/analyses/{aid}/contours').json()['structures']
  assert [s['name'] for s in outlines] == list(STRUCTURES)
  for s, (cy, cx, r) in zip(outlines, ((0.45, 0.3, 0.18), (0.45, 0.7, 0.18), (0.65, 0.55, 0.1)),
                            strict=True):
    xy = np.asarray(s['lines'][0])
    radius = np.hypot(xy[:, 0] - cx, xy[:, 1] - cy)
    assert abs(radius.mean() - r) < 0.02, s['name']


def test_pda_job_progress_result_and_cancel(client, server, phantom_png):
  viewer = server[1]
  aid = _analyze(client, phantom_png.read_bytes(), 'p.png').json()['id']
  job = client.post(f'/api/analyses/{aid}/runs/0/jobs/pda')
  assert job.status_code == 202
  status = _wait(client, job.json()['job'])
  assert status['state'] == 'done' and status['progress'] == 1.0, status
  heat = client.get(f'/api/analyses/{aid}/runs/0/heatmap/pda', params={'cls': 'Mass'}).json()
  assert heat['colorbar'].startswith('contribution') and heat['value_range'][0] <= 0
  # The same map as predict's --explain=pda (same settings, sampler data and key).
  predictor = viewer.runs[0].predictor
  settings = inference.PDASettings.from_config(predictor.config_section('explain'))
  res = viewer.get(aid).results[0]
  import jax
  expected = inference.pda_heatmaps(predictor, res.x, viewer.runs[0].state.values['pda_sampler'],
                                    settings, jax.random.fold_in(jax.random.key(0), 0))
  np.testing.assert_allclose(res.maps['pda'].maps, expected, atol=1e-5 * np.abs(expected).max())
  # A long PDA (many samples, small chunks) is cancelled while it runs.
  explain = predictor.config.explain
  old = (explain.num_samples, explain.chunk_size, explain.window, explain.stride)
  with explain.unlocked():
    explain.num_samples, explain.chunk_size, explain.window, explain.stride = 400, 2, 2, 1
  try:
    aid = _analyze(client, phantom_png.read_bytes(), 'q.png').json()['id']
    jid = client.post(f'/api/analyses/{aid}/runs/0/jobs/pda').json()['job']
    deadline = time.time() + 60
    while client.get(f'/api/jobs/{jid}').json()['progress'] <= 0.0:
      assert time.time() < deadline
      time.sleep(0.05)
    assert client.delete(f'/api/jobs/{jid}').status_code == 200
    status = _wait(client, jid)
    assert status['state'] == 'cancelled' and status['progress'] < 0.9, status
  finally:
    with explain.unlocked():
      explain.num_samples, explain.chunk_size, explain.window, explain.stride = old
  assert 'pda' not in viewer.get(aid).results[0].maps
  assert client.get('/api/jobs/' + 'f' * 32).status_code == 404


def _wait(client, job_id: str, timeout: float = 120.0) -> dict:
  deadline = time.time() + timeout
  while True:
    status = client.get(f'/api/jobs/{job_id}').json()
    if status['state'] in ('done', 'error', 'cancelled') or time.time() > deadline:
      return status
    time.sleep(0.1)


def test_concurrent_requests_all_answered(client, server, phantom_png):
  data = phantom_png.read_bytes()

  def one(i):
    with httpx.Client(base_url=server[0], timeout=120) as c:
      return _analyze(c, data, f'c{i}.png').status_code

  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    codes = list(pool.map(one, range(16)))
  assert codes == [200] * 16
  assert client.get('/api/info').status_code == 200


def test_ood_gate_flags_non_xrays(client, served_run, phantom_png):
  summary = json.loads(layout.Run(served_run).ood_summary_file('train_classifier').read_text())
  assert summary['num_train'] == 24 and summary['num_validation'] == 8
  assert summary['false_alarm_rate_validation'] <= 0.05
  assert 0.0 <= summary['false_alarm_rate_test'] <= 1.0
  assert not _analyze(client, phantom_png.read_bytes(), 'x.png').json()['ood_flagged']
  import matplotlib.cbook
  with matplotlib.cbook.get_sample_data('grace_hopper.jpg') as f:
    photo = f.read()
  inverted = _png(255 - np.asarray(Image.open(phantom_png)))
  blank = _png(np.full((64, 64), 255, np.uint8))
  for name, data in (('photo.jpg', photo), ('inverted.png', inverted), ('blank.png', blank)):
    res = _analyze(client, data, name).json()
    assert res['ood_flagged'], (name, res['runs'][0]['ood'])


# ------------------------------------------------------------------------------ pieces
def test_method_registry_is_extensible(monkeypatch):
  monkeypatch.setattr(methods.METHODS, '_items', dict(methods.METHODS._items))
  monkeypatch.setattr(methods, '_ORDER', list(methods._ORDER))
  fake = type('P', (), {'supports': lambda self, m: m in ('cam', 'attention')})()
  assert [m.name for m in methods.supported_methods(fake)] == ['attention', 'cam']
  methods.register(methods.Method('activations', 'Activation maps', 'mean activation',
                                  lambda p: True, lambda ctx: None))
  assert [m.name for m in methods.supported_methods(fake)] == ['attention', 'cam', 'activations']
  with pytest.raises(ValueError, match='already registered'):
    methods.register(methods.Method('cam', 'x', 'y', lambda p: True, lambda ctx: None))


def test_attention_method_steps():
  maps = np.random.default_rng(0).random((1, 3, 4, 4)).astype(np.float32)
  fake = type('P', (), {'attention_maps': lambda self, inter: maps})()
  out = methods.METHODS.get('attention').compute(methods.Context(fake, None, {}, None))
  assert not out.per_class and out.step_names == ('step 1', 'step 2', 'step 3')
  np.testing.assert_array_equal(out.maps, maps[0])


def test_segmentation_absent_is_a_clear_error(monkeypatch):
  import importlib
  real = importlib.import_module

  def fake_import(name, *args):
    if name == 'cxr_jax.inference.segmentation':
      raise ModuleNotFoundError(f'No module named {name!r}', name=name)
    return real(name, *args)

  monkeypatch.setattr(importlib, 'import_module', fake_import)
  with pytest.raises(inference.RunError,
                     match='--segmentation=UNET.*cxr_jax.inference.segmentation'):
    service.load_segmentation('UNET')


def test_sniff_and_names():
  assert decode.sniff(b'\x89PNG\r\n\x1a\n' + b'\0' * 10) == 'png'
  assert decode.sniff(b'\xff\xd8\xff\xe0') == 'jpeg'
  assert decode.sniff(b'\0' * 128 + b'DICM') == 'dicom'
  assert decode.sniff(b'GIF89a') is None
  assert service.clean_name('C:\\Users\\me\\x\u0007ray.png') == 'xray.png'
  assert service.clean_name('') == 'upload'
  assert service.parse_run_spec('/no/such/run:train_classifier') == ('/no/such/run',
                                                                    'train_classifier')


def test_cli_binds_loopback_unless_told(capsys, served_run):
  assert serve_cli.is_loopback('127.0.0.1') and serve_cli.is_loopback('::1')
  assert serve_cli.is_loopback('localhost') and not serve_cli.is_loopback('0.0.0.0')
  assert serve_cli.main(['serve', f'--workdir={served_run}', '--host=0.0.0.0']) == 2
  assert '--allow_remote' in capsys.readouterr().err
  assert serve_cli.check_host('0.0.0.0', allow_remote=True) is None
  assert 'WARNING' in capsys.readouterr().err
  assert serve_cli.main(['serve', '--workdir=/no/such/run']) == 2
  assert 'no such folder' in capsys.readouterr().err


# ------------------------------------------------------------------------------ browser
@pytest.fixture(scope='module')
def browser_page(server, tmp_path_factory):
  if not os.path.exists(CHROMIUM):
    pytest.skip(f'no Chromium at {CHROMIUM} (apt-get install -y chromium)')
  sync_api = pytest.importorskip('playwright.sync_api', reason='pip install playwright')
  with sync_api.sync_playwright() as p:
    context = p.chromium.launch_persistent_context(
        str(tmp_path_factory.mktemp('chromium-profile')), executable_path=CHROMIUM,
        headless=True, args=CHROMIUM_FLAGS, viewport={'width': 1400, 'height': 1100})
    page = context.new_page()
    errors = []
    page.on('pageerror', lambda e: errors.append(str(e)))
    page.goto(server[0] + '/')
    page.wait_for_selector('.run .method option', state='attached')
    yield page
    context.close()
    assert not errors, errors


def _upload(page, path: pathlib.Path) -> None:
  page.evaluate("() => document.body.removeAttribute('data-analysis')")
  page.set_input_files('#file', str(path))
  page.wait_for_function("() => document.body.dataset.analysis || "
                         "!document.querySelector('#error').hidden", timeout=120_000)


def _wait_map(page, run: int = 0) -> None:
  page.wait_for_function(
      f"() => document.querySelectorAll('.run')[{run}].dataset.mapState === 'shown'",
      timeout=120_000)


def test_browser_findings_heat_maps_slider_and_outlines(browser_page, phantom_png, tmp_path):
  page = browser_page
  _upload(page, phantom_png)
  assert page.is_hidden('#ood') and page.is_visible('#runs')
  runs = page.locator('.run')
  assert runs.count() == 2  # side by side
  names = runs.nth(0).locator('tbody tr td:first-child').all_text_contents()
  assert len(names) == 13 and {'Mass', 'Nodule', 'Pneumonia'} <= set(names)
  _wait_map(page)
  page.screenshot(full_page=True, path=str(tmp_path / '1-uploaded.png'))
  # Click a finding: both runs show its heat map, with boxes and the outlines.
  runs.nth(0).locator('tbody tr[data-name="Nodule"]').click()
  page.wait_for_function("() => [...document.querySelectorAll('.run .map-title')].every("
                         "t => t.textContent.startsWith('Nodule'))")
  _wait_map(page, 0)
  _wait_map(page, 1)
  heat = runs.nth(0).locator('img.heat')
  assert heat.evaluate('i => i.complete && i.naturalWidth') == 512
  assert runs.nth(0).locator('svg.marks rect.box').count() >= 1
  assert runs.nth(0).locator('svg.marks polygon.contour').count() >= 3
  assert 'heart' in runs.nth(0).locator('.legend').inner_text()
  assert runs.nth(0).locator('.cb-label').inner_text() == 'CAM (class score)'
  page.screenshot(full_page=True, path=str(tmp_path / '2-finding-cam.png'))
  # Switch method; move the slider.
  runs.nth(0).locator('select.method').select_option('grad_cam')
  page.wait_for_function("() => document.querySelector('.run .map-title').textContent"
                         ".includes('Grad-CAM')")
  _wait_map(page)
  runs.nth(0).locator('input.opacity').fill('80')
  assert heat.evaluate('i => getComputedStyle(i).opacity') == '0.8'
  assert 'opacity=0.80' in runs.nth(0).locator('a.dl-png').get_attribute('href')
  page.screenshot(full_page=True, path=str(tmp_path / '3-grad-cam-opacity-80.png'))
  # PDA runs as a job, then shows its map.
  runs.nth(1).locator('select.method').select_option('pda')
  page.wait_for_function("() => document.querySelectorAll('.run .map-title')[1].textContent"
                         ".includes('PDA')", timeout=120_000)
  assert 'bits of evidence' in runs.nth(1).locator('.cb-label').inner_text()
  page.screenshot(full_page=True, path=str(tmp_path / '4-pda.png'))
  # Sorting by name.
  runs.nth(0).locator('th[data-key="name"]').click()
  sorted_names = runs.nth(0).locator('tbody tr td:first-child').all_text_contents()
  assert sorted_names == sorted(sorted_names)
  # The downloads work from the page's links.
  href = runs.nth(0).locator('a.dl-json').get_attribute('href')
  record = page.evaluate("href => fetch(href).then(r => r.json())", href)
  assert record['image'] == phantom_png.name and len(record['probabilities']) == 13


def test_browser_real_sample_dicom_ood_and_errors(browser_page, tmp_path):
  page = browser_page
  if SHARED_DATA.is_dir():  # a real NIH X-ray and the real DICOM
    sample = tmp_path / '00000072_000.png'
    shutil.copy(SHARED_DATA / 'nih_bbox' / 'images' / sample.name, sample)
    dicom = tmp_path / 'RG1_UNCR.dcm'
    shutil.copy(SHARED_DATA / 'dicom' / dicom.name, dicom)
  else:
    sample = tmp_path / 'sample.png'
    Image.fromarray(np.random.default_rng(0).integers(0, 65536, (300, 260), np.uint16)).save(
        sample)
    dicom = tmp_path / 'synthetic.dcm'
    _dicom(dicom, np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (48, 1)))
  for i, path in enumerate((sample, dicom)):
    _upload(page, path)
    if page.is_visible('#ood'):  # a phantom-trained model: real X-rays may look foreign
      page.screenshot(full_page=True, path=str(tmp_path / f'{i + 1}a-ood-warning.png'))
      page.click('#ood-show')
    assert page.is_visible('#runs')
    names = page.locator('.run').nth(0).locator('tbody tr td:first-child').all_text_contents()
    assert 'Effusion' in names
    _wait_map(page)
    assert path.name in page.inner_text('#status')
    page.screenshot(full_page=True, path=str(tmp_path / f'{i + 1}-{path.suffix[1:]}.png'))
  assert 'dicom' in page.inner_text('#status')
  # A photo: the OOD warning comes before the findings.
  import matplotlib.cbook
  photo = tmp_path / 'grace_hopper.jpg'
  with matplotlib.cbook.get_sample_data('grace_hopper.jpg') as f:
    photo.write_bytes(f.read())
  _upload(page, photo)
  assert page.is_visible('#ood') and page.is_hidden('#runs')
  assert 'does not look like the chest X-rays' in page.inner_text('#ood')
  page.screenshot(full_page=True, path=str(tmp_path / '3-photo-ood.png'))
  page.click('#ood-show')
  assert page.is_visible('#runs')
  # A broken file: a message in the page; the next upload works.
  broken = tmp_path / 'broken.png'
  broken.write_bytes(b'\x89PNG\r\n\x1a\n garbage')
  _upload(page, broken)
  assert page.is_visible('#error') and 'broken.png' in page.inner_text('#error')
  page.screenshot(full_page=True, path=str(tmp_path / '4-broken.png'))
  _upload(page, sample)
  assert page.is_hidden('#error')
