"""Helpers of tests/test_ray.py that Ray's workers import (this folder is on their PYTHONPATH), and a driver
for its kill test, run as a real process: it connects to the test's Ray cluster and adds a folder to an
index through Ray with a slow tiny embedder, printing each image the driver receives, so the test can
SIGKILL it mid-add.

    python tests/ray_driver.py RAY_ADDRESS INDEX FOLDER
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from fakes import TinyEmbedder


class SlowTinyEmbedder(TinyEmbedder):
    """TinyEmbedder taking 1 s per backbone call (a batch of two images): an add of a dozen images lasts seconds."""

    def _forward(self, batch):
        time.sleep(1.0)
        return super()._forward(batch)


class RecordingPids:
    """An embedder factory that leaves each actor's process id in `folder` (a test kills one by it)."""

    def __init__(self, folder: str):
        self.folder = folder

    def __call__(self) -> SlowTinyEmbedder:
        (Path(self.folder) / str(os.getpid())).touch()
        return SlowTinyEmbedder()


def main(address: str, index: str, folder: str) -> None:
    import ray

    from simsearch.distributed.ray_ingest import RayEmbedding
    from simsearch.engine import Engine

    ray.init(address=address, log_to_driver=False)
    with Engine.open(index) as engine:
        engine.add([folder], progress=lambda stage, done, total: print(stage, done, total, flush=True),
                   embedding=RayEmbedding(SlowTinyEmbedder, None, actors=2, batch_images=2))
    print("committed", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
