"""Bounded load test of `simsearch serve` on 127.0.0.1: N queries from C concurrent clients.

    .venv/bin/python bench/load.py [--index DIR] [--queries 500] [--concurrency 4]

Without --index it builds a calibrated index of PIPED PA_BDP01_TL (train/good, a quarter held out) in a
temporary folder. It starts the server as a user would (`python -m simsearch.cli serve`) on a free
loopback port, sends a few warm-up queries (not counted), then the test images of PA_BDP01_TL round-robin
as raw request bodies, one connection per client, and prints p50/p95/p99 latency, throughput and errors
(any answer that is not a 200 with a verdict counts) as a markdown table. It stops by itself: after the
given number of queries, or --max-seconds.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIPED = ROOT.parent / "shared" / "datasets" / "piped" / "PA_BDP01_TL"


def build_index(directory: Path) -> None:
    from simsearch import Engine

    with Engine.create(directory) as engine:
        engine.add(sorted(str(p) for p in (PIPED / "train" / "good").iterdir()), holdout=0.25)
        engine.calibrate(target_fpr=0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/v1/health", timeout=2):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.3)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--index", type=Path, help="a calibrated index (default: build PIPED PA_BDP01_TL)")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=900, help="stop sending after this long")
    args = parser.parse_args()

    images = sorted(p for kind in ("good", "impurity") for p in (PIPED / "test" / kind).iterdir())
    bodies = [p.read_bytes() for p in images]
    with tempfile.TemporaryDirectory() as tmp:
        index = args.index
        if index is None:
            index = Path(tmp) / "piped"
            build_index(index)
        port = free_port()
        log = open(Path(tmp) / "server.log", "w")
        server = subprocess.Popen([sys.executable, "-m", "simsearch.cli", "serve", "--index", f"piped={index}",
                                   "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            wait_until_up(f"http://127.0.0.1:{port}", server)
            results = run_load(port, bodies, args)
        finally:
            server.terminate()
            server.wait(timeout=30)
            log.close()
    report(results, args, len(images))


def run_load(port: int, bodies: list[bytes], args) -> dict:
    path = "/v1/indexes/piped/query"
    headers = {"Content-Type": "image/bmp"}
    lock = threading.Lock()
    counter = iter(range(args.queries))
    latencies: list[float] = []
    errors: list[str] = []
    verdicts = {"anomalous": 0, "ok": 0}
    stop_at = time.monotonic() + args.max_seconds

    def post(conn: http.client.HTTPConnection, body: bytes) -> tuple[int, bytes]:
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()

    warm = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    for body in bodies[:args.warmup]:
        post(warm, body)
    warm.close()

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while time.monotonic() < stop_at:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            start = time.perf_counter()
            try:
                status, data = post(conn, bodies[i % len(bodies)])
                verdict = json.loads(data)["results"][0]["is_anomalous"] if status == 200 else None
            except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
                status, verdict = 0, None
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                errors.append(f"{exc.__class__.__name__}: {exc}")
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)
                if status != 200 or verdict is None:
                    errors.append(f"status {status}, verdict {verdict}")
                else:
                    verdicts["anomalous" if verdict else "ok"] += 1
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies": latencies, "errors": errors, "verdicts": verdicts, "wall": time.perf_counter() - start}


def report(results: dict, args, n_images: int) -> None:
    lat = [x * 1000 for x in results["latencies"]]
    n = len(lat)
    rows = [("queries answered", f"{n} ({args.concurrency} concurrent clients, {n_images} distinct 128x128 images)"),
            ("errors", str(len(results["errors"]))),
            ("p50 latency", f"{percentile(lat, 50):.1f} ms"), ("p95 latency", f"{percentile(lat, 95):.1f} ms"),
            ("p99 latency", f"{percentile(lat, 99):.1f} ms"), ("mean latency", f"{statistics.mean(lat):.1f} ms"),
            ("throughput", f"{n / results['wall']:.1f} queries/s ({results['wall']:.1f} s wall)"),
            ("verdicts", f"{results['verdicts']['anomalous']} anomalous, {results['verdicts']['ok']} ok")]
    print("| measure | value |\n|---|---|")
    for key, value in rows:
        print(f"| {key} | {value} |")
    for line in results["errors"][:5]:
        print("error:", line, file=sys.stderr)
    print(f"cpus: {os.cpu_count()}", file=sys.stderr)


if __name__ == "__main__":
    main()
