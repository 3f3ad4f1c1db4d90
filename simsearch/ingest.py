"""Ingest: adding good images to an index.

An add hashes its inputs and skips duplicates, holds out a deterministic slice for calibration, decodes
and embeds the new references (their vectors streamed to a spool file, so memory holds a block at a
time), lets a sampler pick the vectors the bank keeps, and writes everything in one bank transaction:
catalog rows, the next generation's bank files, then the commit. Nothing reaches the index before that
commit; a failure or a kill before it leaves the index as it was.
"""
from __future__ import annotations

import hashlib
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from .coreset import KeepAll
from .errors import BadInput, ImageError, IndexDamaged
from .faults import crash_point
from .images import Image, decode, expand_paths, file_sha256, read_ahead, read_bytes
from .records import AddReport, Progress
from .store.banks import BankTransaction
from .store.spool import VectorSpool
from .store.twostage import unit_mean
from .store.vectors import IVF_KINDS, choose_kind


@dataclass
class NewReference:
    """A new reference image's catalog data, its vectors waiting in the add's spool."""

    row: dict  # the images row
    boxes: list[tuple[int, int, int, int]]  # tile boxes in original pixels
    table: np.ndarray  # (n, 5) int64 [tile, row, col, x, y] per vector, in spool order
    pooled: np.ndarray  # (D,) float32 unit-length mean of its vectors


def cell_rows(grid) -> tuple[list[tuple[int, int, int, int]], np.ndarray]:
    """A PatchGrid -> tile boxes in original pixels and (N, 5) int64 [tile number, row, col, x, y] per cell."""
    h0, w0 = grid.original_size
    sy, sx = grid.layout.height / h0, grid.layout.width / w0
    boxes = []
    for (x, y, w, h) in grid.layout.tile_boxes():
        x0, y0 = int(x / sx), int(y / sy)
        x1, y1 = min(int(np.ceil((x + w) / sx)), w0), min(int(np.ceil((y + h) / sy)), h0)
        boxes.append((x0, y0, max(x1 - x0, 0), max(y1 - y0, 0)))
    hc, wc = grid.grid_shape
    rows, cols = np.meshgrid(np.arange(hc), np.arange(wc), indexing="ij")
    cell_boxes = grid.cell_boxes()
    table = np.stack([grid.tile_index.ravel(), rows.ravel(), cols.ravel(),
                      cell_boxes[..., 0].ravel(), cell_boxes[..., 1].ravel()], axis=1).astype(np.int64)
    return boxes, table


def pooled_vector(grid) -> np.ndarray:
    """(Hc, Wc, D) patch vectors -> (D,) float32 unit-length mean (the image's vector for `search`)."""
    return unit_mean(grid.features.reshape(-1, grid.features.shape[-1]))


@dataclass(frozen=True)
class WorkItem:
    """A file an add reads: `embed` False for a held-out image (read and decoded for its size only)."""

    path: str
    sha256: str  # what the file hashed to when the add began; a file that changed since is refused
    embed: bool


@dataclass
class EmbeddedImage:
    """What an add keeps of one read image: its size and, when it was embedded, its vectors and layout."""

    width: int
    height: int
    vectors: np.ndarray | None = None  # (n, D) float32 patch vectors, in cell order
    boxes: list[tuple[int, int, int, int]] | None = None  # tile boxes in original pixels
    table: np.ndarray | None = None  # (n, 5) int64 [tile, row, col, x, y] per vector
    pooled: np.ndarray | None = None  # (D,) float32 unit-length mean of its vectors

    @classmethod
    def of_grid(cls, grid) -> "EmbeddedImage":
        boxes, table = cell_rows(grid)
        h, w = grid.original_size
        return cls(int(w), int(h), grid.features.reshape(-1, grid.features.shape[-1]), boxes, table,
                   pooled_vector(grid))


# The embedding step of an add, as a seam: work items -> (item, EmbeddedImage or the exception that
# reading it raised), one per item and in their order. `LocalEmbedding` runs it in this process;
# simsearch/distributed/ray_ingest.py fans it out to a Ray cluster.
ImageEmbedding = Callable[[list[WorkItem]], Iterable[tuple[WorkItem, "EmbeddedImage | Exception"]]]


def read_image(item: WorkItem) -> np.ndarray:
    """The (H, W, 3) uint8 RGB image of a work item; ImageError if it cannot be read or has changed."""
    data = read_bytes(item.path)  # regular files only: a FIFO swapped in since hashing is refused
    if hashlib.sha256(data).hexdigest() != item.sha256:
        raise ImageError(f"{item.path}: changed while being added")
    return decode(data, item.path)


def embed_items(embedder, items: Iterable[WorkItem], depth: int = 4) -> Iterator[tuple[WorkItem, "EmbeddedImage | Exception"]]:
    """Read `items` a few ahead (`depth`), embed those to embed in batches across images
    (`embedder.embed_many`), and yield (item, EmbeddedImage or exception) in the items' order."""
    queue: deque[list] = deque()  # [item, result]; result None while its grid is being computed
    waiting: deque[list] = deque()  # the entries of `queue` handed to the embedder, oldest first

    def images():
        for item, rgb, error in read_ahead(items, read_image, depth):
            entry = [item, error]
            queue.append(entry)
            if error is None and not item.embed:
                entry[1] = EmbeddedImage(int(rgb.shape[1]), int(rgb.shape[0]))
            elif error is None:
                waiting.append(entry)
                yield Image(rgb=rgb, sha256=item.sha256, source=item.path)

    def ready():
        while queue and queue[0][1] is not None:
            item, result = queue.popleft()
            yield item, result

    for grid in embedder.embed_many(images()):
        waiting.popleft()[1] = EmbeddedImage.of_grid(grid)
        yield from ready()
    yield from ready()


class LocalEmbedding:
    """The embedding step in this process, with the index's embedder."""

    def __init__(self, embedder):
        self.embedder = embedder

    def __call__(self, items: list[WorkItem]) -> Iterator[tuple[WorkItem, "EmbeddedImage | Exception"]]:
        return embed_items(self.embedder, items)


def grown(txn: BankTransaction, blocks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]], n_more: int,
          index_kind: str, nprobe: int | None, kind_policy: Callable[[str, int], str] = choose_kind) -> None:
    """Add the (vectors, ids) blocks of `blocks()` (`n_more` vectors) to the transaction's patch bank,
    rebuilt as another kind when its new size calls for one (`kind_policy(index_kind, n)`, the kind
    "auto" picks for n vectors); one block in memory at a time."""
    bank = txn.base.patches
    kind = kind_policy(index_kind, bank.ntotal + n_more)
    if index_kind == "auto" and bank.kind in IVF_KINDS:
        kind = bank.kind  # an approximate bank made by an older "auto" policy keeps its kind: no surprise rebuild
    if kind != bank.kind:
        new = bank.grown_as(kind, blocks, n_more)
        new.use_nprobe(nprobe)
        txn.patches = new
        return
    for vectors, ids in blocks():
        if len(ids):
            txn.patches.add(vectors, ids)


class Ingest:
    """`add` for one index: `index` is the Engine (its folder, catalog, bank store and embedder).
    `kind_policy`: the bank kind for a size (store.vectors.choose_kind; a test may set another)."""

    def __init__(self, index):
        self.index = index
        self.kind_policy = choose_kind

    def add(self, inputs: Iterable[str | os.PathLike], *, holdout: float = 0.0, coreset: float | None = None,
            progress: Progress | None = None, recalibrate: bool = True,
            embedding: "ImageEmbedding | None" = None) -> AddReport:
        """`embedding`: what reads and embeds the new images (default: `LocalEmbedding` of the index's
        embedder, in this process); everything else, the write and its recalibration above all, is the same
        whichever it is."""
        from .coreset import sampler_for

        if not 0 <= holdout < 1:
            raise BadInput(f"holdout must be in [0, 1), got {holdout}")
        sampler = sampler_for(coreset)
        inputs = [os.fspath(p) for p in inputs]
        files, skipped = expand_paths(inputs)
        if not files:
            why = f" ({skipped[0][0]}: {skipped[0][1]})" if skipped else ""
            raise BadInput(f"no image files in {', '.join(inputs) or 'nothing'}{why}; nothing was added")
        # Named paths that are not folders (a FIFO among them): failing to read one aborts the add.
        explicit = {os.path.abspath(p) for p in inputs if os.path.exists(p) and not os.path.isdir(p)}
        report = AddReport(skipped=list(skipped))
        with self.index.writer_lock():
            hashed = self._hash_new(files, explicit, report)
            # A deterministic slice for calibration: the smallest sha256 values.
            order = sorted(hashed)
            n_hold = int(round(holdout * len(order)))
            if holdout > 0 and len(order) >= 2:
                n_hold = min(max(n_hold, 1), len(order) - 1)
            held = set(order[:n_hold])
            todo = [(hashed[sha], sha) for sha in sorted(hashed, key=lambda s: hashed[s])]
            with self.index.folder.spool_folder() as tmp, \
                    VectorSpool(tmp / "vectors.f32", self.index.config.feature_dim) as spool:
                new_refs, new_held = self._embed_new(todo, held, explicit, report, spool, progress,
                                                     embedding or LocalEmbedding(self.index.embedder))
                if progress:
                    progress("writing", len(todo), len(todo))
                report.vectors_added, report.generation, report.calibration = self._write(
                    new_refs, new_held, spool, sampler, recalibrate)
        return report

    def _hash_new(self, files: list[str], explicit: set[str], report: AddReport) -> dict[str, str]:
        """sha256 -> path of the files not already stored (nor repeated in this batch). The bytes are read
        again to decode: holding every file's bytes until then would cost the whole input in memory."""
        hashed: dict[str, str] = {}
        for path in files:
            try:
                sha = file_sha256(path)
            except ImageError as exc:
                if os.path.abspath(path) in explicit:
                    raise
                report.skipped.append((path, str(exc).split(": ", 1)[-1]))
                continue
            if sha in hashed:
                report.skipped.append((path, f"same image as {hashed[sha]}"))
                continue
            hashed[sha] = path
        for sha, row in self.index.catalog.known_hashes(list(hashed)).items():
            report.skipped.append((hashed.pop(sha), f"already in the index ({row['role']}: {row['path']})"))
        return hashed

    def _embed_new(self, todo: list[tuple[str, str]], held: set[str], explicit: set[str], report: AddReport,
                   spool: VectorSpool, progress: Progress | None,
                   embedding: "ImageEmbedding") -> tuple[list[NewReference], list[dict]]:
        """Read and embed `todo` ((path, sha256) pairs) through `embedding` (the held-out ones only read) and
        append the references' vectors to `spool`. Returns the references' catalog data (in spool order)
        and the held-out images' rows. Unreadable files named explicitly raise; others are skipped."""
        new_refs: list[NewReference] = []
        new_held: list[dict] = []
        work = [WorkItem(path, sha, sha not in held) for path, sha in todo]
        for i, (item, result) in enumerate(embedding(work)):
            if progress:
                progress("embedding", i, len(todo))
            if isinstance(result, BaseException):
                if not isinstance(result, ImageError) or os.path.abspath(item.path) in explicit:
                    raise result
                report.skipped.append((item.path, str(result).split(": ", 1)[-1]))
                continue
            row = dict(path=os.path.abspath(item.path), sha256=item.sha256, width=result.width,
                       height=result.height, added_at=time.time())
            if not item.embed:
                new_held.append(row)
                report.held_out.append(item.path)
                continue
            spool.append(result.vectors)
            new_refs.append(NewReference(row, result.boxes, result.table, result.pooled))
            report.added.append(item.path)
        return new_refs, new_held

    def _write(self, new_refs: list[NewReference], new_held: list[dict], spool: VectorSpool,
               sampler: KeepAll, recalibrate: bool) -> tuple[int, int, str | None]:
        """One transaction: catalog rows, then the bank grown from the spool (block by block), then the
        next generation's files and its calibration; its commit makes the add take effect.
        Returns (vectors added, generation, a note on the calibration or None)."""
        catalog, config = self.index.catalog, self.index.config
        base = self.index.banks.view()
        if not new_refs and not new_held:
            return 0, base.generation, None
        n_new = len(spool)
        keep = np.zeros(n_new, dtype=bool)
        if n_new:
            # Each new vector's distance to the bank: new vectors near it are picked last (never re-reads the bank).
            near = None
            if base.patches.ntotal and sampler.uses_existing_distances:
                near = np.concatenate([base.patches.search(block, 1)[0][:, 0] for block in spool.blocks()])
            keep[sampler.select(spool.blocks, n_new, spool.dim, existing_distances=near)] = True
        keep_masks = np.split(keep, np.cumsum([len(r.table) for r in new_refs])[:-1]) if new_refs else []
        first_id = next_id = int(catalog.state()["next_vector_id"])
        generation, note = base.generation, None
        with self.index.banks.transaction(base) as txn:
            catalog.insert_calibration_images(txn.conn, new_held)
            pooled_ids, pooled_vecs = [], []
            for ref, mask in zip(new_refs, keep_masks):
                ids = np.arange(next_id, next_id + int(mask.sum()), dtype=np.int64)
                next_id += len(ids)
                image_id = catalog.insert_reference(txn.conn, ref.row, ref.boxes, np.column_stack([ids, ref.table[mask]]))
                crash_point(f"catalog rows of {ref.row['path']}")
                pooled_ids.append(image_id)
                pooled_vecs.append(ref.pooled)
            n_added = next_id - first_id
            if new_refs:
                def kept_blocks():  # the j-th kept vector got id first_id + j
                    pos, given = 0, first_id
                    for block in spool.blocks():
                        mask = keep[pos:pos + len(block)]
                        pos += len(block)
                        n = int(mask.sum())
                        yield block[mask], np.arange(given, given + n, dtype=np.int64)
                        given += n
                grown(txn, kept_blocks, n_added, config.index_kind, config.nprobe, self.kind_policy)
                txn.images.add(np.stack(pooled_vecs), np.asarray(pooled_ids, dtype=np.int64))
                generation = txn.publish(next_vector_id=next_id)
            elif new_held:  # new calibration images only: the same bank, a fuller calibration
                generation = txn.publish()
            note = self.index.calibrations.after_write(txn, "add", recalibrate)
        return n_added, generation, note

def remove_images(index, refs: Iterable[str], *, recalibrate: bool = True, hold_out: bool = False) -> dict:
    """Remove images by path or sha256 (prefix of >= 8 hex digits): their vectors and rows go together,
    in one bank transaction, with the recalibration (see Calibrator.after_write). `hold_out`: keep the
    reference images among them as calibration images (their vectors leave the bank, their rows stay).
    `index` is the Engine."""
    refs = list(refs)
    catalog = index.catalog
    with index.writer_lock():
        found, missing = catalog.find_images(refs)
        if missing:
            raise BadInput("not in the index: " + ", ".join(missing))
        base = index.banks.view()
        ref_ids = [r["id"] for r in found if r["role"] == "reference"]
        if hold_out and not ref_ids:
            raise BadInput("none of these images is in the bank (they are calibration images already)")
        if hold_out and len(ref_ids) >= base.images.ntotal:
            raise BadInput("holding out every bank image would leave the bank empty; keep at least one")
        vector_ids = np.zeros(0, np.int64)
        generation, note = base.generation, None
        with index.banks.transaction(base) as txn:
            if ref_ids:
                vector_ids = catalog.vector_ids_of(txn.conn, ref_ids)
            if hold_out:
                catalog.make_calibration_images(txn.conn, ref_ids)
            else:
                catalog.delete_images(txn.conn, [r["id"] for r in found])
            if ref_ids:
                removed = txn.patches.remove(vector_ids)
                if removed != len(vector_ids):
                    raise IndexDamaged(f"the FAISS bank held {removed} of the {len(vector_ids)} vectors of these "
                                       "images; the index needs `simsearch index repair`")
                txn.images.remove(np.asarray(ref_ids, dtype=np.int64))
            generation = txn.publish()
            note = index.calibrations.after_write(txn, "remove", recalibrate)
    moved = [r["path"] for r in found if r["id"] in set(ref_ids)] if hold_out else [r["path"] for r in found]
    return {"held_out" if hold_out else "removed": moved, "vectors_removed": int(len(vector_ids)),
            "generation": generation, "calibration": note}
