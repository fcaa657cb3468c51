"""Atomic file writes: a failure never leaves a half-written artefact behind.

Every file the library writes goes through `atomic_write_files`: each file is written to a
temporary file in its destination folder, flushed to disk, and only when *all* of them are
written are they renamed into place (`os.replace` within one folder is atomic). A crash, a full
disk or an exception while producing any of them leaves the previous versions untouched.
"""

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

Content = bytes | str | Callable[[], bytes | str]


def atomic_write_files(files: Mapping[str | os.PathLike, Content]) -> list[str]:
  """Writes {path: content} all or nothing; returns the paths written.

  `content` is bytes, text (UTF-8) or a function producing either, called only while writing,
  so that a failing producer (a plot that raises) cancels the whole set.
  """
  staged: list[tuple[str, str]] = []
  path = ''
  try:
    for path, content in files.items():
      path = os.fspath(path)
      directory = os.path.dirname(os.path.abspath(path))
      os.makedirs(directory, exist_ok=True)
      fd, tmp = tempfile.mkstemp(dir=directory, prefix=f'.{os.path.basename(path)}.',
                                 suffix='.tmp')
      staged.append((tmp, path))
      # mkstemp creates 0600 files; outputs are meant to be read by others, as open() allows.
      os.fchmod(fd, 0o644)
      data = content() if callable(content) else content
      with os.fdopen(fd, 'wb') as f:
        f.write(data.encode('utf-8') if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    for tmp, path in staged:
      os.replace(tmp, path)
  except OSError as e:
    if e.filename is None and e.errno is not None:
      # A failed write or fsync (e.g. ENOSPC, disk full) names no file: name the one being
      # written. OSError(errno, ...) keeps the subclass (PermissionError, ...) of the original.
      raise OSError(e.errno, e.strerror, path) from e
    raise
  finally:
    for tmp, _ in staged:
      if os.path.exists(tmp):
        os.remove(tmp)
  return [path for _, path in staged]


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  atomic_write_files({path: text})


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  atomic_write_files({path: data})


def json_text(obj: Any, sort_keys: bool = True) -> str:
  """Strict JSON (NaN refused: strict readers reject it), numpy values as Python; keys sorted
  unless the order means something (models in table order)."""
  return json.dumps(obj, indent=2, sort_keys=sort_keys, default=_jsonable,
                    allow_nan=False) + '\n'


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
  atomic_write_files({path: lambda: json_text(obj)})


def npz_bytes(**arrays: np.ndarray) -> bytes:
  import io
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


def atomic_write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
  atomic_write_files({path: lambda: npz_bytes(**arrays)})


def _jsonable(x: Any) -> Any:
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f'{type(x).__name__} is not JSON serialisable')
