"""Atomic file writes: a reader never sees a half-written file, and a failed write leaves the old
one intact (write a temporary sibling, fsync, then ``os.replace``)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from mlxgate.errors import UserError


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix, dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def jsonable(x):
    """``x`` with numpy scalars as Python numbers and NaN/±inf as None (null): strict JSON that
    any reader parses (Python's default writes NaN/Infinity, which JSON does not have)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "item") and getattr(x, "ndim", None) == 0:  # numpy scalar / 0-d array
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def dumps(obj, indent: int | None = None) -> str:
    """Strict JSON text of ``obj`` (see :func:`jsonable`)."""
    return json.dumps(jsonable(obj), indent=indent, allow_nan=False)


def write_json(path: str | Path, obj, indent: int | None = 2) -> None:
    write_text(path, dumps(obj, indent=indent) + "\n")


def read_jsonl(path: str | Path, what: str = "data file") -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file. A missing or unreadable file,
    a line that is not JSON or not an object: UserError naming ``path:line``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {what} {path}: {err}") from None
    out = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{no}: not valid JSON ({err.msg}); each line must be one JSON object") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{no}: each line must be a JSON object")
        out.append((no, obj))
    return out


def save_figure(fig, path: str | Path, dpi: int = 120) -> None:
    """Save a matplotlib figure as PNG atomically."""
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")


def append_jsonl(path: str | Path, obj) -> None:
    """Append one JSON line and flush it to disk (events logs: a crash loses at most this line)."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(dumps(obj) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``path``; on success it takes ``path``'s place
    (an existing directory is replaced), on any error it is removed. Readers see the old directory
    or the complete new one, never a partial one."""
    import shutil

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
    old = None
    try:
        if path.exists():
            if not path.is_dir():
                raise UserError(f"{path} exists and is not a directory")
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / "x")
        os.replace(tmp, path)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
