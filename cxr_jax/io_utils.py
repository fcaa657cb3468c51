"""Atomic file writes: a failure never leaves a half-written artefact behind."""

import json
import os
import tempfile
from typing import Any

import numpy as np


def _atomic(path: str, write, mode: str = 'wb') -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp-', suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, mode) as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def atomic_write_text(path: str, text: str) -> None:
  _atomic(path, lambda f: f.write(text), mode='w')


def atomic_write_json(path: str, obj: Any) -> None:
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + '\n')


def atomic_write_npz(path: str, **arrays: np.ndarray) -> None:
  _atomic(path, lambda f: np.savez(f, **arrays))


def _jsonable(x: Any) -> Any:
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f'{type(x).__name__} is not JSON serialisable')
