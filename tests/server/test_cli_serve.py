"""`simsearch serve` refuses settings it cannot honour, with one line and before listening."""
from __future__ import annotations

import os
import subprocess
import sys


def serve(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "SIMSEARCH_TOKEN"} | env
    return subprocess.run([sys.executable, "-m", "simsearch.cli", "serve", *args], capture_output=True, text=True,
                          env=environment, timeout=120)


def test_refuses_reads_behind_a_token_that_does_not_exist(tmp_path):
    proc = serve("--index", f"a={tmp_path}", "--auth-reads")
    assert proc.returncode == 1 and "--auth-reads needs a token" in proc.stderr and "Traceback" not in proc.stderr
    empty = tmp_path / "token"
    empty.write_text("\n")
    proc = serve("--index", f"a={tmp_path}", "--token-file", str(empty))
    assert proc.returncode == 1 and "token file is empty" in proc.stderr
    proc = serve("--index", f"a={tmp_path}", "--token-file", str(tmp_path / "missing"))
    assert proc.returncode == 1 and "cannot read the token file" in proc.stderr


def test_refuses_bad_index_names_and_duplicates(tmp_path):
    proc = serve("--index", f"bad/name={tmp_path}", SIMSEARCH_TOKEN="t")
    assert proc.returncode == 1 and "index name" in proc.stderr and "Traceback" not in proc.stderr
    proc = serve("--index", f"a={tmp_path}", "--index", f"a={tmp_path}", SIMSEARCH_TOKEN="t")
    assert proc.returncode == 1 and "two indexes are named 'a'" in proc.stderr
