"""Reading users' X-rays: PNG/JPEG 8/16-bit, DICOM (windowing, MONOCHROME1, rescale), errors."""

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from cxr_jax import imageio


def _ramp(h: int = 6, w: int = 5, maxval: int = 255) -> np.ndarray:
  return np.round(np.linspace(0, maxval, h * w)).reshape(h, w)


def test_png_8bit_exact(tmp_path):
  arr = _ramp().astype(np.uint8)
  path = tmp_path / 'a.png'
  Image.fromarray(arr).save(path)
  image, meta = imageio.read_image(path)
  assert image.dtype == np.float32 and image.shape == (6, 5)
  np.testing.assert_allclose(image, arr / 255.0, atol=1e-7)
  assert meta['format'] == 'png' and meta['bit_depth'] == 8
  assert meta['original_size'] == (6, 5) and meta['path'] == str(path)


def test_png_16bit_keeps_full_range(tmp_path):
  # Values above 255 and differing only in the low byte must survive (no 8-bit clipping).
  arr = np.array([[0, 1, 255, 256], [1000, 30000, 65534, 65535]], np.uint16)
  path = tmp_path / 'b.png'
  Image.fromarray(arr).save(path)
  assert Image.open(path).mode.startswith('I')
  image, meta = imageio.read_image(path)
  np.testing.assert_allclose(image, arr / 65535.0, rtol=1e-6, atol=1e-9)
  assert meta['bit_depth'] == 16
  assert image[0, 1] > 0 and image[0, 3] > image[0, 2]


def test_rgb_and_rgba_png_to_grey(tmp_path):
  rgb = np.zeros((2, 2, 3), np.uint8)
  rgb[0, 0] = (255, 0, 0)
  rgb[1, 1] = (200, 200, 200)
  Image.fromarray(rgb).save(tmp_path / 'c.png')
  rgba = np.concatenate([rgb, np.full((2, 2, 1), 7, np.uint8)], axis=-1)
  Image.fromarray(rgba, 'RGBA').save(tmp_path / 'd.png')
  for name in ('c.png', 'd.png'):
    image, _ = imageio.read_image(tmp_path / name)
    assert image.shape == (2, 2)
    np.testing.assert_allclose(image[1, 1], 200 / 255, atol=1e-6)  # alpha ignored
    np.testing.assert_allclose(image[0, 0], round(255 * 0.299) / 255, atol=2 / 255)


def test_jpeg(tmp_path):
  arr = np.full((16, 16), 128, np.uint8)
  arr[:, 8:] = 200
  path = tmp_path / 'e.JPEG'
  Image.fromarray(arr).save(path, format='JPEG', quality=95)
  image, meta = imageio.read_image(path)
  assert meta['format'] == 'jpeg' and image.shape == (16, 16)
  np.testing.assert_allclose(image, arr / 255.0, atol=6 / 255)  # lossy


def _dicom(path, pixels: np.ndarray, **attrs) -> None:
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID = meta.MediaStorageSOPClassUID
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.Rows, ds.Columns = pixels.shape
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = 'MONOCHROME2'
  ds.BitsAllocated = 16
  ds.BitsStored = 12
  ds.HighBit = 11
  ds.PixelRepresentation = 0
  for k, v in attrs.items():
    setattr(ds, k, v)
  ds.PixelData = pixels.astype(np.uint16).tobytes()
  ds.save_as(path, enforce_file_format=True)


def test_dicom_no_voi_stretches_data_range(tmp_path):
  pixels = np.array([[100, 200], [300, 500]], np.uint16)
  _dicom(tmp_path / 'f.dcm', pixels)
  image, meta = imageio.read_image(tmp_path / 'f.dcm')
  np.testing.assert_allclose(image, (pixels - 100) / 400.0, atol=1e-6)
  assert meta['format'] == 'dicom' and meta['voi'] == 'none' and meta['bit_depth'] == 12
  assert meta['photometric_interpretation'] == 'MONOCHROME2'


def test_dicom_monochrome1_rescale_and_window(tmp_path):
  # Rescale: v = 2 * stored - 100; window (LINEAR, DICOM PS3.3 C.11.2.1.2) centre 300 width 401
  # over the rescaled values; output range of the 12-bit rescaled data = [-100, 8090].
  pixels = np.array([[0, 100], [200, 400]], np.uint16)
  _dicom(tmp_path / 'g.dcm', pixels, PhotometricInterpretation='MONOCHROME1',
         RescaleSlope=2, RescaleIntercept=-100, WindowCenter=300, WindowWidth=401)
  image, meta = imageio.read_image(tmp_path / 'g.dcm')
  v = pixels * 2.0 - 100  # [-100, 100], [300, 700]
  c, w = 300 - 0.5, 401 - 1
  win = np.clip((v - c) / w + 0.5, 0, 1)
  win = np.where(v <= c - w / 2, 0.0, np.where(v > c + w / 2, 1.0, win))
  np.testing.assert_allclose(image, 1.0 - win, atol=1e-6)  # MONOCHROME1: low values bright
  assert meta['voi'] == 'window' and meta['photometric_interpretation'] == 'MONOCHROME1'
  assert image[0, 0] == 1.0 and image[1, 1] == 0.0


def test_dicom_voi_lut_sequence(tmp_path):
  lut = Dataset()
  lut.LUTDescriptor = [4, 0, 8]  # 4 entries, first input value 0, 8-bit output
  lut.add_new(0x00283006, 'US', [0, 255, 64, 128])  # LUTData; US so pydicom writes ints
  pixels = np.array([[0, 1], [2, 3]], np.uint16)
  _dicom(tmp_path / 'h.dcm', pixels, VOILUTSequence=[lut])
  image, meta = imageio.read_image(tmp_path / 'h.dcm')
  np.testing.assert_allclose(image, np.array([[0, 255], [64, 128]]) / 255.0, atol=1e-6)
  assert meta['voi'] == 'lut'


def test_dicom_rle_compressed_is_decoded(tmp_path):
  pixels = (np.arange(64).reshape(8, 8) * 50).astype(np.uint16)
  _dicom(tmp_path / 'i.dcm', pixels)
  ds = pydicom.dcmread(tmp_path / 'i.dcm')
  ds.compress(RLELossless)
  ds.save_as(tmp_path / 'i.dcm')
  image, meta = imageio.read_image(tmp_path / 'i.dcm')
  assert meta['transfer_syntax'] == RLELossless
  np.testing.assert_allclose(image, pixels / pixels.max(), atol=1e-6)


def test_dicom_undecodable_compressed_syntax_is_refused_by_name(tmp_path):
  _dicom(tmp_path / 'j.dcm', np.zeros((4, 4), np.uint16))
  ds = pydicom.dcmread(tmp_path / 'j.dcm')
  ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
  # Not a valid JPEG 2000 codestream: refused whether or not a JPEG 2000 decoder is installed.
  ds.PixelData = pydicom.encaps.encapsulate([b'\x00' * 32])
  ds['PixelData'].VR = 'OB'
  ds.save_as(tmp_path / 'j.dcm')
  with pytest.raises(imageio.ImageReadError, match=r'j\.dcm.*JPEG 2000'):
    imageio.read_image(tmp_path / 'j.dcm')


def test_dicom_without_suffix_is_detected(tmp_path):
  _dicom(tmp_path / 'k', np.array([[0, 10]], np.uint16))
  image, meta = imageio.read_image(tmp_path / 'k')
  assert meta['format'] == 'dicom' and image.tolist() == [[0.0, 1.0]]


def test_errors_name_the_file(tmp_path):
  (tmp_path / 'bad.png').write_bytes(b'not a png at all')
  (tmp_path / 'bad.dcm').write_bytes(b'\x00' * 10)
  (tmp_path / 'notes.txt').write_text('hello')
  truncated = tmp_path / 'trunc.png'
  Image.fromarray(_ramp(64, 64).astype(np.uint8)).save(truncated)
  truncated.write_bytes(truncated.read_bytes()[:80])
  for name, pattern in (('bad.png', 'bad.png'), ('bad.dcm', 'bad.dcm.*DICOM'),
                        ('notes.txt', "notes.txt: unsupported file type '.txt'"),
                        ('trunc.png', 'trunc.png'), ('missing.png', 'missing.png: no such')):
    with pytest.raises(imageio.ImageReadError, match=pattern):
      imageio.read_image(tmp_path / name)


def test_missing_pydicom_gives_install_hint(tmp_path, monkeypatch):
  import builtins
  real_import = builtins.__import__

  def fake_import(name, *args, **kwargs):
    if name == 'pydicom' or name.startswith('pydicom.'):
      raise ImportError('No module named pydicom')
    return real_import(name, *args, **kwargs)

  _dicom(tmp_path / 'l.dcm', np.zeros((2, 2), np.uint16))
  monkeypatch.setattr(builtins, '__import__', fake_import)
  with pytest.raises(ImportError, match=r"pip install 'cxr-jax\[dicom\]'"):
    imageio.read_image(tmp_path / 'l.dcm')


def test_real_dicom(shared_data):
  image, meta = imageio.read_image(shared_data / 'dicom' / 'RG1_UNCR.dcm')
  assert image.shape == (1955, 1841) and image.dtype == np.float32
  assert meta['photometric_interpretation'] == 'MONOCHROME1' and meta['voi'] == 'window'
  assert 0.0 <= image.min() < image.max() <= 1.0
  # MONOCHROME1 inverted: the lungs (mid-height, a third in from each side) are darker than
  # the spine/mediastinum column in the middle.
  h, w = image.shape
  lungs = np.mean([image[h // 2 - 50:h // 2 + 50, x - 50:x + 50].mean()
                   for x in (w // 4, 3 * w // 4)])
  spine = image[h // 2 - 50:h // 2 + 50, w // 2 - 50:w // 2 + 50].mean()
  assert lungs < spine


def test_real_nih_png(shared_data):
  image, meta = imageio.read_image(shared_data / 'nih_bbox' / 'images' / '00000032_037.png')
  assert image.shape == (512, 512) and meta['bit_depth'] == 8
