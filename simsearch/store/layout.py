"""The index folder: what lives where in it, and the one writer lock.

    <index>/meta.sqlite                 the catalog (source of truth; simsearch/store/catalog.py)
    <index>/patches.gNNNNNN.faiss       the patch bank of generation N (simsearch/store/bankfiles.py)
    <index>/images.gNNNNNN.faiss        one pooled vector per reference image, same generation
    <index>/weights/                    weights files and fine-tuned heads the index was built with
    <index>/uploads/                    images added over HTTP (kept so that `repair` can re-embed them)
    <index>/.lock                       the writer lock (an flock the kernel releases if the writer dies)
    <index>/.spool-<pid>/               an add's new vectors on their way to the bank (store/spool.py); one
                                        left by a killed writer is deleted by the next one
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import threading
import time
from pathlib import Path

from ..errors import IndexBusy
from . import bankfiles

DB = "meta.sqlite"
LOCK = ".lock"
SPOOL = ".spool-"


def lock_timeout_s() -> float:
    return float(os.environ.get("SIMSEARCH_LOCK_TIMEOUT", "60"))


# Lock files this process holds, with how many holders: a check inside this process's own write
# (repair checks before and after) must not mistake our lock for another writer's.
_held: dict[str, int] = {}
_held_guard = threading.Lock()


class IndexFolder:
    """One index's folder: its paths, its writer lock, and the files copied into it."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    @property
    def db_path(self) -> Path:
        return self.directory / DB

    @property
    def lock_path(self) -> Path:
        return self.directory / LOCK

    def exists(self) -> bool:
        return self.db_path.is_file()

    # -- the writer lock ------------------------------------------------------------------------
    @contextlib.contextmanager
    def writer_lock(self, remove_strays_of_generation=None):
        """One writer at a time: an flock the kernel releases if the writer dies. Waits up to
        SIMSEARCH_LOCK_TIMEOUT seconds, then raises IndexBusy.

        `remove_strays_of_generation`: a callable giving the committed generation; once the lock is held,
        the files of any other generation (left by a writer killed before its commit) are deleted. Spool
        folders are deleted in any case: only a writer holding the lock has one, so any found is stale."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        key = str(self.lock_path.resolve())
        try:
            timeout = lock_timeout_s()
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise IndexBusy(f"{self.directory} is being written by another process; gave up after "
                                        f"{timeout:.0f} s (SIMSEARCH_LOCK_TIMEOUT)") from None
                    time.sleep(0.1)
            with _held_guard:
                _held[key] = _held.get(key, 0) + 1
            try:
                for stale in self.directory.glob(SPOOL + "*"):
                    shutil.rmtree(stale, ignore_errors=True)
                if remove_strays_of_generation is not None:
                    bankfiles.remove_stray(self.directory, remove_strays_of_generation())
                yield
            finally:
                with _held_guard:
                    _held[key] -= 1
                    if not _held[key]:
                        del _held[key]
        finally:
            os.close(fd)  # closing drops the lock

    def held_here(self) -> bool:
        """Whether this process holds the writer lock (a write of ours is running)."""
        with _held_guard:
            return _held.get(str(self.lock_path.resolve()), 0) > 0

    def writer_active(self) -> bool:
        """Whether another process holds the writer lock right now (never our own write)."""
        if self.held_here():
            return False
        if not self.lock_path.exists():
            return False
        fd = os.open(self.lock_path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops our lock, if we got it

    @contextlib.contextmanager
    def spool_folder(self):
        """A folder for an add's temporary files inside the index (not $TMPDIR: a killed add's spool would stay
        there forever), deleted when the block ends; only under the writer lock."""
        folder = self.directory / f"{SPOOL}{os.getpid()}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    # -- files ----------------------------------------------------------------------------------
    def store_file(self, source: Path, stored: Path) -> None:
        """Copy `source` to `<index>/stored` (written under a temporary name, then renamed)."""
        target = self.directory / stored
        target.parent.mkdir(exist_ok=True)
        if not target.exists():
            tmp = self.directory / (str(stored) + ".tmp")
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)

    def bytes_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.directory.rglob("*") if f.is_file())

    def discard(self, remove_directory: bool) -> None:
        """Delete what a new index wrote (catalog, bank files, weights); the caller checked it holds no image."""
        for name in (DB, DB + "-wal", DB + "-shm", LOCK):
            (self.directory / name).unlink(missing_ok=True)
        for path in [*self.directory.glob("patches*.faiss*"), *self.directory.glob("images*.faiss*")]:
            path.unlink(missing_ok=True)
        shutil.rmtree(self.directory / "weights", ignore_errors=True)
        for spool in self.directory.glob(SPOOL + "*"):
            shutil.rmtree(spool, ignore_errors=True)
        if remove_directory:
            with contextlib.suppress(OSError):
                self.directory.rmdir()  # only if empty
