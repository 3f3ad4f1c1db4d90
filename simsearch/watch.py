"""The hot folder: `simsearch watch DIR --index I --out FILE.jsonl` scores each image dropped into DIR once.

    OutputLog   the JSON-lines output: which images it already holds (a restart scores nothing twice), and
                one durable line per image (flushed and fsynced before anything else happens to that image)
    Watcher     what to score and when: the images already in DIR at start, then those that filesystem
                events name, each once it has stopped changing

When is a file complete? A camera or a copy over the network writes it in pieces, and neither inotify nor a
network share says when the writer is done. A file is tried once its size and mtime have stayed the same for
`settle` seconds; a file that then fails to decode is tried again each time it changes, and gets an error
line only once it has stayed unchanged and undecodable for GIVE_UP_SETTLES x `settle` seconds (a writer that
pauses mid-file is waited for; a file that is simply bad is not waited on for ever).

watchdog is imported in `Watcher.start` only: nothing else in simsearch needs it.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import BadInput, ImageError, SimsearchError
from .images import IMAGE_SUFFIXES, expand_paths, load_image
from .records import query_record

log = logging.getLogger("simsearch.watch")

DEFAULT_SETTLE = 0.5
GIVE_UP_SETTLES = 4  # a stable file still undecodable after this many settle intervals gets its error line


def one_line(message: object) -> str:
    return " ".join(str(message).split())


class OutputLog:
    """FILE.jsonl: every line names its image ("image", an absolute path), a result or {"image", "error"}.

    A watcher killed mid-line leaves a partial last line: it is cut off at open (that image is scored again),
    so the file stays one JSON object per line. A complete line that is not JSON is refused: the file is not
    a watcher's output, and appending to it would bury the problem.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.done: dict[str, str | None] = {}  # absolute image path -> where it was moved (--move-to), if it was
        self.repaired = 0  # bytes of a partial last line cut off at open
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a+b")
        except OSError as exc:
            raise BadInput(f"{self.path}: cannot write the output ({exc.strerror or exc})") from None
        try:
            self._lock()
            self._load()
        except BaseException:
            self._fh.close()
            raise

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # not on Windows: two watchers on one output are then the user's care
            return
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise BadInput(f"{self.path}: another watcher is writing it") from None

    def _load(self) -> None:
        """Read the lines already written (one at a time: a line's output can grow large), cut a partial last one."""
        self._fh.seek(0)
        offset, number = 0, 0
        for raw in iter(self._fh.readline, b""):
            number += 1
            if not raw.endswith(b"\n"):
                self.repaired = len(raw)
                self._fh.truncate(offset)
                os.fsync(self._fh.fileno())
                log.warning("%s: cut off a partial last line (%d bytes) left by a watcher stopped mid-write",
                            self.path, self.repaired)
                break
            offset += len(raw)
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
                image = line["image"]
            except (ValueError, TypeError, KeyError):
                raise BadInput(f"{self.path}: line {number} is not a watcher's JSON line; choose another --out") from None
            self.done[os.path.abspath(image)] = line.get("moved_to")

    def __contains__(self, path: str) -> bool:
        return os.path.abspath(path) in self.done

    def write(self, line: dict) -> None:
        """Append one line, durably: on disk before the caller moves the image or scores the next one."""
        self._fh.seek(0, os.SEEK_END)
        self._fh.write(json.dumps(line).encode() + b"\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.done[os.path.abspath(line["image"])] = line.get("moved_to")

    def close(self) -> None:
        self._fh.close()


def free_name(folder: Path, name: str) -> Path:
    """folder/name, or folder/stem-1.suffix, -2, ... : the first that does not exist (nothing is overwritten)."""
    target = folder / name
    stem, suffix = Path(name).stem, Path(name).suffix
    n = 0
    while target.exists() or target.is_symlink():
        n += 1
        target = folder / f"{stem}-{n}{suffix}"
    return target


@dataclass
class Pending:
    stamp: tuple[int, int]  # (size, mtime_ns) when last looked at
    since: float  # clock time that stamp was first seen
    failed: str | None = None  # the decode error of this very stamp, while waiting to see if it changes


@dataclass
class Tally:
    scored: int = 0
    errors: int = 0
    already: int = 0  # images found in DIR that the output already held
    moved: int = 0

    def summary(self, out: Path) -> str:
        return (f"watch: {self.scored} scored, {self.errors} errors, {self.already} already in {out}"
                + (f", {self.moved} moved" if self.moved else ""))


@dataclass
class Watcher:
    """Scores the images of `folder` into `output`, each once. Drive it with `run(stop)`, or (tests) with
    `scan()`, `consider(path)` and `tick()` and a fake `clock`."""

    engine: object  # an open Engine
    folder: Path
    output: OutputLog
    move_to: Path | None = None
    settle: float = DEFAULT_SETTLE
    poll: bool = False  # poll the folder instead of OS events (network shares send none)
    clock: Callable[[], float] = time.monotonic
    pending: dict[str, Pending] = field(default_factory=dict)
    tally: Tally = field(default_factory=Tally)

    def __post_init__(self):
        check_arguments(self.folder, self.move_to, self.settle)
        self.folder = Path(os.path.abspath(self.folder))
        if self.move_to is not None:
            self.move_to = Path(os.path.abspath(self.move_to))
            self.move_to.mkdir(parents=True, exist_ok=True)
        self._events: queue.SimpleQueue[tuple[str, bool]] = queue.SimpleQueue()
        self._told: set[str] = set()
        self._observer = None
        self._stop: threading.Event | None = None

    # -- what to score --------------------------------------------------------------------------
    def wanted(self, path: str) -> bool:
        """An image file name inside the watched folder, outside --move-to (whose files were scored)."""
        if Path(path).suffix.lower() not in IMAGE_SUFFIXES or not Path(path).is_relative_to(self.folder):
            return False
        return self.move_to is None or not Path(path).is_relative_to(self.move_to)

    def consider(self, path: str) -> None:
        """Queue an image to be scored once complete; one the output holds is left alone."""
        path = os.path.abspath(path)
        if path in self.pending or not self.wanted(path):
            return
        if path in self.output:
            log.debug("%s: already in %s, not scored again", path, self.output.path)
            return
        self.pending[path] = Pending(stamp=(-1, -1), since=self.clock())

    def scan(self, folder: Path | None = None) -> None:
        """Every image already in the folder (recursive, as `index add` takes a folder)."""
        found, _skipped = expand_paths([str(folder or self.folder)])
        for path in found:
            absolute = os.path.abspath(path)
            if absolute in self.output and self.wanted(absolute):
                self.tally.already += 1
                self._finish_move(absolute)
            else:
                self.consider(absolute)

    # -- when: the completeness rule ------------------------------------------------------------
    def tick(self) -> None:
        """Look at each pending file once: score those that have settled, drop those that went away."""
        self._drain_events()
        for path in list(self.pending):
            item = self.pending[path]
            stamp = file_stamp(path)
            now = self.clock()
            if stamp is None:  # deleted or moved away before it was scored
                del self.pending[path]
                continue
            if stamp != item.stamp:
                item.stamp, item.since, item.failed = stamp, now, None
                continue
            quiet = now - item.since
            if item.failed is None and quiet >= self.settle:
                self._try(path, item)
            elif item.failed is not None and quiet >= self.settle * GIVE_UP_SETTLES:
                self._record(path, {"image": path, "error": item.failed})
            if self.stopping():
                return

    def _try(self, path: str, item: Pending) -> None:
        try:
            img = load_image(path)
        except ImageError as exc:
            if file_stamp(path) != item.stamp:  # written to while being read: not complete after all
                item.stamp = (-1, -1)
            else:
                item.failed = one_line(exc)
            return
        if file_stamp(path) != item.stamp:  # decoded (some formats decode a truncated file), but still growing
            item.stamp = (-1, -1)
            return
        try:
            line = query_record(self.engine.query(img))
        except ImageError as exc:  # decoded, but not an image the bank can score (too small, ...)
            line = {"image": path, "error": one_line(exc)}
        except SimsearchError:
            raise  # the index, not this file: stop, and leave the file for a restart
        except Exception as exc:  # a bug on one odd file must not stop the line: log it in full, go on
            log.exception("%s: unexpected error while scoring", path)
            line = {"image": path, "error": one_line(f"internal error: {type(exc).__name__}: {exc}")}
        self._record(path, line)

    def _record(self, path: str, line: dict) -> None:
        del self.pending[path]
        if self.move_to is not None:
            # Named before the line is written, so that the line says where the image went and a restart
            # after a kill between the two can finish the move.
            line["moved_to"] = str(free_name(self.move_to, Path(path).name))
        self.output.write(line)
        if "error" in line:
            self.tally.errors += 1
            log.warning("%s", line["error"])
        else:
            self.tally.scored += 1
        self._finish_move(path)

    def _finish_move(self, path: str) -> None:
        target = self.output.done[path]
        if self.move_to is None or target is None or not os.path.lexists(path):
            return
        if os.path.lexists(target):
            log.warning("%s: not moved, %s exists already", path, target)
            return
        try:
            shutil.move(path, target)
            self.tally.moved += 1
        except OSError as exc:
            log.warning("%s: could not move it to %s (%s)", path, target, exc.strerror or exc)

    # -- running ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the observer before the first scan, so a file dropped during the scan is not missed."""
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
            from watchdog.observers.polling import PollingObserver
        except ImportError:
            raise BadInput("`simsearch watch` needs watchdog: pip install 'watchdog>=4'") from None
        events = self._events

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event):
                # A folder's own "modified" only says its listing changed; its files have their own events.
                kinds = ("created", "moved") if event.is_directory else ("created", "modified", "moved", "closed")
                if event.event_type in kinds:
                    events.put((os.fsdecode(getattr(event, "dest_path", "") or event.src_path), event.is_directory))

        self._observer = (PollingObserver(timeout=self.settle / 2) if self.poll else Observer())
        self._observer.schedule(Handler(), str(self.folder), recursive=True)
        self._observer.start()
        self.scan()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join()
            self._observer = None

    def _drain_events(self) -> None:
        while True:
            try:
                path, is_directory = self._events.get_nowait()
            except queue.Empty:
                return
            if is_directory:  # a folder moved in: its images came without events of their own
                if os.path.isdir(path) and not (self.move_to and Path(path).is_relative_to(self.move_to)):
                    self.scan(Path(path))
            elif os.path.abspath(path) in self.output:
                if path not in self._told:  # a name used again: say so once, score nothing twice
                    self._told.add(path)
                    log.warning("%s: already in %s, not scored again (give new images new names)", path,
                                self.output.path)
            else:
                self.consider(path)

    def stopping(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    def run(self, stop: threading.Event) -> Tally:
        """Watch until `stop` is set; the image being scored when it is set is finished first."""
        self._stop = stop
        self.start()
        try:
            while not stop.is_set():
                self.tick()
                stop.wait(self.settle / 4)
        finally:
            self.stop()
        return self.tally


def check_arguments(folder: str | os.PathLike, move_to: str | os.PathLike | None, settle: float) -> None:
    """BadInput for arguments a watcher cannot run with (checked before anything is written)."""
    if not os.path.isdir(folder):
        raise BadInput(f"{folder}: no such folder")
    if move_to is not None and os.path.abspath(move_to) == os.path.abspath(folder):
        raise BadInput("--move-to must be another folder than the watched one")
    if not settle > 0:
        raise BadInput(f"--settle must be above 0 seconds, got {settle}")


def file_stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


@contextmanager
def stop_on_signals():
    """An Event set by SIGINT or SIGTERM (main thread only); the previous handlers come back after."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
