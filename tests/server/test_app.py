"""The HTTP API through FastAPI's test client, on a small calibrated index of real data (PIPED PA_BDP01_TL)."""
from __future__ import annotations

import base64
import hashlib
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from realdata import DATASETS, PIPED, needs_piped, piped_test
from simsearch import Engine
from simsearch.records import query_record
from simsearch.server.app import ServerSettings, create_app

pytestmark = needs_piped
TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CLI_KEYS = {"image", "score", "threshold", "is_anomalous", "similarity", "regions", "peak", "heatmap", "distance",
            "generation", "calibration_id", "fingerprint", "warning"}


def client_for(monkeypatch, token: str | None = TOKEN, **settings) -> TestClient:
    if token is None:
        monkeypatch.delenv("SIMSEARCH_TOKEN", raising=False)
    else:
        monkeypatch.setenv("SIMSEARCH_TOKEN", token)
    return TestClient(create_app(ServerSettings(**settings)), base_url="http://localhost")


def upload(*paths: Path) -> list:
    return [("images", (p.name, p.read_bytes(), "image/bmp")) for p in paths]


def query(client: TestClient, *paths: Path, name: str = "piped", **params) -> list[dict]:
    response = client.post(f"/v1/indexes/{name}/query", files=upload(*paths), params=params)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def held_out(directory: Path) -> list[Path]:
    with Engine.open(directory) as engine:
        return [Path(r["path"]) for r in engine.catalog.images("calibration")]


@pytest.fixture
def client(piped_index, monkeypatch):
    with client_for(monkeypatch, indexes={"piped": str(piped_index)}) as c:
        yield c


@pytest.fixture
def writable(writable_index, monkeypatch):
    with client_for(monkeypatch, indexes={"piped": str(writable_index)}) as c:
        yield c, writable_index


def test_query_answers_like_the_cli_with_references_by_sha256(client, piped_index):
    defect, good = piped_test("impurity")[0], held_out(piped_index)[0]
    records = query(client, defect, good)
    assert [r["image"] for r in records] == [defect.name, good.name]
    assert records[0]["is_anomalous"] is True and records[0]["regions"]
    assert records[1]["is_anomalous"] is False  # held-out good images are below the calibrated threshold
    with Engine.open(piped_index) as engine:
        for path, record in zip([defect, good], records):
            expected = query_record(engine.query(str(path)))
            assert CLI_KEYS <= set(record)
            for key in ("score", "threshold", "is_anomalous", "similarity", "generation", "calibration_id",
                        "fingerprint", "warning"):
                assert record[key] == expected[key], key
            assert [{k: r[k] for k in "xywh"} for r in record["regions"]] == \
                   [{k: r[k] for k in "xywh"} for r in expected["regions"]]
            for mine, theirs in zip(record["regions"] + [record["peak"]], expected["regions"] + [expected["peak"]]):
                assert mine["nearest"]["sha256"] == theirs["nearest"]["sha256"]
                assert mine["nearest"]["image"] is None  # no server path unless configured
                assert mine["nearest"]["thumbnail"].startswith(f"/v1/indexes/piped/references/{theirs['nearest']['sha256']}/")
    body = json.dumps(records)
    assert str(piped_index) not in body and str(PIPED) not in body


def test_a_raw_image_body_is_one_query(client):
    defect = piped_test("impurity")[1]
    response = client.post("/v1/indexes/piped/query", content=defect.read_bytes(), headers={"content-type": "image/bmp"})
    assert response.status_code == 200
    (record,) = response.json()["results"]
    assert record["image"] == "upload" and record["is_anomalous"] is True


def decode_png(data: bytes) -> np.ndarray:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


def test_heatmap_inline_or_by_url_at_the_image_size(client):
    defect = piped_test("impurity")[0]
    (inline,) = query(client, defect, heatmap="inline")
    assert inline["heatmap"].startswith("data:image/png;base64,")
    inline_png = decode_png(base64.b64decode(inline["heatmap"].split(",", 1)[1]))
    # the 128 x 128 image at its own size, the legend strip (score, threshold, colour bar) under it
    assert inline_png.shape[1:] == (128, 3) and inline_png.shape[0] > 128
    (by_url,) = query(client, defect, heatmap="url")
    image = client.get(by_url["heatmap"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert decode_png(image.content).shape == inline_png.shape
    (plain,) = query(client, defect)
    assert plain["heatmap"] is None


def test_reference_thumbnail_is_a_crop_of_the_stored_image(client, piped_index):
    (record,) = query(client, piped_test("impurity")[0])
    nearest = record["regions"][0]["nearest"]
    thumb = client.get(nearest["thumbnail"])
    assert thumb.status_code == 200
    crop = decode_png(thumb.content)
    assert max(crop.shape[:2]) == 160  # scaled to the default longer side
    whole = decode_png(client.get(f"/v1/indexes/piped/references/{nearest['sha256']}/thumbnail",
                                  params={"size": 128}).content)
    with Engine.open(piped_index) as engine:
        row = engine.catalog.known_hashes([nearest["sha256"]])[nearest["sha256"]]
    original = cv2.imread(row["path"], cv2.IMREAD_COLOR)
    assert whole.shape == original.shape and np.abs(whole.astype(int) - original).mean() < 2
    missing = client.get(f"/v1/indexes/piped/references/{'0' * 64}/thumbnail")
    assert missing.status_code == 404 and "no image" in missing.json()["error"]


def test_paths_only_when_configured(piped_index, monkeypatch):
    with client_for(monkeypatch, indexes={"piped": str(piped_index)}, expose_paths=True) as c:
        (record,) = query(c, piped_test("impurity")[0])
        assert Path(record["regions"][0]["nearest"]["image"]).is_file()


def test_overview_counts_thresholds_and_false_alarms(client):
    info = client.get("/v1/indexes/piped").json()
    assert info["name"] == "piped" and info["reference_images"] == 23 and info["calibration_images"] == 8
    assert info["bank_vectors"] > 0 and info["calibration_fresh"] is True and "index" not in info
    cal = info["calibration"]
    assert cal["target_false_alarms_per_100_good"] == 1.0
    # 8 held-out good images cannot promise 1%: the largest of 8 promises 1/9.
    assert cal["expected_false_alarms_per_100_good"] == pytest.approx(100 / 9, abs=1e-3)
    images = client.get("/v1/indexes/piped/images", params={"role": "calibration"}).json()
    assert images["total"] == 8 and all(len(i["sha256"]) == 64 and "image" not in i for i in images["images"])


def test_errors_are_json_with_the_right_status(client, tmp_path):
    cases = [
        (client.post("/v1/indexes/piped/query", content=b"x", headers={"content-type": "text/plain"}), 415, "not accepted"),
        (client.post("/v1/indexes/piped/query", files=[("images", ("a.txt", b"x", "text/plain"))]), 415, "a.txt"),
        (client.post("/v1/indexes/piped/query", files=[("images", ("junk.png", b"not an image", "image/png"))]),
         422, "junk.png: not a readable image"),
        (client.post("/v1/indexes/piped/query", data={"note": "hello"},
                     headers={"content-type": "multipart/form-data; boundary=x"}), 400, None),
        (client.post("/v1/indexes/nope/query", files=upload(piped_test("good")[0])), 404, "no index named 'nope'"),
        (client.post("/v1/indexes/piped/query", params={"heatmap": "svg"}, files=upload(piped_test("good")[0])),
         422, "heatmap"),
        (client.get("/v1/indexes/piped/references/not-a-hash/thumbnail"), 422, "sha256"),
        (client.get("/v1/no/such/route"), 404, None),
    ]
    for response, status, words in cases:
        assert response.status_code == status, (status, response.text)
        body = response.json()
        assert body["status"] == status and body["error"]
        if words:
            assert words in body["error"]
    tiny = tmp_path / "tiny.png"
    cv2.imwrite(str(tiny), np.zeros((4, 4, 3), np.uint8))
    response = client.post("/v1/indexes/piped/query", files=[("images", ("tiny.png", tiny.read_bytes(), "image/png"))])
    assert response.status_code == 422 and "smaller than the minimum" in response.json()["error"]


def test_one_unreadable_image_refuses_the_whole_request(client):
    before = len(client.get("/v1/indexes/piped/queries").json()["queries"])
    files = upload(piped_test("impurity")[0]) + [("images", ("broken.bmp", b"BM" + b"\0" * 40, "image/bmp"))]
    response = client.post("/v1/indexes/piped/query", files=files)
    assert response.status_code == 422 and "broken.bmp" in response.json()["error"]
    assert "results" not in response.json()
    assert len(client.get("/v1/indexes/piped/queries").json()["queries"]) == before  # nothing was scored


def test_size_and_pixel_limits(piped_index, monkeypatch):
    defect = piped_test("impurity")[0]
    with client_for(monkeypatch, indexes={"piped": str(piped_index)}, max_upload_bytes=10_000) as c:
        response = c.post("/v1/indexes/piped/query", files=upload(defect))
        assert response.status_code == 413 and "limit" in response.json()["error"]

        def chunks():  # no declared length: the limit applies while the body streams in
            yield defect.read_bytes()[:8000]
            yield defect.read_bytes()[8000:]
        response = c.post("/v1/indexes/piped/query", content=chunks(), headers={"content-type": "image/bmp"})
        assert response.status_code == 413
    with client_for(monkeypatch, indexes={"piped": str(piped_index)}, max_pixels=100 * 100) as c:
        response = c.post("/v1/indexes/piped/query", files=upload(defect))
        assert response.status_code == 413 and "128x128" in response.json()["error"]
    with client_for(monkeypatch, indexes={"piped": str(piped_index)}, max_images=2) as c:
        response = c.post("/v1/indexes/piped/query", files=upload(*piped_test("good")[:3]))
        assert response.status_code in (400, 413) and "2" in response.json()["error"]


def test_writes_need_the_token_and_reads_when_configured(piped_index, monkeypatch):
    new = piped_test("good")[0]
    with client_for(monkeypatch, token=None, indexes={"piped": str(piped_index)}) as c:
        response = c.post("/v1/indexes/piped/images", files=upload(new))
        assert response.status_code == 403 and "disabled" in response.json()["error"]
    with client_for(monkeypatch, indexes={"piped": str(piped_index)}) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
            for response in (c.post("/v1/indexes/piped/images", files=upload(new), headers=headers),
                             c.delete(f"/v1/indexes/piped/images/{'a' * 64}", headers=headers),
                             c.post("/v1/indexes/piped/calibrate", json={}, headers=headers)):
                assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert c.get("/v1/indexes/piped").status_code == 200  # reads are open by default
    with client_for(monkeypatch, indexes={"piped": str(piped_index)}, auth_reads=True) as c:
        assert c.post("/v1/indexes/piped/query", files=upload(new)).status_code == 401
        assert c.get("/v1/metrics").status_code == 401
        assert c.get("/v1/health").status_code == 200  # liveness stays open
        assert c.post("/v1/indexes/piped/query", files=upload(new), headers=AUTH).status_code == 200
    with Engine.open(piped_index) as engine:
        assert engine.info()["reference_images"] == 23  # nothing was written by any of these


def test_add_upload_remove_and_calibrate(writable):
    client, directory = writable
    new = piped_test("good")[0]
    sha = hashlib.sha256(new.read_bytes()).hexdigest()
    response = client.post("/v1/indexes/piped/images", files=upload(new, new), headers=AUTH)
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["added"] == [sha] and report["generation"] == 2
    assert [s["reason"] for s in report["skipped"]] == [f"same image as {new.name} in this request"]
    assert report["calibration"] is None and report["warning"] is None  # recalibrated in the add's commit
    stored = directory / "uploads" / f"{sha}.bmp"
    assert stored.read_bytes() == new.read_bytes()  # the uploaded bytes live inside the index, for repair
    with Engine.open(directory) as engine:
        assert engine.catalog.known_hashes([sha])[sha]["path"] == str(stored)
        assert engine.check()["ok"]

    # The bank changed and its calibration was measured again with it: verdicts go on.
    (record,) = query(client, piped_test("impurity")[0])
    assert record["generation"] == record["calibration_generation"] == 2 and record["is_anomalous"] is True
    again = client.post("/v1/indexes/piped/images", files=upload(new), headers=AUTH).json()
    assert again["added"] == [] and "already in the index" in again["skipped"][0]["reason"]

    cal = client.post("/v1/indexes/piped/calibrate", json={"target_fpr": 0.05}, headers=AUTH)
    assert cal.status_code == 200, cal.text
    assert cal.json()["generation"] == 2 and cal.json()["n_good"] == 8
    assert cal.json()["target_false_alarms_per_100_good"] == 5.0
    (record,) = query(client, piped_test("impurity")[0])
    assert record["is_anomalous"] is True and record["calibration_id"] == cal.json()["id"]

    removed = client.delete(f"/v1/indexes/piped/images/{sha}", headers=AUTH)
    assert removed.status_code == 200 and removed.json()["removed"] == [sha] and removed.json()["generation"] == 3
    assert removed.json()["calibration"] is None
    assert not stored.exists()
    assert client.delete(f"/v1/indexes/piped/images/{sha}", headers=AUTH).status_code == 404
    assert client.get("/v1/indexes/piped").json()["reference_images"] == 23


def test_bad_uploads_to_add_change_nothing(writable):
    client, directory = writable
    files = upload(piped_test("good")[1]) + [("images", ("junk.bmp", b"BM junk", "image/bmp"))]
    response = client.post("/v1/indexes/piped/images", files=files, headers=AUTH)
    assert response.status_code == 422 and "junk.bmp" in response.json()["error"]
    assert not (directory / "uploads").exists()
    assert client.get("/v1/indexes/piped").json()["generation"] == 1
    bad = client.post("/v1/indexes/piped/calibrate", json={"target_fpr": 2}, headers=AUTH)
    assert bad.status_code == 422 and "target_fpr" in bad.json()["error"]


def test_changes_made_outside_the_server_are_seen_at_the_next_request(writable, tmp_path):
    client, directory = writable
    (first,) = query(client, piped_test("impurity")[0])
    assert (first["generation"], first["calibration_id"]) == (1, 1)
    with Engine.open(directory) as cli:  # another writer, as `simsearch index add` would be
        cli.add([str(piped_test("good")[2])], recalibrate=False)
    (second,) = query(client, piped_test("impurity")[0])  # verdicts by the calibration the add predates
    assert second["generation"] == 2 and second["calibration_generation"] == 1 and second["is_anomalous"] is True
    assert "before the adds since" in second["warning"]
    assert client.get("/v1/indexes/piped").json()["calibration_fresh"] is False
    with Engine.open(directory) as cli:
        cli.remove([str(piped_test("good")[2])], recalibrate=False)
    (stale,) = query(client, piped_test("impurity")[0])
    assert stale["generation"] == 3 and stale["is_anomalous"] is None and stale["threshold"] is None
    with Engine.open(directory) as cli:
        cli.calibrate()
    (third,) = query(client, piped_test("impurity")[0])
    assert third["calibration_id"] == 3 and third["is_anomalous"] is True
    # The index deleted and built again (a new database file): the server reopens it.
    shutil.rmtree(directory)
    assert client.post("/v1/indexes/piped/query", files=upload(piped_test("good")[0])).status_code == 503
    with Engine.create(directory) as engine:
        engine.add([str(p) for p in sorted((PIPED / "train" / "good").iterdir())[:6]])
    info = client.get("/v1/indexes/piped").json()
    assert info["reference_images"] == 6 and info["calibration"] is None
    (fourth,) = query(client, piped_test("impurity")[0])
    assert fourth["generation"] == 1 and fourth["calibration_id"] is None and fourth["is_anomalous"] is None


def test_queries_during_writes_never_mix_a_bank_with_another_banks_threshold(writable):
    client, directory = writable
    defects = piped_test("impurity")[:4]
    writing_done = threading.Event()
    answers = []  # (started, finished, record)

    def ask_until_the_writer_is_done(worker: int) -> None:
        i = worker
        while not writing_done.is_set():
            started = time.monotonic()
            record = query(client, defects[i % len(defects)])[0]
            answers.append((started, time.monotonic(), record))
            i += 2

    with ThreadPoolExecutor(2) as pool:
        workers = [pool.submit(ask_until_the_writer_is_done, w) for w in range(2)]
        while not answers:  # the readers are at work before the writer starts
            time.sleep(0.05)
        write_started = time.monotonic()
        try:
            with Engine.open(directory) as writer:
                writer.add([str(piped_test("good")[3])])
                writer.calibrate()
                writer.add([str(piped_test("good")[4])])
        finally:
            write_finished = time.monotonic()
            writing_done.set()
        for w in workers:
            w.result()
    with Engine.open(directory) as engine:
        with engine.catalog.engine.connect() as conn:
            calibrated_on = dict(conn.exec_driver_sql("SELECT id, generation FROM calibrations").all())
    overlapping = [r for started, finished, r in answers if started < write_finished and finished > write_started]
    assert overlapping, "no query ran while the writer worked"
    assert len({r["generation"] for _, _, r in answers}) >= 2  # the readers saw the bank move on
    for _, _, record in answers:
        if record["is_anomalous"] is None:
            assert record["threshold"] is None and "calibrate" in record["warning"]
        else:
            assert calibrated_on[record["calibration_id"]] == record["generation"]
    assert query(client, defects[0])[0]["generation"] == 3  # and afterwards, the newest bank


def test_several_indexes_and_a_root_folder(piped_index, tmp_path, monkeypatch):
    root = tmp_path / "root"
    root.mkdir()
    shutil.copytree(piped_index, root / "lineA")
    with client_for(monkeypatch, indexes={"piped": str(piped_index)}, root=str(root)) as c:
        assert [i["name"] for i in c.get("/v1/indexes").json()["indexes"]] == ["lineA", "piped"]
        with Engine.create(root / "lineB") as engine:  # built after the server started
            engine.add([str(p) for p in sorted((PIPED / "train" / "good").iterdir())[:4]])
        assert c.get("/v1/indexes/lineB").json()["reference_images"] == 4
        a, p = query(c, piped_test("impurity")[0], name="lineA")[0], query(c, piped_test("impurity")[0], name="piped")[0]
        assert a["score"] == p["score"]
        registry = c.app.state.registry  # one model in the process for indexes of one configuration
        assert registry.get("lineA").reader().embedder is registry.get("piped").reader().embedder
        assert c.get("/v1/indexes/..").status_code in (404, 422)
        health = c.get("/v1/health").json()
        assert health["status"] == "ok" and {i["name"] for i in health["indexes"]} == {"lineA", "lineB", "piped"}


def test_recent_queries_and_metrics(client):
    query(client, piped_test("impurity")[2], heatmap="url")
    (latest,) = client.get("/v1/indexes/piped/queries", params={"limit": 1}).json()["queries"]
    assert latest["record"]["image"] == piped_test("impurity")[2].name
    assert decode_png(client.get(latest["preview"]).content).shape[:2] == (128, 128)
    assert client.get(latest["record"]["heatmap"]).status_code == 200
    assert client.get("/v1/indexes/piped/queries/0123456789abcdef/heatmap.png").status_code == 404
    text = client.get("/v1/metrics").text
    assert 'simsearch_http_requests_total{method="POST",route="/v1/indexes/{name}/query",status="200"}' in text
    assert 'simsearch_http_request_duration_seconds_count{method="POST",route="/v1/indexes/{name}/query"}' in text
    assert 'simsearch_queries_total{index="piped",verdict="anomalous"}' in text
    assert 'simsearch_drift_share{index="piped"}' in text and 'simsearch_drift_expected_share{index="piped"}' in text
    tile = sorted((DATASETS / "magnetic_tile" / "magnetic_tile" / "test" / "good").iterdir())[0]
    (foreign,) = query(client, tile)
    assert foreign["comparable"] is False and foreign["is_anomalous"] is None
    assert 'simsearch_queries_total{index="piped",verdict="foreign"} 1.0' in client.get("/v1/metrics").text
    drift = client.get("/v1/indexes/piped").json()["drift"]
    assert drift["queries"] >= 1 and drift["expected_share"] > 0


def test_dashboard_files_are_served(client):
    assert client.get("/", follow_redirects=False).headers["location"] == "/dashboard/"
    page = client.get("/dashboard/")
    assert page.status_code == 200 and "simsearch" in page.text
    for asset in ("dashboard.js", "dashboard.css"):
        assert client.get(f"/dashboard/{asset}").status_code == 200
    assert "http" not in page.text.replace("http-equiv", "")  # nothing loaded from elsewhere
    assert client.get("/openapi.json").json()["paths"]["/v1/indexes/{name}/query"]["post"]
