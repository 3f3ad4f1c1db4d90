"""The embedding step of `index add`, fanned out through Ray Data (ingest.ImageEmbedding).

The driver hashes the files, as a local add does, and hands Ray the work items (path, sha256, embed or
only read); `map_batches` runs them on a fixed pool of actors, each loading the model once (`IndexModel`:
the index's own embedder, its ONNX model where ONNX Runtime is installed) and answering each batch with
every image's vectors, tile boxes and cell table. The results stream back in the items' order, and
Ingest writes them exactly as it writes a local add's: same spool, same ids, same single transaction.
The driver is the only writer: a job killed or failed before the commit leaves the index as it was.

What travels: paths, not pixels. Workers read the files themselves, so the images (and the index folder,
for its model) must be readable at the same paths on every node (shared storage: NFS, a mounted bucket).
A worker checks each file's sha256 against the driver's, so a file that differs on a node is refused
("changed while being added"), never embedded silently.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..ingest import EmbeddedImage, WorkItem, embed_items
from .cluster import largest_node_cpus, ray_session

BATCH_IMAGES = 4  # images per actor call: small enough to spread 30 images over actors, big enough to batch tiles


class IndexModel:
    """Loads an index's own embedder (embedders.load_for_index) where it is called: in each actor."""

    def __init__(self, directory: str | os.PathLike, config):
        self.directory, self.config_json = str(directory), config.to_json()  # travels as JSON

    def __call__(self):
        from ..config import IndexConfig
        from ..embedders import load_for_index
        return load_for_index(Path(self.directory), IndexConfig.from_json(self.config_json))


class EmbedActor:
    """One actor of the pool: the model, loaded once, applied to batches of work items (numpy columns)."""

    def __init__(self, make_embedder: Callable[[], object], threads: int):
        os.environ["SIMSEARCH_THREADS"] = str(threads)  # the CPUs Ray gave this actor, not the node's
        self.embedder = make_embedder()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        items = [WorkItem(str(p), str(s), bool(e)) for p, s, e in zip(batch["path"], batch["sha256"], batch["embed"])]
        out: dict[str, list] = {k: [] for k in ("position", "error", "width", "height", "dim", "vectors", "table",
                                                "boxes", "pooled")}
        for position, (_item, result) in zip(batch["position"], embed_items(self.embedder, items)):
            out["position"].append(int(position))
            failed = isinstance(result, BaseException)
            if failed and not _is_image_error(result):
                raise result  # a bug, not a bad file: the job fails and the add with it
            got = None if failed else result
            out["error"].append(str(result) if failed else "")
            out["width"].append(got.width if got else 0)
            out["height"].append(got.height if got else 0)
            vectors = got.vectors if got is not None and got.vectors is not None else None
            out["dim"].append(0 if vectors is None else int(vectors.shape[1]))
            out["vectors"].append(b"" if vectors is None else np.ascontiguousarray(vectors, np.float32).tobytes())
            out["table"].append(b"" if vectors is None else np.ascontiguousarray(got.table, np.int64).tobytes())
            out["boxes"].append(b"" if vectors is None else np.asarray(got.boxes, np.int64).tobytes())
            out["pooled"].append(b"" if vectors is None else np.asarray(got.pooled, np.float32).tobytes())
        return out


def _is_image_error(exc: BaseException) -> bool:
    from ..errors import ImageError
    return isinstance(exc, ImageError)


def result_of(row: dict) -> EmbeddedImage | Exception:
    """An actor's output row -> what LocalEmbedding would have given for that item."""
    if row["error"]:
        from ..errors import ImageError
        return ImageError(row["error"])
    image = EmbeddedImage(int(row["width"]), int(row["height"]))
    dim = int(row["dim"])
    if dim:
        image.vectors = np.frombuffer(row["vectors"], np.float32).reshape(-1, dim)
        image.table = np.frombuffer(row["table"], np.int64).reshape(-1, 5)
        image.boxes = [tuple(int(v) for v in b) for b in np.frombuffer(row["boxes"], np.int64).reshape(-1, 4)]
        image.pooled = np.frombuffer(row["pooled"], np.float32)
    return image


class RayEmbedding:
    """ingest.ImageEmbedding on a Ray cluster: `address` "local", a cluster address, or None (the Ray
    session already initialised). `actors`: the pool size (default: one per CPU of the largest node, at
    most one per batch); each actor gets the CPUs of that node divided among the actors, and as many threads."""

    def __init__(self, make_embedder: Callable[[], object], address: str | None = "local",
                 actors: int | None = None, batch_images: int = BATCH_IMAGES):
        if actors is not None and actors < 1:
            from ..errors import BadInput
            raise BadInput(f"--ray-actors must be >= 1, got {actors}")
        self.make_embedder, self.address, self.actors, self.batch_images = make_embedder, address, actors, batch_images

    @classmethod
    def for_index(cls, engine, address: str | None, actors: int | None = None) -> "RayEmbedding":
        """The embedding step of an add to `engine`'s index, its actors running the index's own model."""
        return cls(IndexModel(engine.directory, engine.config), address, actors)

    def __call__(self, items: list[WorkItem]) -> Iterator[tuple[WorkItem, EmbeddedImage | Exception]]:
        if not items:
            return
        with ray_session(self.address) as ray:
            node_cpus = largest_node_cpus(ray)
            n_batches = math.ceil(len(items) / self.batch_images)
            cluster_cpus = int(ray.cluster_resources().get("CPU", 1))
            actors = min(self.actors or node_cpus, n_batches, cluster_cpus)  # more would wait for CPUs forever
            threads = max(1, node_cpus // actors)
            context = ray.data.DataContext.get_current()
            context.execution_options.preserve_order = True  # results in the items' order: same ids as a local add
            context.enable_progress_bars = False
            dataset = ray.data.from_items(
                [{"position": i, "path": it.path, "sha256": it.sha256, "embed": it.embed} for i, it in enumerate(items)],
                override_num_blocks=n_batches)
            embedded = dataset.map_batches(
                EmbedActor, fn_constructor_args=(self.make_embedder, threads), batch_size=self.batch_images,
                batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=threads)
            expected = 0
            for row in embedded.iter_rows():
                position = int(row["position"])
                if position != expected:  # preserve_order promises this; never write vectors under wrong ids
                    raise RuntimeError(f"Ray returned image {position} where {expected} was due")
                yield items[position], result_of(row)
                expected += 1
            if expected != len(items):
                raise RuntimeError(f"Ray returned {expected} of {len(items)} images")
