"""Writing files safely: a temporary file in the same folder, fsync, then os.replace.

A reader sees the old file or the new one, never a part. When the write fails (a read-only folder, a full
disk) the temporary file is removed and `OutputError` (a UserError) names the path and the OS's reason,
so the CLI prints one line instead of a traceback and no `.tmp` file is left behind.
"""

import contextlib
import os
from pathlib import Path

from pgolf.errors import UserError


class OutputError(UserError):
    """A file pgolf writes could not be written (permissions, read-only file system, disk full)."""


def os_error_text(e: OSError) -> str:
    """The OS's reason for an error, e.g. "No space left on device"."""
    return e.strerror or str(e) or type(e).__name__


def atomic_temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def fsync_folder(folder: Path) -> None:
    """Make a rename in folder durable (best effort: some file systems cannot open a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_synced(path: Path, write, mode: str = "wb") -> None:
    """Call write(f) on a new file at path and fsync it (the temporary half of an atomic write)."""
    with open(path, mode, encoding=None if "b" in mode else "utf-8") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path, write, mode: str = "wb") -> Path:
    """Call write(f) on a temporary file beside path, fsync it, and rename it onto path.

    An OSError on the way becomes OutputError naming path; the temporary file never outlives the call."""
    path = Path(path)
    replace_together([(path, write)], mode)
    return path


def atomic_write_bytes(path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text), mode="w")


def replace_together(files: list[tuple], mode: str = "wb") -> None:
    """Write several files, each (path, bytes) or (path, write(f)): every temporary file first (fsynced),
    then the renames, so a failure while writing changes none of them. OutputError naming the path on
    failure; no temporary file is left."""
    done: list[tuple[Path, Path]] = []
    current = None
    try:
        for path, data in files:
            current = Path(path)
            tmp = atomic_temp_path(current)
            done.append((current, tmp))
            write_synced(tmp, data if callable(data) else (lambda f, d=data: f.write(d)), mode)
        for current, tmp in done:
            os.replace(tmp, current)
    except OSError as e:
        raise OutputError(f"{current}: cannot write ({os_error_text(e)})") from None
    finally:
        for _, tmp in done:
            with contextlib.suppress(OSError):
                if tmp.exists():
                    tmp.unlink()
    for folder in {path.parent for path, _ in done}:
        fsync_folder(folder)
