"""The line-PC path: the ONNX embedder against torch, bundles (export, verify, tampering), and the CLI with
torch, timm and scikit-learn hidden (what a `pip install .` without the torch extra can import)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from realdata import needs_piped, piped_test, piped_train
from simsearch import bundle
from simsearch.engine import Engine
from simsearch.errors import BadInput, IndexDamaged
from simsearch.onnx_embedder import OnnxEmbedder

pytestmark = needs_piped
ROOT = Path(__file__).resolve().parents[1]
HIDE = "import sys\nfor m in ('torch', 'timm', 'sklearn', 'torchvision'): sys.modules[m] = None\n"


def cli(*args, hide_torch: bool = False, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    code = (HIDE if hide_torch else "") + "import sys\nfrom simsearch.cli import main\nsys.argv = ['simsearch'] + sys.argv[1:]\nmain()\n"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=600, **kwargs)


def records(proc: subprocess.CompletedProcess) -> list[dict]:
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> Path:
    """PIPED PA_BDP01_TL's train/good, a quarter held out, calibrated: the README's first command."""
    directory = tmp_path_factory.mktemp("deploy") / "index"
    with Engine.create(directory) as engine:
        engine.add([str(p) for p in piped_train()], holdout=0.25)
        engine.calibrate()
        assert isinstance(engine.embedder, OnnxEmbedder)  # onnxruntime is installed: the default
    return directory


@pytest.fixture(scope="module")
def sealed(index, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "line"
    with Engine.open(index) as engine:
        bundle.export(engine, out)
    return out


def test_onnx_workers_sleep_between_runs_so_the_search_gets_the_cores(index):
    with Engine.open(index) as engine:
        options = engine.embedder.session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_onnx_and_torch_give_the_same_verdicts_and_scores_within_0_1_percent(index):
    tests = [str(p) for p in piped_test("good") + piped_test("impurity")]
    onnx = records(cli("query", *tests, "--index", index, "--json"))
    torch = records(cli("query", *tests, "--index", index, "--json", env={"SIMSEARCH_RUNTIME": "torch"}))
    assert len(onnx) == len(torch) == len(tests)
    assert [r["is_anomalous"] for r in onnx] == [r["is_anomalous"] for r in torch]
    assert any(r["is_anomalous"] for r in onnx) and not all(r["is_anomalous"] for r in onnx)
    worst = max(abs(a["score"] - b["score"]) / b["score"] for a, b in zip(onnx, torch))
    assert worst < 1e-3, worst
    sidecar = json.loads((index / "weights" / "embedder.onnx.json").read_text())
    assert sidecar["max_abs_diff"] <= 1e-4 * sidecar["max_abs_activation"]


def test_a_bundle_answers_like_its_index_and_verifies(index, sealed):
    manifest = bundle.verify(sealed)
    assert {"meta.sqlite", "weights/embedder.onnx.json"} <= set(manifest["files"])
    probe = str(piped_test("impurity")[0])
    assert records(cli("query", probe, "--index", sealed, "--json")) == records(
        cli("query", probe, "--index", index, "--json"))
    assert bundle.verify(sealed) == manifest  # reading changed nothing


def test_the_cli_without_torch_queries_a_bundle_and_says_what_needs_torch(sealed, tmp_path):
    probe = str(piped_test("impurity")[1])
    hidden = records(cli("query", probe, "--index", sealed, "--json", hide_torch=True))
    assert hidden == records(cli("query", probe, "--index", sealed, "--json"))
    assert hidden[0]["is_anomalous"] is True
    made = cli("index", "add", str(piped_train()[0]), "--index", tmp_path / "new", hide_torch=True)
    assert made.returncode == 1 and "pip install 'simsearch[torch]'" in made.stderr and "Traceback" not in made.stderr
    assert not (tmp_path / "new").exists()
    evaluated = cli("eval", tmp_path, hide_torch=True)
    assert evaluated.returncode == 1 and "needs torch" in evaluated.stderr


def test_light_commands_import_neither_torch_timm_onnxruntime_nor_sklearn(sealed):
    code = ("import sys\nfrom simsearch.cli import main\nsys.argv = ['simsearch'] + sys.argv[1:]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'timm', 'onnxruntime', 'sklearn'})\n"
            "print('HEAVY', heavy, file=sys.stderr)\n")
    for args in (["--help"], ["--version"], ["index", "info", "--index", str(sealed)],
                 ["index", "check", "--index", str(sealed)]):
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert "HEAVY []" in proc.stderr, (args, proc.stderr[-500:])


def test_a_tampered_bundle_is_refused_with_the_file_named_and_no_verdict(sealed, tmp_path):
    probe = str(piped_test("good")[0])
    cases = {}
    for case in ("changed", "missing", "extra", "newer"):
        copy = tmp_path / case
        shutil.copytree(sealed, copy)
        bank = next(copy.glob("patches.g*.faiss"))
        if case == "changed":
            data = bytearray(bank.read_bytes())
            data[len(data) // 2] ^= 0xFF
            bank.write_bytes(bytes(data))
        elif case == "missing":
            (copy / "weights" / "embedder.onnx.json").unlink()
        elif case == "extra":
            (copy / "weights" / "other.onnx").write_bytes(b"not from the manifest")
        else:
            manifest = json.loads((copy / "manifest.json").read_text())
            (copy / "manifest.json").write_text(json.dumps({**manifest, "format": bundle.FORMAT + 1}))
        before = {p.name: p.stat().st_mtime_ns for p in copy.rglob("*") if p.is_file()}
        proc = cli("query", probe, "--index", copy, "--json")
        cases[case] = proc
        assert proc.returncode == 3 and proc.stdout == "" and "Traceback" not in proc.stderr, (case, proc.stderr)
        assert {p.name: p.stat().st_mtime_ns for p in copy.rglob("*") if p.is_file()} == before  # nothing written
        with pytest.raises(IndexDamaged):
            bundle.verify(copy)
    assert bank.name in cases["changed"].stderr and "changed" in cases["changed"].stderr
    assert "embedder.onnx.json" in cases["missing"].stderr
    assert "other.onnx" in cases["extra"].stderr
    assert "newer simsearch" in cases["newer"].stderr


def test_bundle_mistakes_are_one_line_errors(index, sealed, tmp_path):
    proc = cli("bundle", "verify", index)
    assert proc.returncode == 1 and "not a bundle" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    with Engine.open(index) as engine, pytest.raises(BadInput, match="already exists"):
        bundle.export(engine, sealed)
    proc = cli("export", "--index", tmp_path / "nothing", "--out", tmp_path / "b")
    assert proc.returncode == 1 and "no index in" in proc.stderr and not (tmp_path / "b").exists()


def test_a_write_on_a_bundle_seals_it_again(sealed, tmp_path):
    copy = tmp_path / "line"
    shutil.copytree(sealed, copy)
    good = str(piped_test("good")[2])
    added = cli("index", "add", good, "--index", copy, "--json", hide_torch=True)  # embedded by the ONNX model
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["added"] == [good]
    manifest = bundle.verify(copy)
    assert manifest["generation"] == json.loads(added.stdout)["generation"]
    assert records(cli("query", good, "--index", copy, "--json"))[0]["score"] == pytest.approx(0.0, abs=1e-3)


def test_an_onnx_model_of_other_dimensions_is_refused_before_any_verdict(sealed, tmp_path):
    import io

    import torch

    from simsearch.onnx_embedder import INPUT, OUTPUT, read_sidecar, write_model

    class SevenDims(torch.nn.Module):  # the right input, vectors of the wrong size
        def forward(self, tiles):
            x = torch.nn.functional.avg_pool2d(tiles.permute(0, 3, 1, 2), 8)
            return torch.cat([x, x, x[:, :1]], dim=1).permute(0, 2, 3, 1)

    buffer = io.BytesIO()
    torch.onnx.export(SevenDims(), (torch.rand(1, 64, 64, 3),), buffer, input_names=[INPUT], output_names=[OUTPUT],
                      dynamo=False, dynamic_axes={INPUT: {0: "b", 1: "h", 2: "w"}})
    copy = tmp_path / "line"
    shutil.copytree(sealed, copy)
    description = {k: v for k, v in read_sidecar(copy).items() if k not in ("file", "sha256")}
    old = copy / "weights" / read_sidecar(copy)["file"]
    write_model(copy, buffer.getvalue(), description)
    old.unlink()
    manifest = json.loads((copy / "manifest.json").read_text())
    bundle.seal(copy, manifest["fingerprint"], manifest["generation"])  # as if the bundle had been made so
    proc = cli("query", str(piped_test("good")[0]), "--index", copy, "--json")
    assert proc.returncode == 1 and proc.stdout == "" and "7-dim vectors" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
