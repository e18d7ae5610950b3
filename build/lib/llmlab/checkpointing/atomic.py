"""Write files and directories so that a reader (or a resumed run) never sees a half-written one.

A `kill -9` can land at any moment. Everything llmlab writes for later reading (checkpoints, `hf/`,
`hf_adapter/`, `summary.json`) is first written under a temporary name next to its final place and
renamed into place when complete: `os.replace` of a file is atomic on POSIX, so the final name holds
either the old content or the new, never a mix. A non-empty directory cannot be replaced atomically:
the old one is first renamed aside (`<name>.old`), the new one renamed in, then the old one deleted;
a crash between the two renames leaves no `<name>` but two whole copies, never a torn one.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def sibling(path: str | os.PathLike, suffix: str) -> Path:
    """`<path><suffix>` in the same directory (same filesystem, so a rename is atomic)."""
    path = Path(path)
    return path.with_name(path.name + suffix)


def remove(path: str | os.PathLike) -> None:
    """Delete a file, symlink or directory tree if it exists. A directory is first renamed to
    `<name>.deleting` so a crash mid-delete never leaves a half-deleted tree under a trusted name."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        doomed = path if path.name.endswith(".deleting") else sibling(path, ".deleting")
        if doomed != path:
            remove(doomed)
            os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable (survives power loss, not only a killed process)."""
    with contextlib.suppress(OSError):
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` via `<path>.partial` + fsync + os.replace."""
    path = Path(path)
    tmp = sibling(path, f".partial{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (disk full, an unencodable character) leaves no stray file
        raise
    fsync_dir(path.parent)


def replace_path(new: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move the complete `new` (file or directory) to `path`. A file replaces atomically; an existing
    directory is renamed aside to `<path>.old` first and deleted once `new` is in place."""
    new, path = Path(new), Path(path)
    if new.is_dir() and path.exists():
        old = sibling(path, ".old")
        remove(old)
        os.rename(path, old)
        os.rename(new, path)
        remove(old)
    else:
        os.replace(new, path)
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh `<path>.partial` directory to write into; on success it replaces `path`, on an
    exception it is deleted and `path` is left as it was."""
    path = Path(path)
    tmp = sibling(path, ".partial")
    remove(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        remove(tmp)
        raise
    replace_path(tmp, path)
