"""File operations on every kind of run directory: local, gs://, s3://, ...

Everything that reads or writes under a workdir goes through here, so a path
is handled the same way whatever its kind. Paths are `etils.epath` paths: a
plain path uses the local file system; `gs://`, `s3://`, `az://` and `hf://`
go through fsspec (gcsfs, s3fs, adlfs, huggingface_hub), or through
TensorFlow's gfile when TensorFlow is installed.

Object stores have no append and no rename-into-place: a write replaces the
whole object when the file is closed. `open(path, "a")` is therefore refused
on them (fsspec would silently overwrite); writers that grow a file keep its
content and rewrite it, or start a new file (see `metrics.MetricWriter`).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import IO, Any

from etils import epath

# Schemes etils.epath understands, and the package that serves each through
# fsspec (with the install that brings it).
_SCHEME_PACKAGES = {
    "gs": ("gcsfs", "pip install 'jaxrl_llm[gcs]'"),
    "s3": ("s3fs", "pip install s3fs"),
    "az": ("adlfs", "pip install adlfs"),
    "hf": ("huggingface_hub", "pip install huggingface_hub"),
}

PathLike = str | os.PathLike


def scheme(path: PathLike) -> str | None:
  """The URI scheme of `path` ("gs" for "gs://b/x"), None for a local path."""
  text = os.fspath(path)
  head, sep, _ = text.partition("://")
  return head if sep else None


def is_local(path: PathLike) -> bool:
  """Whether `path` is on the local (or a mounted) file system."""
  return scheme(path) is None


@functools.cache
def _has_module(name: str) -> bool:
  return importlib.util.find_spec(name) is not None


def _uses_tensorflow() -> bool:
  # etils serves gs:// etc. through TensorFlow's gfile when it is installed
  # (unless EPATH_USE_TF says no); then no fsspec package is needed.
  use_tf = os.environ.get("EPATH_USE_TF", "").lower() not in ("false", "no", "f", "0")
  return use_tf and _has_module("tensorflow")


def as_path(path: PathLike) -> epath.Path:
  """`path` as an `epath.Path`, with a clear error when it cannot be served.

  Raises:
    ValueError: the scheme is not one etils.epath supports.
    ImportError: the package that serves the scheme is not installed.
  """
  kind = scheme(path)
  if kind is not None:
    if kind not in _SCHEME_PACKAGES:
      supported = ", ".join(f"{s}://" for s in _SCHEME_PACKAGES)
      raise ValueError(f"path {os.fspath(path)!r} has scheme {kind}://, which etils.epath "
                       f"does not support; use a local (or mounted) path or one of {supported}")
    package, install = _SCHEME_PACKAGES[kind]
    if not _has_module(package) and not _uses_tensorflow():
      raise ImportError(f"path {os.fspath(path)!r} needs the '{package}' package (or "
                        f"TensorFlow): {install}")
  return epath.Path(path)


def join(path: PathLike, *parts: str) -> str:
  """`path/part/...` as a string, for every kind of path."""
  return os.fspath(as_path(path).joinpath(*parts))


def exists(path: PathLike) -> bool:
  return as_path(path).exists()


def makedirs(path: PathLike) -> None:
  """Creates the directory `path` and its parents (no error if it exists).

  On object stores a directory is only a name prefix, so nothing is created
  there (a wrong bucket shows at the first write); the check that the
  scheme's package is installed still runs.
  """
  as_path(path).mkdir(parents=True, exist_ok=True)


def open(path: PathLike, mode: str = "r") -> IO[Any]:  # noqa: A001
  """Opens `path` ("r", "w", "a" and their "b" forms; "a" on local paths only).

  A file written to an object store appears whole when it is closed.
  """
  if "a" in mode and not is_local(path):
    raise ValueError(f"cannot append to {os.fspath(path)!r}: object stores have no append "
                     "(fsspec would overwrite the object). Rewrite the whole file, or write "
                     "a new file next to it")
  return as_path(path).open(mode)


def read_text(path: PathLike) -> str:
  with open(path, "r") as f:
    return f.read()


def write_text(path: PathLike, text: str) -> None:
  """Writes (replaces) the file `path`."""
  with open(path, "w") as f:
    f.write(text)


def read_bytes(path: PathLike) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def write_bytes(path: PathLike, data: bytes) -> None:
  """Writes (replaces) the file `path`."""
  with open(path, "wb") as f:
    f.write(data)


def glob(directory: PathLike, pattern: str) -> list[str]:
  """Paths in `directory` whose names match `pattern` (`*`, `?`), sorted."""
  root = as_path(directory)
  if not root.exists():
    return []
  return sorted(os.fspath(p) for p in root.glob(pattern))
