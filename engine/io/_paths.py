"""Output paths: refuse to clobber, write under a temporary name and rename into place."""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from engine.io.errors import InputError


def refuse_existing(path: Path, overwrite: bool) -> None:
    """InputError if `path` exists and `overwrite` is False."""
    if path.exists() and not overwrite:
        raise InputError(path, "output exists; pass overwrite=True (--overwrite) to replace it")


def new_file_mode() -> int:
    """The mode `open()` gives a new file under the current umask (0644 under the usual 022).

    tempfile.mkstemp creates its files 0600 whatever the umask; a file written through one and
    renamed into place gets this mode instead, like every other output.
    """
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def is_zarr_store(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in ("zarr.json", ".zgroup", ".zarray"))


def remove_tree(path: Path) -> None:
    """Delete a file or directory tree (no error if absent)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync_dir(path: Path) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # some file systems / platforms cannot open directories
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def atomic_directory(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield `<final>.tmp-<pid>` to write into; on success rename it to `final`.

    On an exception the temporary directory is removed and `final` is untouched. With
    `overwrite`, an existing `final` is moved aside, replaced, then deleted, so `final` is at every
    moment either the old complete store or the new complete one.
    """
    final = Path(final)
    refuse_existing(final, overwrite)
    temporary = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    remove_tree(temporary)  # left over by a killed run that had the same pid
    try:
        yield temporary
    except BaseException:
        remove_tree(temporary)
        raise
    if final.exists():
        aside = final.with_name(f"{final.name}.old-{os.getpid()}")
        remove_tree(aside)
        os.rename(final, aside)
        os.rename(temporary, final)
        remove_tree(aside)
    else:
        os.rename(temporary, final)
    _fsync_dir(final.parent)
