"""Reading a user's own chest X-ray: PNG/JPEG (8- or 16-bit) and DICOM, as grey float [0, 1].

`read_image(path) -> (image float32 [H, W] in [0, 1], meta)`. Bright means dense (bone white),
as in the NIH PNGs the models are trained on, whatever the file stores:

- PNG/JPEG (Pillow): 8-bit grey / 16-bit grey ('I;16*', scaled by 65535, never clipped to
  8 bits) / 32-bit integer (scaled by 65535 when it fits in 16 bits, else by its maximum) /
  float (min-max); colour, palette and alpha images are converted to grey (ITU-R 601 luma,
  alpha dropped: radiographs carry no meaning in it).
- DICOM (pydicom, the optional `cxr-jax[dicom]` extra, imported only when a DICOM is read):
  modality LUT or RescaleSlope/Intercept, then the first VOI LUT or window (WindowCenter/Width)
  as a viewer shows it; without either, the data range is stretched to [0, 1]. MONOCHROME1
  (low values bright) is inverted. Compressed transfer syntaxes are decoded when pydicom has a
  handler for them (e.g. RLE natively, JPEG with pylibjpeg/GDCM) and refused with the file and
  the transfer syntax named otherwise. Multi-frame files: the first frame is used.

`meta` holds: 'path', 'format' ('png' | 'jpeg' | 'dicom' | Pillow's name), 'bit_depth',
'photometric_interpretation' (DICOM's, or the Pillow mode for other files), 'original_size'
(H, W), and for DICOM 'transfer_syntax', 'voi' ('lut' | 'window' | 'none'), 'num_frames'.
Every error (`ImageReadError`, a ValueError) names the file.
"""

import os
import struct
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

DICOM_SUFFIXES = ('.dcm', '.dicom')
PIL_SUFFIXES = ('.png', '.jpg', '.jpeg')
SUFFIXES = PIL_SUFFIXES + DICOM_SUFFIXES

_DICOM_EXTRA_HINT = "pip install 'cxr-jax[dicom]'"


class ImageReadError(ValueError):
  """A file that cannot be read as an X-ray; the message names the file and why."""


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
  """Reads one X-ray as float32 [H, W] in [0, 1] (bright = dense) and a meta dict (module doc).

  The reader is chosen by the file's content (DICOM preamble 'DICM', else Pillow), so a DICOM
  saved without the '.dcm' suffix still reads; an unknown suffix with unreadable content fails.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ImageReadError(f'{path}: no such file.')
  if os.path.getsize(path) == 0:
    raise ImageReadError(f'{path}: the file is empty (0 bytes); expected an X-ray image.')
  suffix = os.path.splitext(path)[1].lower()
  if suffix in DICOM_SUFFIXES or _has_dicom_preamble(path):
    image, meta = _read_dicom(path)
  elif suffix in PIL_SUFFIXES:
    image, meta = _read_pil(path)
  else:
    raise ImageReadError(
        f'{path}: unsupported file type {suffix or "(no suffix)"!r}; expected one of '
        f'{", ".join(SUFFIXES)}.')
  if not np.all(np.isfinite(image)):
    raise ImageReadError(f'{path}: the pixel data holds non-finite values.')
  meta['path'] = path
  return np.clip(image, 0.0, 1.0).astype(np.float32), meta


def _has_dicom_preamble(path: str) -> bool:
  with open(path, 'rb') as f:
    head = f.read(132)
  return len(head) == 132 and head[128:] == b'DICM'


# ------------------------------------------------------------------------------------ Pillow
def _read_pil(path: str) -> tuple[np.ndarray, dict[str, Any]]:
  try:
    with Image.open(path) as img:
      img.load()
      fmt = (img.format or '').lower()
      mode = img.mode
      image, bit_depth = _pil_to_grey(img, path)
  except UnidentifiedImageError:
    raise ImageReadError(f'{path}: {_unidentified(path)}') from None
  except (OSError, SyntaxError, ValueError) as e:
    if isinstance(e, ImageReadError):
      raise
    raise ImageReadError(f'{path}: cannot decode image ({e}).') from e
  meta = {'format': fmt, 'bit_depth': bit_depth, 'photometric_interpretation': mode,
          'original_size': tuple(int(d) for d in image.shape)}
  return image, meta


def _unidentified(path: str) -> str:
  """Why Pillow could not identify `path`, as precisely as its first bytes tell."""
  with open(path, 'rb') as f:
    head = f.read(24)
  if head[:8] == b'\x89PNG\r\n\x1a\n' and head[12:16] == b'IHDR':
    width, height = struct.unpack('>II', head[16:24])
    if width == 0 or height == 0:
      return f'the PNG declares {width}x{height} pixels; expected an image of at least 1x1.'
  return 'not a readable PNG/JPEG image.'


def _pil_to_grey(img: Image.Image, path: str) -> tuple[np.ndarray, int]:
  """float64 [H, W] in [0, 1] and the stored bit depth per sample."""
  mode = img.mode
  if mode == 'L':
    return np.asarray(img, np.float64) / 255.0, 8
  if mode == '1':
    return np.asarray(img, np.float64), 1
  if mode.startswith('I;16'):
    # np.asarray honours the byte order of 'I;16B' / 'I;16L'; values stay 0..65535.
    return np.asarray(img).astype(np.float64) / 65535.0, 16
  if mode == 'I':
    # Older Pillow versions open 16-bit PNGs as 32-bit 'I'; keep their 16-bit scale.
    arr = np.asarray(img).astype(np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0 and hi <= 65535:
      return arr / 65535.0, 16
    return _stretch(arr), 32
  if mode == 'F':
    return _stretch(np.asarray(img, np.float64)), 32
  if mode in ('LA', 'La'):
    return np.asarray(img.getchannel('L'), np.float64) / 255.0, 8
  if mode in ('RGB', 'RGBA', 'RGBa', 'RGBX', 'P', 'PA', 'CMYK', 'YCbCr', 'LAB', 'HSV'):
    if mode in ('P', 'PA'):
      img = img.convert('RGBA')
    # 'L' conversion is ITU-R 601-2 luma; alpha is dropped.
    return np.asarray(img.convert('RGB').convert('L'), np.float64) / 255.0, 8
  raise ImageReadError(f'{path}: unsupported Pillow image mode {mode!r}.')


def _stretch(arr: np.ndarray) -> np.ndarray:
  lo, hi = float(np.min(arr)), float(np.max(arr))
  if hi <= lo:
    return np.zeros_like(arr, dtype=np.float64)
  return (arr - lo) / (hi - lo)


# ------------------------------------------------------------------------------------- DICOM
def _import_pydicom():
  try:
    import pydicom
    import pydicom.pixels  # noqa: F401  (pydicom >= 3 layout)
  except ImportError as e:
    raise ImportError(
        f'Reading DICOM files needs pydicom >= 3: {_DICOM_EXTRA_HINT} ({e}).') from e
  return pydicom


def _read_dicom(path: str) -> tuple[np.ndarray, dict[str, Any]]:
  pydicom = _import_pydicom()
  from pydicom.pixels import apply_modality_lut, apply_voi_lut

  try:
    ds = pydicom.dcmread(path)
  except Exception as e:  # pydicom raises many types for broken files; all mean "unreadable".
    raise ImageReadError(f'{path}: not a readable DICOM file ({type(e).__name__}: {e}).') from e
  if 'PixelData' not in ds:
    raise ImageReadError(f'{path}: the DICOM file holds no pixel data (no PixelData element); '
                         'expected a DICOM image.')
  file_meta = getattr(ds, 'file_meta', None)
  ts = getattr(file_meta, 'TransferSyntaxUID', None) if file_meta is not None else None
  ts_name = f'{ts.name} ({ts})' if ts is not None else 'unknown transfer syntax'
  try:
    arr = ds.pixel_array
  except Exception as e:
    if ts is not None and ts.is_compressed:
      raise ImageReadError(
          f'{path}: cannot decode compressed transfer syntax {ts_name}: {e}. Install a '
          'decoder plug-in (e.g. `pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg` '
          'or `pip install python-gdcm`) or convert the file to an uncompressed syntax.') from e
    raise ImageReadError(f'{path}: cannot read the pixel data ({ts_name}): {e}') from e

  photometric = str(ds.get('PhotometricInterpretation', 'MONOCHROME2')).upper()
  num_frames = int(ds.get('NumberOfFrames', 1) or 1)
  samples = int(ds.get('SamplesPerPixel', 1) or 1)
  if num_frames > 1:
    arr = arr[0]
  meta = {'format': 'dicom', 'bit_depth': int(ds.get('BitsStored', ds.get('BitsAllocated', 0))),
          'photometric_interpretation': photometric, 'transfer_syntax': str(ts) if ts else None,
          'num_frames': num_frames}
  if samples > 1 or arr.ndim == 3:
    # Colour DICOM (rare for radiographs): pydicom returns RGB; take the luma, no VOI.
    rgb = np.asarray(arr, np.float64)
    grey = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    meta.update(voi='none', original_size=tuple(int(d) for d in grey.shape))
    return _stretch(grey), meta
  if arr.ndim != 2:
    raise ImageReadError(f'{path}: unexpected pixel array shape {arr.shape}.')

  try:
    values = apply_modality_lut(arr, ds)
    if 'VOILUTSequence' in ds and len(ds.VOILUTSequence):
      values, voi = apply_voi_lut(values, ds, index=0, prefer_lut=True), 'lut'
      bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
      lo, hi = 0.0, float(2 ** bits - 1)
    elif 'WindowCenter' in ds and 'WindowWidth' in ds:
      values, voi = apply_voi_lut(values, ds, index=0, prefer_lut=False), 'window'
      lo, hi = _window_output_range(ds)
    else:
      voi = 'none'
      lo, hi = float(np.min(values)), float(np.max(values))
  except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
    raise ImageReadError(f'{path}: invalid modality/VOI LUT attributes: {e}') from e
  values = np.asarray(values, np.float64)
  image = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
  if photometric == 'MONOCHROME1':
    image = 1.0 - image
  meta.update(voi=voi, original_size=tuple(int(d) for d in image.shape))
  return image, meta


def _window_output_range(ds) -> tuple[float, float]:
  """The [y_min, y_max] that pydicom's `apply_windowing` maps the window onto (same rules)."""
  if ds.get('ModalityLUTSequence'):
    lo, hi = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
  elif int(ds.get('PixelRepresentation', 0)) == 0:
    lo, hi = 0.0, float(2 ** int(ds.BitsStored) - 1)
  else:
    lo, hi = -float(2 ** (int(ds.BitsStored) - 1)), float(2 ** (int(ds.BitsStored) - 1) - 1)
  slope, intercept = ds.get('RescaleSlope'), ds.get('RescaleIntercept')
  if slope is not None and intercept is not None:
    lo, hi = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
  return min(lo, hi), max(lo, hi)
