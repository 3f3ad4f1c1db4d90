"""The server against a hostile or unlucky client, through a real uvicorn server and an HTTP client (keep-alive
and Host headers are the HTTP layer's, which a test client would not show)."""
from __future__ import annotations

import contextlib
import os
import socket
import threading
import time

import httpx
import uvicorn

from realdata import needs_piped, piped_test
from simsearch import Engine
from simsearch.server.app import ServerSettings, create_app
from simsearch.server.indexes import ServedIndex
from simsearch.store import bankfiles

pytestmark = needs_piped
TOKEN = "hostile-token-0123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@contextlib.contextmanager
def live(monkeypatch, **settings):
    """A uvicorn server on a free loopback port in a thread: yields its base URL."""
    monkeypatch.setenv("SIMSEARCH_TOKEN", TOKEN)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(ServerSettings(**settings)), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def upload(*paths) -> list:
    return [("images", (p.name, p.read_bytes(), "image/bmp")) for p in paths]


def test_an_internal_error_says_connection_close_and_the_next_request_on_the_client_succeeds(piped_index,
                                                                                            monkeypatch):
    def broken(self):
        raise RuntimeError("a bug")
    monkeypatch.setattr(ServedIndex, "overview", broken)
    with live(monkeypatch, indexes={"piped": str(piped_index)}) as url, httpx.Client(base_url=url) as client:
        for _ in range(3):  # one keep-alive client throughout, as a camera station's
            response = client.get("/v1/indexes/piped")
            assert response.status_code == 500 and response.json()["status"] == 500
            assert response.headers["connection"] == "close"
            assert client.get("/v1/health").status_code == 200


def test_busy_and_damaged_answers_name_the_index_not_its_folder(writable_index, monkeypatch):
    monkeypatch.setenv("SIMSEARCH_LOCK_TIMEOUT", "0.3")
    with Engine.open(writable_index) as engine:
        bank = bankfiles.bank_path(writable_index, "patches", engine.generation)
    with live(monkeypatch, indexes={"piped": str(writable_index)}) as url, httpx.Client(base_url=url) as client:
        with Engine.open(writable_index) as engine, engine.writer_lock():
            busy = client.post("/v1/indexes/piped/images", files=upload(piped_test("good")[0]), headers=AUTH)
        assert busy.status_code == 409
        bank.write_bytes(bank.read_bytes()[:-100])  # cut short
        damaged = client.post("/v1/indexes/piped/query", files=upload(piped_test("good")[1]))
        assert damaged.status_code == 503
        for answer in (busy, damaged):
            message = answer.json()["error"]
            assert "<index piped>" in message and str(writable_index) not in message, message
            assert os.path.realpath(writable_index) not in message
    with live(monkeypatch, indexes={"piped": str(writable_index)}, expose_paths=True) as url:
        message = httpx.post(f"{url}/v1/indexes/piped/query", files=upload(piped_test("good")[1])).json()["error"]
        assert str(writable_index) in message


def test_too_many_images_or_pixels_in_one_request_is_413(piped_index, monkeypatch):
    images = piped_test("good")[:2]  # 128 x 128 each
    with live(monkeypatch, indexes={"piped": str(piped_index)}, max_request_pixels=128 * 128 + 1) as url:
        many = httpx.post(f"{url}/v1/indexes/piped/query", files=upload(*[images[0]] * 17))
        assert many.status_code == 413 and "17 parts" in many.json()["error"]
        assert httpx.post(f"{url}/v1/indexes/piped/query", files=upload(*[images[0]] * 60)).status_code == 413
        pixels = httpx.post(f"{url}/v1/indexes/piped/query", files=upload(*images))
        assert pixels.status_code == 413 and "pixels per request" in pixels.json()["error"]
        assert httpx.post(f"{url}/v1/indexes/piped/query", files=upload(images[0])).status_code == 200


def test_docs_load_nothing_from_another_site(piped_index, monkeypatch):
    with live(monkeypatch, indexes={"piped": str(piped_index)}) as url:
        page = httpx.get(f"{url}/docs")
        assert page.status_code == 200 and "swagger-ui-bundle.js" in page.text
        external = [part for part in page.text.split('"') if part.startswith(("http://", "https://", "//"))]
        assert external == [], external
        for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
            assert httpx.get(f"{url}/docs/assets/{asset}").status_code == 200
        assert httpx.get(f"{url}/openapi.json").json()["info"]["title"] == "simsearch"


def test_a_host_header_the_server_does_not_answer_to_is_refused(piped_index, monkeypatch):
    with live(monkeypatch, indexes={"piped": str(piped_index)}) as url:
        port = url.rsplit(":", 1)[1]
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST"):
            assert httpx.get(f"{url}/v1/indexes", headers={"Host": host}).status_code == 200, host
        for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.attacker.example", ""):
            refused = httpx.get(f"{url}/v1/indexes", headers={"Host": host})
            assert refused.status_code == 400 and "not one this server answers to" in refused.json()["error"], host
    with live(monkeypatch, indexes={"piped": str(piped_index)}, allowed_hosts=("camera-hub.lan",)) as url:
        assert httpx.get(f"{url}/v1/health", headers={"Host": "camera-hub.lan"}).status_code == 200
        assert httpx.get(f"{url}/v1/health").status_code == 400  # 127.0.0.1 was not named
    with live(monkeypatch, indexes={"piped": str(piped_index)}, allowed_hosts=("*",)) as url:
        assert httpx.get(f"{url}/v1/health", headers={"Host": "anything.example"}).status_code == 200


def test_the_dashboard_cannot_be_framed_and_runs_only_its_own_scripts(piped_index, monkeypatch):
    with live(monkeypatch, indexes={"piped": str(piped_index)}) as url:
        for path in ("/dashboard/", "/dashboard/dashboard.js", "/v1/health"):
            headers = httpx.get(f"{url}{path}").headers
            assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
            policy = headers["content-security-policy"]
            assert "frame-ancestors 'none'" in policy and "default-src 'self'" in policy
            assert "unsafe-inline" not in policy and "http" not in policy
