"""Crash safety and concurrent use, with real processes.

`simsearch index add` runs in a subprocess and is killed with SIGKILL at every crash point of its
writing part (simsearch.faults) and at a few timed moments; each time the index is reopened and must
hold exactly the state before or after the add, with catalog and FAISS in agreement.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from simsearch.engine import Engine
from simsearch.store import bankfiles
from realdata import needs_piped, piped_test, piped_train

pytestmark = needs_piped

FIRST, SECOND = 4, 10  # images in the index before the add, images the killed add brings


def cli(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "simsearch", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, **kwargs)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    train = piped_train()
    second = root / "second"
    second.mkdir()
    for path in train[FIRST:FIRST + SECOND]:
        shutil.copy(path, second / path.name)
    base = root / "base"
    probe = str(piped_test("good")[0])
    with Engine.create(base, index_kind="flat") as engine:
        engine.add([str(p) for p in train[:FIRST]])
        before = {"score": engine.query(probe).score, "info": engine.info(),
                  "images": {r["sha256"]: r["n_vectors"] for r in engine.catalog.images()}}
    # One full run, traced: the crash points it passes, and the state after it.
    trace = root / "trace.txt"
    done = root / "done"
    shutil.copytree(base, done)
    started = time.monotonic()
    proc = cli("index", "add", str(second), "--index", str(done), env={"SIMSEARCH_CRASH_TRACE": str(trace)})
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    duration = time.monotonic() - started
    with Engine.open(done) as engine:
        after = {"info": engine.info(), "score": engine.query(probe).score}
    points = trace.read_text().splitlines()
    return dict(root=root, base=base, second=second, probe=probe, before=before, after=after, points=points,
                duration=duration)


def assert_consistent_and_whole(index: Path, s: dict, label: str) -> str:
    """The index holds the state before or after the add, entirely; returns which."""
    with Engine.open(index) as engine:
        report = engine.check()
        assert report["missing_from_bank"] == 0 and report["orphans_in_bank"] == 0, (label, report)
        assert report["missing_pooled"] == 0 and report["orphan_pooled"] == 0, (label, report)
        assert all("stray" in p for p in report["problems"]), (label, report["problems"])
        info = engine.info()
        stored = {r["sha256"]: r["n_vectors"] for r in engine.catalog.images()}
        # Earlier content intact: every image with its vectors.
        assert all(stored.get(sha) == n for sha, n in s["before"]["images"].items()), label
        score = engine.query(s["probe"]).score
    # Adding good images never removes reference vectors: a score can only stay or fall.
    assert score <= s["before"]["score"] + 1e-5, (label, score, s["before"]["score"])
    keys = ("reference_images", "vectors", "bank_vectors", "generation")
    state = {k: info[k] for k in keys}
    if state == {k: s["before"]["info"][k] for k in keys}:
        return "before"
    assert state == {k: s["after"]["info"][k] for k in keys}, (label, state)
    return "after"


def copy_of_base(s: dict, index: Path) -> tuple[Path, int]:
    """A copy of the index as it was before the add, and its bank generation."""
    shutil.copytree(s["base"], index)
    with Engine.open(index) as engine:
        return index, engine.catalog.state()["generation"]


def rerun_completes(index: Path, s: dict, label: str) -> None:
    with Engine.open(index) as engine:
        engine.add([str(s["second"])])
        report = engine.check()
        assert report["ok"], (label, report)  # the next writer deleted any stray files
        info = engine.info()
        assert info["reference_images"] == s["after"]["info"]["reference_images"], label
        assert info["vectors"] == s["after"]["info"]["vectors"] == info["bank_vectors"], label
        assert engine.query(s["probe"]).score == pytest.approx(s["after"]["score"], abs=1e-5), label


def test_add_killed_at_every_crash_point_leaves_the_state_before_or_after(setup, tmp_path):
    s = setup
    assert len(s["points"]) >= 20, s["points"]
    outcomes = {}
    for n in range(1, len(s["points"]) + 1):
        index = tmp_path / f"kill{n}"
        shutil.copytree(s["base"], index)
        proc = cli("index", "add", str(s["second"]), "--index", str(index), env={"SIMSEARCH_CRASH_AT": str(n)})
        proc.communicate(timeout=300)
        assert proc.returncode == -signal.SIGKILL, (n, s["points"][n - 1])
        outcomes[s["points"][n - 1]] = assert_consistent_and_whole(index, s, s["points"][n - 1])
        rerun_completes(index, s, s["points"][n - 1])
        shutil.rmtree(index)
    # The commit splits the run: every point before it leaves the old state, every point after the new one.
    names = list(outcomes)
    commit = names.index(next(p for p in names if p.endswith("committed")))
    assert all(outcomes[p] == "before" for p in names[:commit]), outcomes
    assert all(outcomes[p] == "after" for p in names[commit:]), outcomes


def test_add_killed_at_timed_moments(setup, tmp_path):
    s = setup
    killed_while_running = []
    for i, fraction in enumerate(np.linspace(0.6, 1.0, 5)):
        index = tmp_path / f"timed{i}"
        shutil.copytree(s["base"], index)
        proc = cli("index", "add", str(s["second"]), "--index", str(index))
        time.sleep(s["duration"] * fraction)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        killed_while_running.append(proc.returncode == -signal.SIGKILL)
        assert proc.returncode in (0, -signal.SIGKILL), proc.returncode
        assert_consistent_and_whole(index, s, f"timed kill at {fraction:.2f}")
        rerun_completes(index, s, f"timed kill at {fraction:.2f}")
        shutil.rmtree(index)
    assert any(killed_while_running)  # at least one kill landed inside the add


def test_check_and_repair_after_damage(setup, tmp_path):
    s = setup
    index, generation = copy_of_base(s, tmp_path / "damaged")
    # A stray half-written file, and the bank file of the current generation destroyed.
    (index / "patches.g999999.faiss.tmp").write_bytes(b"partial")
    bankfiles.bank_path(index, "patches", generation).write_bytes(b"not faiss")
    proc = cli("index", "check", "--index", str(index), "--json")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1
    report = json.loads(out)
    assert not report["ok"] and report["stray_files"] == ["patches.g999999.faiss.tmp"]
    proc = cli("index", "repair", "--index", str(index), "--json")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert any("stray" in a for a in result["actions"])
    assert sum(a.startswith("re-embedded") for a in result["actions"]) == FIRST
    assert result["after"]["ok"]
    with Engine.open(index) as engine:
        assert engine.info()["bank_vectors"] == s["before"]["info"]["bank_vectors"]
        assert engine.query(s["probe"]).score == pytest.approx(s["before"]["score"], abs=1e-4)


def test_repair_drops_images_whose_files_are_gone(setup, tmp_path):
    s = setup
    index, generation = copy_of_base(s, tmp_path / "gone")
    with Engine.open(index) as engine:
        victim = engine.catalog.images("reference")[0]
    # The bank file is lost and one source image has moved away: that image cannot be restored.
    bankfiles.bank_path(index, "patches", generation).unlink()
    moved = tmp_path / "moved.png"
    db = sa.create_engine(f"sqlite:///{index / Engine.DB}")
    with db.begin() as conn:
        conn.execute(sa.text("UPDATE images SET path = :p WHERE id = :i"), {"p": str(moved), "i": victim["id"]})
    db.dispose()
    with Engine.open(index) as engine:
        result = engine.repair()
        assert result["after"]["ok"], result
        assert any(a.startswith(f"dropped {moved}") for a in result["actions"])
        assert engine.info()["reference_images"] == FIRST - 1


def test_second_writer_waits_then_fails_clearly_and_changes_nothing(setup, tmp_path):
    s = setup
    index = tmp_path / "locked"
    shutil.copytree(s["base"], index)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from simsearch.engine import Engine\n"
        f"engine = Engine.open({str(index)!r})\n"
        "with engine.writer_lock():\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(120)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        files_before = sorted(p.name for p in index.iterdir())
        started = time.monotonic()
        proc = cli("index", "add", str(s["second"]), "--index", str(index), env={"SIMSEARCH_LOCK_TIMEOUT": "2"})
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 4  # IndexBusy's exit code (simsearch/errors.py): try again later
        assert "being written by another process" in err and "gave up after 2 s" in err
        assert time.monotonic() - started >= 2
        assert sorted(p.name for p in index.iterdir()) == files_before
        # A killed holder leaves no lock behind: the kernel drops its flock.
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        proc = cli("index", "add", str(s["second"]), "--index", str(index), env={"SIMSEARCH_LOCK_TIMEOUT": "2"})
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    finally:
        holder.kill()
    with Engine.open(index) as engine:
        assert engine.check()["ok"]
        assert engine.info()["reference_images"] == FIRST + SECOND


def test_queries_see_a_consistent_state_while_a_writer_works(setup, tmp_path):
    s = setup
    index = tmp_path / "busy"
    shutil.copytree(s["base"], index)
    final = s["before"]["info"]["generation"] + 7
    reader = subprocess.Popen([sys.executable, "-c", (
        "import json, sys, time\n"
        "from simsearch.engine import Engine\n"
        f"engine = Engine.open({str(index)!r})\n"
        f"seen = [engine.query({s['probe']!r}).generation]\n"
        "print('ready', flush=True)\n"
        "deadline = time.monotonic() + 600\n"
        "while time.monotonic() < deadline:\n"
        "    report = engine.check()\n"
        "    assert report['ok'] and report['bank_vectors'] == report['catalog_vectors'], report\n"
        f"    result = engine.query({s['probe']!r})\n"
        "    seen.append(result.generation)\n"
        f"    if result.generation >= {final}: break\n"
        "print(json.dumps(seen))\n")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    images = sorted(s["second"].iterdir())
    assert reader.stdout.readline().strip() == "ready"  # the reader is loaded and querying
    with Engine.open(index) as engine:
        start = engine.generation
        for i in range(0, 6, 2):  # add and remove in turns: the generation moves 6 times
            engine.add([str(p) for p in images[i:i + 2]])
            engine.remove([str(images[i].resolve())])
            time.sleep(0.3)
        engine.add([str(images[6])])
        reached = engine.generation
    out, err = reader.communicate(timeout=600)
    assert reader.returncode == 0, err
    seen = json.loads(out)
    assert reached == final
    assert seen == sorted(seen) and seen[0] == start and seen[-1] == final and len(set(seen)) >= 3
