"""Uploads: content sniffing, and decoding in worker processes with a time and memory limit.

An upload is never trusted: its type comes from its first bytes (PNG signature, JPEG SOI
marker, DICOM 'DICM' preamble), not from its name; it is written under a server-chosen name into
the server's private temporary folder, decoded by `cxr_jax.imageio.read_image` (what `predict`
uses, so the same refusals) in a separate process, and deleted at once. A worker that runs past
the time limit, or dies (a decompression bomb hitting the memory limit), is replaced; the
server keeps serving. Messages name the upload by the name the client gave it, never by a path
on this machine.

This module imports nothing heavy at top level: the workers are spawned processes that import it.
"""

import io
import multiprocessing
import os
import threading
import uuid
from typing import Any

import numpy as np

# Larger images are refused before their pixels are decoded (a 4,300 x 3,500 CR plate is 15 MP).
MAX_PIXELS = 60_000_000
# Address space of a decoding worker: a bomb fails there with MemoryError, not in the server.
WORKER_MEMORY_BYTES = 6 << 30
DISPLAY_SIZE = 1024  # longest side of the grey PNG the page shows
KINDS = {'png': '.png', 'jpeg': '.jpg', 'dicom': '.dcm'}


class UploadError(ValueError):
  """An upload that cannot be used; the message is for the user and names the upload."""


def sniff(head: bytes) -> str | None:
  """'png' | 'jpeg' | 'dicom' from a file's first 132 bytes, or None."""
  if head.startswith(b'\x89PNG\r\n\x1a\n'):
    return 'png'
  if head.startswith(b'\xff\xd8\xff'):
    return 'jpeg'
  if len(head) >= 132 and head[128:132] == b'DICM':
    return 'dicom'
  return None


def display_png(image: np.ndarray, size: int = DISPLAY_SIZE) -> bytes:
  """Grey float [H, W] in [0, 1] -> an 8-bit PNG whose longest side is at most `size`."""
  from PIL import Image
  h, w = image.shape
  scale = min(1.0, size / max(h, w))
  img = Image.fromarray(np.asarray(image, np.float32), mode='F')
  if scale < 1.0:
    img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                     Image.Resampling.LANCZOS)
  grey = np.round(np.clip(np.asarray(img), 0.0, 1.0) * 255.0).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(grey, mode='L').save(buf, format='PNG')
  return buf.getvalue()


# ------------------------------------------------------------------------------ worker side
def _limit_memory() -> None:
  try:
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = WORKER_MEMORY_BYTES if hard == resource.RLIM_INFINITY else min(hard,
                                                                           WORKER_MEMORY_BYTES)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
  except (ImportError, ValueError, OSError):  # not on Linux: the time limit still applies
    pass


def _pixel_count(path: str, kind: str) -> int:
  if kind == 'dicom':
    import pydicom
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return (int(ds.get('Rows', 0) or 0) * int(ds.get('Columns', 0) or 0)
            * int(ds.get('NumberOfFrames', 1) or 1))
  from PIL import Image
  with Image.open(path) as img:
    return img.size[0] * img.size[1]


def decode_file(path: str, kind: str) -> tuple[np.ndarray, dict[str, Any], bytes]:
  """In a worker: (grey float32 [H, W] in [0, 1], imageio meta, display PNG) of one file."""
  from cxr_jax import imageio
  try:
    pixels = _pixel_count(path, kind)
  except Exception:  # unreadable header: read_image gives the precise message below
    pixels = 0
  if pixels > MAX_PIXELS:
    raise imageio.ImageReadError(f'{path}: {pixels:,} pixels; at most {MAX_PIXELS:,} are '
                                 'accepted.')
  image, meta = imageio.read_image(path)
  return image, meta, display_png(image)


# ------------------------------------------------------------------------------ server side
class DecodePool:
  """Spawned worker processes decoding uploads, each call under a time limit."""

  def __init__(self, workers: int = 2, timeout_s: float = 30.0):
    self.workers = workers
    self.timeout_s = timeout_s
    self._lock = threading.Lock()
    self._pool = None

  def _get(self):
    with self._lock:
      if self._pool is None:
        # spawn, not fork: the server process runs JAX and TensorFlow threads.
        ctx = multiprocessing.get_context('spawn')
        self._pool = ctx.Pool(self.workers, initializer=_limit_memory, maxtasksperchild=200)
      return self._pool

  def start(self) -> None:
    self._get()

  def _replace(self, pool) -> None:
    with self._lock:
      if self._pool is pool:
        self._pool = None
    pool.terminate()

  def decode(self, data: bytes, name: str, folder: str
             ) -> tuple[np.ndarray, dict[str, Any], bytes]:
    """Decodes an upload (bytes) named `name` by the client; UploadError with a message."""
    kind = sniff(data[:132])
    if kind is None:
      raise UploadError(f'{name}: not a PNG, JPEG or DICOM file (its content was checked, '
                        'not its name).')
    path = os.path.join(folder, f'upload-{uuid.uuid4().hex}{KINDS[kind]}')
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
      with os.fdopen(fd, 'wb') as f:
        f.write(data)
      pool = self._get()
      result = pool.apply_async(decode_file, (path, kind))
      try:
        image, meta, png = result.get(self.timeout_s)
      except multiprocessing.TimeoutError:
        self._replace(pool)
        raise UploadError(f'{name}: decoding took longer than {self.timeout_s:g} s and was '
                          'stopped.') from None
      except MemoryError:
        self._replace(pool)
        raise UploadError(f'{name}: decoding needed more memory than a worker may use '
                          f'({WORKER_MEMORY_BYTES >> 30} GiB).') from None
      except ValueError as e:  # ImageReadError and pydicom's value errors
        raise UploadError(str(e).replace(path, name)) from None
      except Exception as e:
        raise UploadError(f'{name}: cannot be decoded ({type(e).__name__}: '
                          f'{str(e).replace(path, name)}).') from None
    finally:
      if os.path.exists(path):
        os.remove(path)
    meta = {k: v for k, v in meta.items() if k != 'path'}
    meta['sniffed'] = kind
    return image, meta, png

  def close(self) -> None:
    with self._lock:
      pool, self._pool = self._pool, None
    if pool is not None:
      pool.terminate()
      pool.join()
