"""The hot folder (simsearch/watch.py): the completeness rule and the resume logic on a TinyEmbedder index with
a fake clock, then `python -m simsearch watch` as a real process on a small real index."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest

from fakes import TinyEmbedder, texture, write_images
from realdata import needs_piped, piped_train
from simsearch.engine import Engine
from simsearch.errors import BadInput, IndexDamaged
from simsearch.records import query_record
from simsearch.watch import GIVE_UP_SETTLES, OutputLog, Watcher

ROOT = Path(__file__).resolve().parents[1]
SETTLE = 0.5


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("watch")
    engine = Engine.create(root / "index", embedder=TinyEmbedder())
    engine.add(write_images(root / "good", range(6)))
    engine.calibrate(write_images(root / "cal", range(10, 14)))
    yield engine
    engine.close()


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def png_bytes(seed: int, defect: bool = False) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(texture(seed, defect=defect), cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def watcher(engine, tmp_path, **kwargs) -> tuple[Watcher, Clock]:
    clock = Clock()
    folder = tmp_path / "hot"
    folder.mkdir(exist_ok=True)
    return Watcher(engine, folder, OutputLog(tmp_path / "out.jsonl"), settle=SETTLE, clock=clock, **kwargs), clock


def test_a_file_is_read_only_once_it_has_stopped_changing(engine, tmp_path):
    w, clock = watcher(engine, tmp_path)
    data = png_bytes(20, defect=True)
    part = w.folder / "part.png"
    part.write_bytes(data[: len(data) // 2])
    w.consider(str(part))
    w.tick()  # first look: its size and mtime noted, nothing read
    clock.now += SETTLE
    w.tick()  # settled but truncated: refused, and waited on (the writer may only have paused)
    assert w.output.done == {} and str(part) in w.pending
    with open(part, "ab") as fh:
        fh.write(data[len(data) // 2:])
    clock.now += SETTLE * GIVE_UP_SETTLES
    w.tick()  # it changed: the wait starts again, the earlier failure forgotten
    assert w.output.done == {}
    clock.now += SETTLE / 2
    w.tick()
    assert w.output.done == {}
    clock.now += SETTLE / 2
    w.tick()
    assert lines(tmp_path / "out.jsonl") == [query_record(engine.query(str(part)))]
    assert lines(tmp_path / "out.jsonl")[0]["is_anomalous"] is True
    assert w.pending == {} and (w.tally.scored, w.tally.errors) == (1, 0)


def test_a_stable_undecodable_file_gets_one_error_line_and_the_watcher_goes_on(engine, tmp_path):
    w, clock = watcher(engine, tmp_path)
    bad = w.folder / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    w.consider(str(bad))
    w.tick()
    clock.now += SETTLE * GIVE_UP_SETTLES - SETTLE / 2
    w.tick()
    w.tick()
    assert w.output.done == {}  # not yet given up on
    clock.now += SETTLE / 2
    w.tick()
    [line] = lines(tmp_path / "out.jsonl")
    assert line["image"] == str(bad) and str(bad) in line["error"] and "\n" not in line["error"]
    good = w.folder / "good.png"
    good.write_bytes(png_bytes(21))
    w.consider(str(good))
    w.tick()
    clock.now += SETTLE
    w.tick()
    assert [line["image"] for line in lines(tmp_path / "out.jsonl")] == [str(bad), str(good)]
    assert (w.tally.scored, w.tally.errors) == (1, 1)


def test_a_restart_scores_only_what_the_output_lacks_and_cuts_a_partial_last_line(engine, tmp_path):
    folder = tmp_path / "hot"
    paths = [str(folder / name) for name in ("a.png", "b.png", "sub/c.png", "d.png")]
    for seed, path in enumerate(paths):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(png_bytes(30 + seed))
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out.jsonl"
    first = [query_record(engine.query(paths[0])), {"image": paths[2], "error": "an earlier error line"}]
    killed = json.dumps(query_record(engine.query(paths[1])))[:50]  # a watcher killed mid-line
    out.write_text("".join(json.dumps(line) + "\n" for line in first) + killed)

    w, clock = watcher(engine, tmp_path)
    assert w.output.repaired == len(killed) and out.read_text().endswith("\n")
    w.scan()
    assert sorted(w.pending) == [paths[1], paths[3]] and w.tally.already == 2
    w.tick()
    clock.now += SETTLE
    w.tick()
    got = lines(out)
    assert got[:2] == first
    assert sorted(line["image"] for line in got[2:]) == [paths[1], paths[3]]
    w.output.close()

    again, _ = watcher(engine, tmp_path)  # a second restart: nothing left to do
    again.scan()
    assert again.pending == {} and again.tally.already == 4


def test_an_output_that_is_not_a_watchers_or_is_in_use_is_refused(engine, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text("a,b,c\n")
    with pytest.raises(BadInput, match="line 1 is not a watcher's JSON line"):
        OutputLog(other)
    assert other.read_text() == "a,b,c\n"
    first = OutputLog(tmp_path / "out.jsonl")
    with pytest.raises(BadInput, match="another watcher"):
        OutputLog(tmp_path / "out.jsonl")
    first.close()


def test_move_to_moves_after_the_line_without_overwriting_and_a_restart_finishes_a_move(engine, tmp_path):
    done = tmp_path / "done"
    w, clock = watcher(engine, tmp_path, move_to=done)
    (done / "a.png").write_bytes(b"an earlier a.png")
    image = w.folder / "a.png"
    image.write_bytes(png_bytes(40))
    expected = query_record(engine.query(str(image)))
    w.consider(str(image))
    w.tick()
    clock.now += SETTLE
    w.tick()
    [line] = lines(tmp_path / "out.jsonl")
    assert line == {**expected, "moved_to": str(done / "a-1.png")}
    assert not image.exists() and (done / "a-1.png").read_bytes() == png_bytes(40)
    assert (done / "a.png").read_bytes() == b"an earlier a.png"
    w.output.close()

    # Killed between its line and the move: the restart moves it and scores nothing.
    late = w.folder / "late.png"
    late.write_bytes(png_bytes(41))
    with open(tmp_path / "out.jsonl", "a") as fh:
        fh.write(json.dumps({"image": str(late), "error": "x", "moved_to": str(done / "late.png")}) + "\n")
    again, _ = watcher(engine, tmp_path, move_to=done)
    again.scan()
    assert again.pending == {} and not late.exists() and (done / "late.png").exists()


def test_an_index_failure_stops_the_watcher_and_leaves_the_image_for_a_restart(tmp_path):
    class DamagedEngine:
        def query(self, image):
            raise IndexDamaged("patches.g1.faiss: missing")

    w, clock = watcher(DamagedEngine(), tmp_path)
    image = w.folder / "a.png"
    image.write_bytes(png_bytes(50))
    w.consider(str(image))
    w.tick()
    clock.now += SETTLE
    with pytest.raises(IndexDamaged):
        w.tick()
    assert w.output.done == {} and (tmp_path / "out.jsonl").read_text() == "" and image.exists()


# -- the real process ------------------------------------------------------------------------------------
def simsearch(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "simsearch", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, **kwargs)


def wait_for(condition, timeout: float = 60.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = condition()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class WatchProcess:
    def __init__(self, index: Path, folder: Path, out: Path, log: Path):
        self.log = log
        self.err = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "simsearch", "watch", str(folder), "--index", str(index),
                                      "--out", str(out), "--settle", "0.3"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=self.err)

    def stderr(self) -> str:
        return self.log.read_text()

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        finally:
            self.err.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.err.close()


@needs_piped
def test_the_watch_command_scores_dropped_images_once_each_and_a_restart_rescores_nothing(tmp_path):
    train = piped_train()
    index, folder, out = tmp_path / "index", tmp_path / "hot", tmp_path / "out.jsonl"
    made = simsearch("index", "add", *train[:3], "--short-side", "96", "--index", index)
    assert made.returncode == 0, made.stderr
    calibrated = simsearch("calibrate", *train[8:10], "--index", index)
    assert calibrated.returncode == 0, calibrated.stderr
    folder.mkdir()
    names = {"copied": folder / "copied.bmp", "slow": folder / "slow.png", "bad": folder / "bad.jpg"}

    watch = WatchProcess(index, folder, out, tmp_path / "watch1.log")
    try:
        wait_for(lambda: "watching" in watch.stderr(), what="the watcher to start")
        names["copied"].write_bytes(train[16].read_bytes())
        ok, png = cv2.imencode(".png", cv2.imread(str(train[17])))
        data = png.tobytes()
        with open(names["slow"], "wb") as fh:  # written in pieces, as a camera over the network might
            for start in range(0, len(data), len(data) // 6 + 1):
                fh.write(data[start:start + len(data) // 6 + 1])
                fh.flush()
                time.sleep(0.1)
        names["bad"].write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
        got = wait_for(lambda: out.exists() and out.read_text().count("\n") >= 3 and lines(out),
                       what="three lines in the output")
        assert watch.terminate() == 0
    finally:
        watch.kill()
    assert sorted(line["image"] for line in got) == sorted(map(str, names.values()))  # each once
    by_image = {line["image"]: line for line in got}
    queried = simsearch("query", names["copied"], names["slow"], "--index", index, "--json")
    assert queried.returncode == 0, queried.stderr
    for record in map(json.loads, queried.stdout.splitlines()):
        assert by_image[record["image"]] == record
    assert set(by_image[str(names["bad"])]) == {"image", "error"}
    assert "watch: 2 scored, 1 errors" in watch.stderr()

    watch = WatchProcess(index, folder, out, tmp_path / "watch2.log")
    try:
        wait_for(lambda: "3 images already there" in watch.stderr(), what="the restarted watcher")
        late = folder / "late.bmp"
        late.write_bytes(train[18].read_bytes())
        got = wait_for(lambda: out.read_text().count("\n") >= 4 and lines(out), what="the fourth line")
        assert watch.terminate() == 0
    finally:
        watch.kill()
    assert [line["image"] for line in got] == [line["image"] for line in by_image.values()] + [str(late)]
    assert "watch: 1 scored, 0 errors, 3 already in" in watch.stderr()
