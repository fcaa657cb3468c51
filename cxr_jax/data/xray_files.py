"""File helpers shared by the builders of real data sets (TB sets, JSRT/SCR, real samples).

All IO goes through `epath` (TFDS's `DatasetBuilderTestCase` mocks `os`/`open`, and epath also
reads from GCS), decoding through Pillow from the bytes.

Conventions: images come out as uint8 [S, S] with bright = dense (bone white), masks as uint8
[S, S] with values 0/255.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable

import numpy as np
from etils import epath
from PIL import Image

# Above this many source pixels per output pixel PIL first box-reduces by an integer factor
# (`reducing_gap`): 4x faster on 4892 x 4020 radiographs and visually identical to plain Lanczos.
_REDUCING_GAP = 2.0


def num_workers() -> int:
  """Threads for decoding: Pillow's decode/resize release the GIL, so threads scale with cores;
  one extra hides file latency. (Here, not in the builder modules: DatasetBuilderTestCase mocks
  the `os` those modules import.)"""
  return min(8, (os.cpu_count() or 1) + 1)


def missing_files_error(dataset: str, manual_dir: epath.Path, missing: Iterable[str],
                        instructions: str) -> FileNotFoundError:
  """A FileNotFoundError naming the data set, the manual dir and (up to 10 of) the missing files."""
  missing = sorted(missing)
  shown = '\n  '.join(missing[:10])
  more = f'\n  ... and {len(missing) - 10} more' if len(missing) > 10 else ''
  return FileNotFoundError(
    f'{dataset}: {len(missing)} expected file(s) missing under manual_dir {manual_dir}:\n  '
    f'{shown}{more}\n{instructions}'
  )


def read_pixels(path: epath.Path) -> np.ndarray:
  """Decodes an image file to a 2-D array: uint8, or uint16 for 16-bit grey files.

  Colour and palette files (some Shenzhen PNGs, SCR GIFs) are reduced to grey with Pillow's
  ITU-R 601 luma, which is exact for R = G = B.

  Raises:
    ValueError naming the file when it cannot be decoded.
  """
  try:
    with Image.open(io.BytesIO(path.read_bytes())) as im:
      im.load()
      if im.mode in ('I;16', 'I;16B', 'I;16L'):
        return np.asarray(im, dtype=np.uint16)
      if im.mode == 'I':
        arr = np.asarray(im)
        if arr.min() < 0 or arr.max() > 65535:
          raise ValueError(f'32-bit values outside 0..65535 ({arr.min()}..{arr.max()})')
        return arr.astype(np.uint16)
      if im.mode != 'L':
        im = im.convert('L')
      return np.asarray(im, dtype=np.uint8)
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f'cannot decode image {path}: {e}') from e


def to_unit(pixels: np.ndarray) -> np.ndarray:
  """uint8 or uint16 pixels -> float32 [H, W] in [0, 1].

  16-bit files are scaled by the largest value their bit depth allows. The NLM TB sets store
  12-bit values in 16-bit PNGs, so a file whose maximum fits in 12 bits is scaled by 4095 (by
  65535 it would come out almost black); otherwise by 65535. Never a per-image stretch, so the
  grey levels of different images stay comparable.
  """
  if pixels.dtype == np.uint8:
    return pixels.astype(np.float32) / 255.0
  scale = 4095.0 if int(pixels.max()) <= 4095 else 65535.0
  return pixels.astype(np.float32) / scale


def resize_image(unit: np.ndarray, size: int) -> np.ndarray:
  """float [H, W] in [0, 1] -> uint8 [size, size] (Lanczos, aspect ratio NOT kept).

  Squashing to a square is what paper 003 does (its ROIs are resized to 1024 x 1024); the
  original width and height are stored next to the image so the distortion can be undone.
  """
  im = Image.fromarray(np.asarray(unit, dtype=np.float32))
  if im.size != (size, size):
    im = im.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=_REDUCING_GAP)
  out = np.asarray(im) * 255.0
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
  """Binary mask [H, W] (any dtype, nonzero = inside) -> uint8 [size, size] with values 0/255.

  Area-weighted (box filter) downscale, then >= 50 % coverage: unlike nearest neighbour it does
  not depend on which source pixel happens to be sampled, so thin structures (clavicle tips)
  keep their area on average.
  """
  binary = (np.asarray(mask) > 0).astype(np.float32)
  if binary.shape != (size, size):
    im = Image.fromarray(binary)
    filt = Image.Resampling.BOX if min(binary.shape) >= size else Image.Resampling.NEAREST
    binary = np.asarray(im.resize((size, size), filt))
  return np.where(binary >= 0.5, 255, 0).astype(np.uint8)


def encode_png(arr: np.ndarray) -> bytes:
  """uint8 [H, W] -> PNG bytes (for fake dummy files and tests)."""
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format='PNG')
  return buf.getvalue()
