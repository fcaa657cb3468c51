"""Fault injection (issue 15, item 5): one table of bad inputs, each through the user's entry point.

Every case checks four things:
- a clear error naming the file, key or flag and what was expected;
- a non-zero exit status where a CLI is involved (`python -m cxr_jax.main` in a subprocess;
  `cxr_jax.predict`, `cxr_jax.tools.import_weights` and `cxr_jax.report` through the `main`
  their `__main__` hands to `sys.exit`, in-process to keep the file fast);
- nothing already written is damaged: prepared data sets, earlier imports, predictions and
  reports stay byte-identical, and no half-written file (TFDS `incomplete.*`, io_utils `.tmp`,
  `import_weights`' `DIR.tmp`) is left behind;
- other work goes on: a failed build leaves the data dir usable, predict still processes the
  good files of a folder.
Builders are driven through the TFDS API (`download_and_prepare` with a manual dir) on copies
of their `dummy_data/`, damaged in the copy.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pathlib
import pickle
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import types

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import cxr_jax.data  # noqa: F401  (registers the builders)
from cxr_jax import evaluate, io_utils, report

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = REPO / 'cxr_jax' / 'data'


# ----------------------------------------------------------------------------- helpers
def _snapshot(root: pathlib.Path) -> dict[str, str]:
  """{relative path: sha256} of every file under root."""
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob('*')) if p.is_file()}


def _half_written(root: pathlib.Path) -> list[str]:
  """Staging leftovers: TFDS `incomplete.*` folders, io_utils `.*.tmp` files, `DIR.tmp`."""
  return sorted(str(p) for p in root.rglob('*')
                if p.name.startswith('incomplete.') or p.name.endswith('.tmp'))


def _rewrite_tar_member(tarball: pathlib.Path, member: str, data: bytes) -> None:
  with tarfile.open(tarball) as tar:
    members = [(m, tar.extractfile(m).read()) for m in tar]
  assert any(m.name.endswith(member) for m, _ in members), member
  with tarfile.open(tarball, 'w:gz') as tar:
    for m, content in members:
      content = data if m.name.endswith(member) else content
      m.size = len(content)
      tar.addfile(m, io.BytesIO(content))


def _append(path: pathlib.Path, text: str) -> None:
  path.write_text(path.read_text().rstrip('\n') + '\n' + text)


def _truncate(path: pathlib.Path, keep: float | int) -> None:
  data = path.read_bytes()
  path.write_bytes(data[:int(len(data) * keep) if isinstance(keep, float) else keep])


def _png(path: pathlib.Path, shape: tuple[int, int]) -> None:
  Image.fromarray(np.zeros(shape, np.uint8)).save(path, format='PNG')


# ----------------------------------------------------------------------------- TFDS builders
# Built once from pristine dummy data; every failing build below goes into the same data dir
# and must leave these byte-identical.
PREPARED = {'nih_chest_xray14/official-224': 'nih_chest_xray14',
            'montgomery_tb/256': 'montgomery_tb',
            'jsrt_scr/256': 'jsrt_scr'}


def _prepare(name: str, data_dir: pathlib.Path, manual_dir: pathlib.Path) -> None:
  tfds.builder(name, data_dir=str(data_dir)).download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory) -> pathlib.Path:
  data_dir = tmp_path_factory.mktemp('tfds')
  for name, dummy in PREPARED.items():
    _prepare(name, data_dir, DATA / dummy / 'dummy_data')
  return data_dir


def _nih_corrupt_png(m):
  _rewrite_tar_member(m / 'images_002.tar.gz', '00002106_000.png', b'\x89PNG\r\n\x1a\n garbage')


def _nih_data_entry_duplicate(m):
  # Same image, other labels: keeping either row silently would mislabel it.
  _append(m / 'Data_Entry_2017_v2020.csv',
          '00000001_001.png,Hernia,1,1,58,M,PA,2894,2729,0.143,0.143\n')


def _nih_image_absent_from_tarball(m):
  # Listed in Data_Entry and test_list, in images_001's name range, but not in the tarball.
  _append(m / 'Data_Entry_2017_v2020.csv',
          '00001000_000.png,No Finding,0,1000,40,M,PA,2048,2500,0.14,0.14\n')
  _append(m / 'test_list.txt', '00001000_000.png')


def _jsrt_mask(m, name: str) -> pathlib.Path:
  return m / 'scratch' / 'fold2' / 'masks' / name / 'JPCLN002.gif'


# (id, builder config to build, dummy_data to copy, damage, exception, message regex)
BUILDER_FAULTS = [
  ('nih-corrupt-png-in-tarball', 'nih_chest_xray14/official-256', 'nih_chest_xray14',
   _nih_corrupt_png, ValueError, r'cannot read image 00002106_000\.png in \S*images_002\.tar\.gz'),
  ('nih-truncated-tarball', 'nih_chest_xray14/official-256', 'nih_chest_xray14',
   lambda m: _truncate(m / 'images_002.tar.gz', 0.5), ValueError,
   r'images_002\.tar\.gz: truncated or corrupt tarball .*expected the complete images_002'),
  ('nih-missing-csv-column', 'nih_chest_xray14/official-256', 'nih_chest_xray14',
   lambda m: (m / 'Data_Entry_2017_v2020.csv').write_text(
       (m / 'Data_Entry_2017_v2020.csv').read_text().replace('Patient Age', 'Age', 1)),
   ValueError, r"Data_Entry_2017_v2020\.csv: missing column\(s\) \['Patient Age'\].*Expected"),
  ('nih-duplicate-id-in-data-entry', 'nih_chest_xray14/official-256', 'nih_chest_xray14',
   _nih_data_entry_duplicate, ValueError,
   r'Data_Entry_2017_v2020\.csv, line 51: .*image 00000001_001\.png already on line 3; '
   r'expected one row per image'),
  ('nih-duplicate-id-in-list', 'nih_chest_xray14/official-256', 'nih_chest_xray14',
   lambda m: _append(m / 'test_list.txt', '00000003_001.png'), ValueError,
   r"test_list\.txt: 1 image\(s\) listed more than once, e\.g\. \['00000003_001\.png'\]"),
  ('nih-listed-image-absent-from-tarball', 'nih_chest_xray14/official-256', 'nih_chest_xray14',
   _nih_image_absent_from_tarball, FileNotFoundError,
   r"images_001\.tar\.gz lacks 1 image\(s\), e\.g\. \['00001000_000\.png'\]"),
  ('nih-listed-image-absent-from-data-entry', 'nih_chest_xray14/official-256',
   'nih_chest_xray14', lambda m: _append(m / 'test_list.txt', '00009999_000.png'), ValueError,
   r"test_list: 1 image\(s\) not in Data_Entry, e\.g\. \['00009999_000\.png'\]"),
  ('montgomery-missing-mask', 'montgomery_tb/512', 'montgomery_tb',
   lambda m: (m / 'MontgomerySet/ManualMask/leftMask/MCUCXR_0003_0.png').unlink(),
   FileNotFoundError, r'montgomery_tb: 1 expected file\(s\) missing under manual_dir .*\n'
   r'  MontgomerySet/ManualMask/leftMask/MCUCXR_0003_0\.png\n'),
  ('tb-combined-missing-mask', 'tb_combined/512', 'tb_combined',
   lambda m: (m / 'MontgomerySet/ManualMask/rightMask/MCUCXR_0003_0.png').unlink(),
   FileNotFoundError, r'tb_combined: 1 expected file\(s\) missing under manual_dir .*\n'
   r'  MontgomerySet/ManualMask/rightMask/MCUCXR_0003_0\.png\n'),
  ('montgomery-mask-wrong-size', 'montgomery_tb/512', 'montgomery_tb',
   lambda m: _png(m / 'MontgomerySet/ManualMask/leftMask/MCUCXR_0003_0.png', (10, 10)),
   ValueError, r'mask \S*leftMask/MCUCXR_0003_0\.png is 10x10, its image 40x49'),
  ('shenzhen-mask-wrong-size', 'shenzhen_tb/512', 'shenzhen_tb',
   lambda m: _png(m / 'ChinaSet_AllFiles/mask/CHNCXR_0001_0_mask.png', (10, 10)),
   ValueError, r'mask \S*ChinaSet_AllFiles/mask/CHNCXR_0001_0_mask\.png is 10x10, its image'),
  ('jsrt-wrong-raw-size', 'jsrt_scr/512', 'jsrt_scr',
   lambda m: _truncate(m / 'All247images/JPCLN002.IMG', 8092), ValueError,
   r'JPCLN002\.IMG: 8092 bytes is not a square 16-bit raw image '
   r'\(JSRT: 2048 x 2048 x 2 = 8388608 bytes\)'),
  ('jsrt-missing-mask', 'jsrt_scr/512', 'jsrt_scr',
   lambda m: _jsrt_mask(m, 'heart').unlink(), FileNotFoundError,
   r'jsrt_scr: 1 expected file\(s\) missing under manual_dir .*\n'
   r'  scratch/fold2/masks/heart/JPCLN002\.gif\n'),
  ('jsrt-mask-wrong-size', 'jsrt_scr/512', 'jsrt_scr',
   lambda m: Image.new('P', (16, 16)).save(_jsrt_mask(m, 'heart'), format='GIF'), ValueError,
   r'fold2/masks/heart/JPCLN002\.gif: mask is 16x16, expected square and the same size'),
]


@pytest.mark.parametrize('name,dummy,damage,exc,match', [c[1:] for c in BUILDER_FAULTS],
                         ids=[c[0] for c in BUILDER_FAULTS])
def test_builder_fault(tfds_dir, tmp_path, name, dummy, damage, exc, match):
  manual = tmp_path / 'manual'
  shutil.copytree(DATA / dummy / 'dummy_data', manual)
  damage(manual)
  before = _snapshot(tfds_dir)
  with pytest.raises(exc, match=match):
    _prepare(name, tfds_dir, manual)
  after = _snapshot(tfds_dir)
  # The prepared data sets are byte-identical; the failed build wrote no data (TFDS may record
  # the builder's config under <name>/.config/, which is not data).
  assert {k: v for k, v in after.items() if k in before} == before
  assert [k for k in after if k not in before and '/.config/' not in k] == []
  assert _half_written(tfds_dir) == []
  assert not tfds.builder(name, data_dir=str(tfds_dir)).is_prepared()


def test_data_dir_still_builds_and_reads_after_the_faults(tfds_dir):
  # The faults above ran in this data dir (when the whole file runs): it still takes a good
  # build, and the data sets prepared before them read back in full.
  _prepare('jsrt_scr/512', tfds_dir, DATA / 'jsrt_scr' / 'dummy_data')
  sizes = {name: {s: v.num_examples
                  for s, v in tfds.builder(name, data_dir=str(tfds_dir)).info.splits.items()}
           for name in (*PREPARED, 'jsrt_scr/512')}
  assert sizes['nih_chest_xray14/official-224'] == {'train': 23, 'validation': 6, 'test': 20,
                                                    'bbox': 5}
  assert sizes['jsrt_scr/512'] == sizes['jsrt_scr/256'] == {'fold1': 4, 'fold2': 2}
  assert sum(sizes['montgomery_tb/256'].values()) == 20
  ds = tfds.load('nih_chest_xray14/official-224', split='bbox', data_dir=str(tfds_dir),
                 download=False)
  assert len(list(ds)) == 5


# ----------------------------------------------------------------------------- weight import
class _Evil:
  """A pickled call of a non-allow-listed global: running it would create `marker`."""

  def __init__(self, marker: pathlib.Path):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f'touch {shlex.quote(str(self.marker))}',)


@pytest.fixture(scope='module')
def weights(tmp_path_factory) -> dict[str, pathlib.Path]:
  """A resnet18 state dict (zip and legacy torch formats) and an earlier import of it."""
  torch = pytest.importorskip('torch')
  torchvision = pytest.importorskip('torchvision')
  from cxr_jax.tools import import_weights

  d = tmp_path_factory.mktemp('weights')
  torch.manual_seed(0)
  sd = torchvision.models.resnet18(weights=None, num_classes=4).state_dict()
  torch.save(sd, d / 'resnet18.pth')
  torch.save(sd, d / 'resnet18_legacy.pth', _use_new_zipfile_serialization=False)
  assert import_weights.main(['--source=torchvision', '--arch=resnet18',
                              f'--input={d / "resnet18.pth"}', f'--output={d / "earlier"}']) == 0
  return {'dir': d, 'zip': d / 'resnet18.pth', 'legacy': d / 'resnet18_legacy.pth',
          'earlier': d / 'earlier'}


def _evil_file(kind: str, path: pathlib.Path, marker: pathlib.Path) -> None:
  import torch
  if kind == 'pickle':  # a bare pickle named .pth: read as the legacy format's first record
    path.write_bytes(pickle.dumps(_Evil(marker)))
  else:
    torch.save({'conv1.weight': torch.zeros(1), 'x': _Evil(marker)}, path,
               _use_new_zipfile_serialization=kind == 'zip')


# (id, file, flags, damage, message regex)
WEIGHT_FAULTS = [
  ('wrong-arch-resnet34', 'zip', '--arch=resnet34', None,
   r'resnet18\.pth \(torchvision resnet34\): state_dict holds a resnet18, not a resnet34'),
  ('wrong-arch-densenet121', 'zip', '--arch=densenet121', None,
   r"resnet18\.pth: no classifier weight 'classifier\.weight'; expected a torchvision "
   r'densenet121 state dict'),
  ('truncated-pth-zip', 'zip', '--arch=resnet18', lambda p: _truncate(p, 0.5),
   r'\.pth: truncated or not a torch checkpoint \(BadZipFile.*expected a complete file '
   r'written by torch\.save'),
  ('truncated-pth-legacy', 'legacy', '--arch=resnet18', lambda p: _truncate(p, 0.5),
   r'\.pth: truncated or not a torch checkpoint .*expected a complete file'),
  ('truncated-pth-use-torch', 'zip', '--arch=resnet18 --use_torch',
   lambda p: _truncate(p, 0.5), r'\.pth: torch\.load\(weights_only=True\) cannot read it: '),
]


@pytest.mark.parametrize('source,flags,damage,match', [c[1:] for c in WEIGHT_FAULTS],
                         ids=[c[0] for c in WEIGHT_FAULTS])
def test_weight_import_fault(weights, tmp_path, capsys, source, flags, damage, match):
  from cxr_jax.tools import import_weights
  src = weights[source]
  if damage is not None:
    src = tmp_path / src.name
    shutil.copy(weights[source], src)
    damage(src)
  before = _snapshot(weights['earlier'])
  capsys.readouterr()
  code = import_weights.main(['--source=torchvision', *flags.split(), f'--input={src}',
                              f'--output={weights["earlier"]}', '--overwrite'])
  err = capsys.readouterr().err
  assert code == 1
  assert err.startswith(f'import_weights: {src}'), err
  if '--use_torch' not in flags:  # torch's own messages run over several lines
    assert len(err.strip().splitlines()) == 1, err
  assert re.search(match, err), err
  assert _snapshot(weights['earlier']) == before  # --overwrite replaced nothing
  assert _half_written(weights['dir']) == [] and _half_written(tmp_path) == []


@pytest.mark.filterwarnings('ignore:Detected pickle protocol')  # torch, on the bare pickle
@pytest.mark.parametrize('kind', ['zip', 'legacy', 'pickle'])
def test_weight_import_refuses_pickled_code_without_running_it(weights, tmp_path, capsys, kind):
  from cxr_jax import pretrained
  from cxr_jax.tools import import_weights
  marker = tmp_path / 'executed'
  src = tmp_path / f'evil_{kind}.pth'
  _evil_file(kind, src, marker)
  # The payload is live: an unrestricted unpickler runs it (then the marker is removed again).
  pickle.loads(pickle.dumps(_Evil(marker)))
  assert marker.exists()
  marker.unlink()
  with pytest.raises(pretrained.WeightsFileError,
                     match=rf'{src.name}: refusing to unpickle (posix|os)\.system'):
    pretrained.read_pth(src)
  capsys.readouterr()
  code = import_weights.main(['--source=torchvision', '--arch=resnet18', f'--input={src}',
                              f'--output={tmp_path / "out"}'])
  err = capsys.readouterr().err
  assert code == 1 and 'refusing to unpickle' in err and src.name in err, err
  # torch.load(weights_only=True), behind --use_torch, refuses it too.
  code = import_weights.main(['--source=torchvision', '--arch=resnet18', f'--input={src}',
                              f'--output={tmp_path / "out"}', '--use_torch'])
  err = capsys.readouterr().err
  assert code == 1 and 'weights_only' in err and src.name in err, err
  assert not marker.exists()  # never executed
  assert not (tmp_path / 'out').exists() and _half_written(tmp_path) == []


# ----------------------------------------------------------------------------- configs
CONFIG_FAULTS = [
  ('unknown-key', '--config.bogus=1', r'bogus'),
  ('wrong-type', '--config.batch_size=abc', r'config\.batch_size=abc.*int'),
  ('unknown-registry-name', '--config.model.name=nosuchnet',
   r"config\.model\.name: Unknown model 'nosuchnet'; valid names: .*mobilenet_v1"),
]


@pytest.mark.parametrize('flag,match', [c[1:] for c in CONFIG_FAULTS],
                         ids=[c[0] for c in CONFIG_FAULTS])
def test_config_fault(tmp_path, flag, match):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'config.json').write_text('{"name": "an earlier run"}\n')
  before = _snapshot(workdir)
  env = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3', 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run(
      [sys.executable, '-m', 'cxr_jax.main', '--config=configs/mobilenet_baseline.py:demo',
       f'--workdir={workdir}', flag], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=300)
  # A usage error: one line on stderr, exit status 2 (cxr_jax/errors.py).
  assert proc.returncode == 2, proc.stderr[-2000:]
  error_lines = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  assert len(error_lines) == 1 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  assert re.search(match, error_lines[0]), proc.stderr[-2000:]
  assert _snapshot(workdir) == before and _half_written(workdir) == []


# ----------------------------------------------------------------------------- predict
def _dicom(path: pathlib.Path, pixels: bool) -> None:
  """A DX DICOM file: 0 x 0 pixels, or no PixelData at all (like a report or a key object)."""
  pytest.importorskip('pydicom')
  from pydicom.dataset import FileDataset, FileMetaDataset
  from pydicom.uid import ExplicitVRLittleEndian, generate_uid
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = '1.2.840.10008.5.1.4.1.1.1.1'  # digital X-ray
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = FileDataset(str(path), {}, file_meta=meta, preamble=b'\0' * 128)
  ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
  ds.Modality, ds.PatientName = 'DX', 'Fault^Injection'
  if pixels:
    ds.Rows = ds.Columns = 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, 'MONOCHROME2'
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = b''
  ds.save_as(path, enforce_file_format=True)


def _zero_pixel_png(path: pathlib.Path) -> None:
  """A well-formed PNG whose header declares 0 x 0 pixels (Pillow cannot write one)."""
  import struct
  import zlib

  def chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack('>I', len(data)) + kind + data +
            struct.pack('>I', zlib.crc32(kind + data)))
  path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', 0, 0, 8, 0, 0, 0,
                                                                         0)) +
                   chunk(b'IDAT', zlib.compress(b'')) + chunk(b'IEND', b''))


# (id, file name, writer, message regex)
PREDICT_FAULTS = [
  ('empty-png', 'empty.png', lambda p: p.write_bytes(b''),
   r'empty\.png: the file is empty \(0 bytes\); expected an X-ray image'),
  ('empty-dicom', 'empty.dcm', lambda p: p.write_bytes(b''),
   r'empty\.dcm: the file is empty \(0 bytes\)'),
  ('wrong-extension', 'scan.bmp', lambda p: Image.new('L', (8, 8)).save(p, format='BMP'),
   r"scan\.bmp: unsupported file type '\.bmp'; expected one of \.png, \.jpg, \.jpeg, \.dcm"),
  ('dicom-without-pixel-data', 'nopixels.dcm', lambda p: _dicom(p, pixels=False),
   r'nopixels\.dcm: the DICOM file holds no pixel data .*expected a DICOM image'),
  ('zero-pixel-png', 'zero.png', _zero_pixel_png,
   r'zero\.png: the PNG declares 0x0 pixels; expected an image of at least 1x1'),
  ('zero-pixel-dicom', 'zero.dcm', lambda p: _dicom(p, pixels=True),
   r"zero\.dcm: cannot read the pixel data .*'(Rows|Columns)' value of '0' is invalid"),
]


@pytest.mark.parametrize('name,write,match', [c[1:] for c in PREDICT_FAULTS],
                         ids=[c[0] for c in PREDICT_FAULTS])
def test_predict_fault(tiny_run_dir, tmp_path, capsys, name, write, match):
  from cxr_jax import predict
  inputs, out = tmp_path / 'in', tmp_path / 'out'
  inputs.mkdir()
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 36), np.uint8)).save(
      inputs / 'good.png')
  write(inputs / name)
  # An earlier prediction of a file of that name must survive the failed one.
  out.mkdir()
  (out / f'{name}.json').write_text('{"findings": ["from an earlier run"]}\n')
  before = _snapshot(out)
  # A wrong extension is not picked up from a folder: name it on the command line.
  target = inputs / name if name.endswith('.bmp') else inputs
  capsys.readouterr()
  code = predict.main(['predict', f'--workdir={tiny_run_dir}', f'--output={out}', '--explain=none',
                       str(target)])
  err = capsys.readouterr().err
  assert code == 1, err
  failed = [line for line in err.splitlines() if line.startswith('FAILED ')]
  assert len(failed) == 1 and re.search(match, failed[0]), err
  assert _snapshot(out)[f'{name}.json'] == before[f'{name}.json']
  if target == inputs:  # the good file of the folder was still predicted
    record = json.loads((out / 'good.png.json').read_text())
    assert 0.0 < min(record['probabilities'].values()) <= max(record['probabilities'].values()) < 1
    assert '1 image(s) predicted, 1 failed.' in err
  assert _half_written(out) == []


# ----------------------------------------------------------------------------- disk full
def _fake_run(root: pathlib.Path, name: str, seed: int) -> str:
  """A finished run as `cxr_jax.report` reads it: config.json and one metrics file."""
  rng = np.random.default_rng(seed)
  y_true = (rng.random((30, 3)) < 0.5).astype(np.int32)
  y_true[:2] = [[0, 0, 0], [1, 1, 1]]
  metrics = evaluate.compute_metrics(y_true, rng.random(y_true.shape), ('Mass', 'Nodule', 'Edema'))
  io_utils.atomic_write_json(root / name / 'config.json',
                             {'name': name, 'report_models': [['train', name]]})
  io_utils.atomic_write_json(root / name / 'evaluate' / 'train' / 'metrics_test.json', metrics)
  return str(root / name)


class _FullDisk:
  """A file whose writes stop half way with ENOSPC (or whose fsync fails), like a full disk."""

  def __init__(self, f, where: str):
    self._f, self._where = f, where

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._f.close()

  def fileno(self) -> int:
    return self._f.fileno()

  def flush(self) -> None:
    self._f.flush()

  def write(self, data: bytes) -> int:
    if self._where == 'write':
      self._f.write(data[:len(data) // 2])
      self._f.flush()
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return self._f.write(data)


@pytest.mark.parametrize('fail_at', [1, 2], ids=['first-file', 'second-file'])
@pytest.mark.parametrize('where', ['write', 'fsync'])
def test_disk_full_while_writing_a_report(tmp_path, capsys, monkeypatch, fail_at, where):
  out = tmp_path / 'report'
  runs = [_fake_run(tmp_path, n, s) for n, s in (('a', 0), ('b', 1), ('c', 2))]
  assert report.main([f'--workdirs={runs[0]},{runs[1]}', f'--out={out}']) == 0
  before = _snapshot(out)
  assert sorted(before) == ['comparison.csv', 'comparison.md']

  # ENOSPC inside io_utils.atomic_write_files only (its own `os`), on the fail_at-th file.
  opened = []
  fake_os = types.ModuleType('os')
  fake_os.__dict__.update(vars(os))

  def fdopen(fd, *args, **kwargs):
    f = os.fdopen(fd, *args, **kwargs)
    opened.append(f)
    return _FullDisk(f, where) if len(opened) == fail_at else f

  def fsync(fd):
    if where == 'fsync' and len(opened) == fail_at:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    os.fsync(fd)

  fake_os.fdopen, fake_os.fsync = fdopen, fsync
  monkeypatch.setattr(io_utils, 'os', fake_os)
  capsys.readouterr()
  code = report.main([f'--workdirs={runs[0]},{runs[2]}', f'--out={out}'])
  err = capsys.readouterr().err
  assert code == 1, err
  failing = out / ('comparison.md', 'comparison.csv')[fail_at - 1]  # the order report writes
  assert err.startswith(f'error: {failing}: cannot write the comparison there (No space left '
                        'on device); the previous files in --out are untouched.'), err
  assert _snapshot(out) == before  # the previous report, byte for byte; no temp file left
  assert _half_written(out) == [] and sorted(p.name for p in out.iterdir()) == sorted(before)
