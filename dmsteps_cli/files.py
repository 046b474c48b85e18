"""Reading inputs and writing outputs: ``-`` for the standard streams, atomic writes for files.

Outputs (tables, reports, plots, samples) go through ``write_output``:
- ``-`` is standard output;
- a path that is not a regular file (a character device such as /dev/null or /dev/stdout, a
  named pipe, a process substitution) is opened and written directly, never replaced;
- a regular file, new or existing, is written to a temporary file in the same folder and renamed
  over it, so a reader never sees half a file and a failed run leaves the old one; a symlink is
  followed and its target replaced that way. A new file gets the usual mode (0666 less the
  umask, 0644 under the usual umask); an existing one keeps its mode.
Every failure is a ``BadInput`` whose message names the path and what is wrong, raised before
anything is written where that can be known in advance (``check_writable``).

Inputs go through ``read_input``: ``-`` is standard input; anything readable that is not a folder
(a regular file, a pipe, /dev/stdin) is read.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import tempfile
from pathlib import Path

from .errors import BadInput

STDIO = "-"


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _target(path: str) -> Path:
    """The file a write replaces: a symlink's target (followed to the end), else the path."""
    return Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)


def _is_special(path: str) -> bool:
    """``path`` exists (through any symlinks) and is not a regular file or folder: a device, a
    pipe, a socket, /dev/stdout or a process substitution's /dev/fd/N."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def check_writable(path: str | os.PathLike) -> None:
    """Raise BadInput if ``path`` cannot be an output file: empty, a folder (or ending in /), in a
    folder that does not exist or is not a folder. ``-`` (standard output) is always writable."""
    raw = os.fspath(path)
    if raw == STDIO:
        return
    if raw == "":
        raise BadInput("the output path is empty")
    if raw.endswith(os.sep):
        raise BadInput(f"cannot write {raw}: it names a folder, not a file")
    if _is_special(raw):
        return
    target = _target(raw)
    if target.is_dir():
        raise BadInput(f"cannot write {raw}: it is a folder")
    folder = target.parent
    if not folder.exists():
        raise BadInput(f"cannot write {raw}: folder {folder} does not exist")
    if not folder.is_dir():
        raise BadInput(f"cannot write {raw}: {folder} is not a folder")


def output_folder(path: str | os.PathLike, create: bool = False) -> Path:
    """``path`` as a folder for several output files: BadInput if it is empty or exists as
    something else; created (with its parents) when ``create``."""
    raw = os.fspath(path)
    if raw == "":
        raise BadInput("the output folder is empty")
    p = Path(raw)
    if p.exists() and not p.is_dir():
        raise BadInput(f"cannot write into {raw}: it exists and is not a folder")
    if create:
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BadInput(f"cannot create the folder {raw}: {_reason(exc)}") from None
    return p


def _new_file_mode() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def write_output(path: str | os.PathLike, data: str | bytes) -> None:
    """Write text or bytes to ``path`` as the module docstring says (``-``: standard output)."""
    raw = os.fspath(path)
    check_writable(raw)
    if raw == STDIO:
        if isinstance(data, bytes):
            sys.stdout.flush()
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        else:
            sys.stdout.write(data)
            sys.stdout.flush()
        return
    if _is_special(raw):
        _write_directly(raw, data)
        return
    target = _target(raw)
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = _new_file_mode()
    except OSError as exc:
        raise BadInput(f"cannot write {raw}: {_reason(exc)}") from None
    _write_atomic(raw, target, data, mode)


def _write_directly(raw: str, data: str | bytes) -> None:
    try:
        with open(raw, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
    except OSError as exc:
        raise BadInput(f"cannot write {raw}: {_reason(exc)}") from None


def _write_atomic(raw: str, target: Path, data: str | bytes, mode: int) -> None:
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise BadInput(f"cannot write {raw}: cannot create a file in {target.parent} ({_reason(exc)})") from None
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise BadInput(f"cannot write {raw}: {_reason(exc)}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_input(path: str | os.PathLike, what: str = "file") -> str:
    """The text of ``path`` (``-``: standard input). ``what`` names it in messages ("table ...")."""
    raw = os.fspath(path)
    if raw == STDIO:
        try:
            return sys.stdin.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise BadInput(f"{what} -: cannot read standard input ({exc})") from None
    if raw == "":
        raise BadInput(f"{what}: the path is empty")
    p = Path(raw)
    if p.is_dir():
        raise BadInput(f"{what} {raw} is a folder")
    if not p.exists():
        raise BadInput(f"{what} {raw} does not exist")
    try:
        with open(p, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        raise BadInput(f"{what} {raw}: not text (UTF-8)") from None
    except OSError as exc:
        raise BadInput(f"{what} {raw}: cannot read it ({_reason(exc)})") from None


def read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``; BadInput naming ``what`` if it is unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadInput(f"{what} {path}: not valid JSON ({first})") from None
    except OSError as exc:
        raise BadInput(f"{what} {path}: cannot read it ({exc.strerror or type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise BadInput(f"{what} {path}: expected a JSON object")
    return data
