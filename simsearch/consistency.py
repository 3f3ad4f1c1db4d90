"""Check and repair: the catalog against the FAISS files of its generation, from one diff (`bank_diff`).

`check` changes nothing. It reads the catalog's state in one transaction and the bank files of that
generation; a writer that commits in between (and removes the files `check` was about to read) makes it
read again, so a normal write never shows as damage. `repair` holds the writer lock, deletes stray files,
removes bank ids the catalog does not know and re-embeds what the banks lack from the image files.
"""
from __future__ import annotations

import numpy as np

from .errors import ImageError
from .images import load_image
from .ingest import grown, pooled_vector
from .records import Progress
from .store import bankfiles
from .store.banks import BankView, bank_diff
from .store.vectors import VectorIndex

ATTEMPTS = 5


class Checker:
    """check / repair for one index: `index` is the Engine (folder, catalog, bank store, embedder)."""

    def __init__(self, index):
        self.index = index

    def _load(self, generation: int) -> tuple[BankView | None, str | None]:
        """(the banks of `generation` freshly read from disk, or None with the reason they cannot be)."""
        try:
            banks = bankfiles.load_generation(self.index.directory, generation)
        except (FileNotFoundError, ValueError) as exc:
            return None, str(exc)
        if banks is None:
            return None, None
        return BankView(generation, banks["patches"], banks["images"]), None

    def check(self) -> dict:
        """`ok` is True when every vector id in the catalog is in the bank and vice versa, every reference
        image has its pooled vector, and no stray file is left (files of a writer at work are not strays)."""
        for _attempt in range(ATTEMPTS):
            report = self._check_once()
            if self.index.catalog.state()["generation"] == report["generation"]:
                return report
        return report  # the index kept changing: the last report stands

    def _check_once(self) -> dict:
        snap = self.index.catalog.snapshot()
        generation = snap["generation"]
        problems: list[str] = []
        report = {"index": str(self.index.directory), "generation": generation,
                  "catalog_vectors": len(snap["vector_ids"]), "reference_images": len(snap["reference_ids"]),
                  "bank_vectors": None, "missing_from_bank": 0, "orphans_in_bank": 0, "missing_pooled": 0,
                  "orphan_pooled": 0, "stray_files": [], "problems": problems}
        view, why = self._load(generation)
        if why is not None:
            problems.append(why)
        elif view is None and len(snap["vector_ids"]):
            problems.append(f"no bank files, but the catalog lists {len(snap['vector_ids'])} vectors")
        if view is not None:
            report["bank_vectors"] = view.patches.ntotal
            diff = bank_diff(snap["vector_ids"], snap["reference_ids"], view)
            for key in ("missing_from_bank", "orphans_in_bank", "missing_pooled", "orphan_pooled"):
                report[key] = int(len(diff[key]))
                if len(diff[key]):
                    problems.append(f"{key.replace('_', ' ')}: {len(diff[key])} ids (e.g. {int(diff[key][0])})")
            if len(diff["duplicate_ids"]):
                problems.append(f"the bank holds {len(diff['duplicate_ids'])} duplicate ids")
        if not self.index.folder.writer_active():
            report["stray_files"] = [p.name for p in bankfiles.stray_files(self.index.directory, generation)]
            if report["stray_files"]:
                problems.append(f"{len(report['stray_files'])} stray bank files (left by an interrupted writer)")
        report["ok"] = not problems
        return report

    def repair(self, progress: Progress | None = None) -> dict:
        """Bring the FAISS files back in line with the catalog, which is the source of truth.

        Stray files are deleted; bank ids the catalog does not know are removed; a reference image whose
        vectors or pooled vector are missing (or whose bank file is unreadable) is embedded again from its
        file when that file still has the stored sha256, and dropped from the index otherwise. Returns what
        it did, with a check before and after.
        """
        actions: list[str] = []
        index, catalog = self.index, self.index.catalog
        dim = index.config.feature_dim
        with index.writer_lock(clean=False):
            before = self.check()
            generation = before["generation"]
            removed = bankfiles.remove_stray(index.directory, generation)
            if removed:
                actions.append(f"deleted {len(removed)} stray bank files: {', '.join(p.name for p in removed)}")
            snap = catalog.snapshot()
            view, why = self._load(generation)
            changed = why is not None
            if why is not None:
                actions.append(f"bank files of generation {generation} unusable ({why}): rebuilding from the images")
            if view is None:
                view = BankView(generation, VectorIndex.flat(dim), VectorIndex.flat(dim))
            diff = bank_diff(snap["vector_ids"], snap["reference_ids"], view)
            # `view` was read privately from disk: the transaction may change its banks in place.
            with index.banks.transaction(view) as txn:
                txn.patches, txn.images = view.patches, view.images
                for name, bank, orphans in (("bank vectors", view.patches, diff["orphans_in_bank"]),
                                            ("pooled vectors", view.images, diff["orphan_pooled"])):
                    if len(orphans):
                        bank.remove(orphans)
                        actions.append(f"removed {len(orphans)} {name} that the catalog does not know")
                        changed = True
                dropped, lacking = self._restore(txn, diff, actions, progress)
                if dropped:
                    gone = catalog.vector_ids_of(txn.conn, dropped)
                    catalog.delete_images(txn.conn, dropped)
                    txn.patches.remove(gone)
                    txn.images.remove(np.asarray(dropped, np.int64))
                if changed or dropped or lacking:
                    txn.publish()
        return {"actions": actions, "before": before, "after": self.check()}

    def _restore(self, txn, diff: dict, actions: list[str], progress: Progress | None) -> tuple[list[int], int]:
        """Re-embed the reference images whose vectors the banks lack; -> (ids of images to drop, how many
        lacked something)."""
        catalog = self.index.catalog
        missing, missing_pooled = set(diff["missing_from_bank"].tolist()), set(diff["missing_pooled"].tolist())
        lacking = []
        for row in catalog.images("reference"):
            cells = catalog.image_cells(row["id"])
            gaps = np.fromiter((int(v) in missing for v in cells[:, 0]), bool, len(cells))
            if gaps.any() or row["id"] in missing_pooled:
                lacking.append((row, cells[gaps]))
        dropped, vectors, ids = [], [], []
        for i, (row, cells) in enumerate(lacking):
            if progress:
                progress("re-embedding", i, len(lacking))
            try:
                img = load_image(row["path"])
                why = "its file has changed since it was added"
            except ImageError as exc:
                img, why = None, str(exc)
            if img is None or img.sha256 != row["sha256"]:
                dropped.append(row["id"])
                actions.append(f"dropped {row['path']} from the index: {why}")
                continue
            grid = self.index.embedder.embed(img)
            vectors.append(grid.features[cells[:, 1], cells[:, 2]])
            ids.append(cells[:, 0])
            if row["id"] in missing_pooled:
                txn.images.add(pooled_vector(grid)[None, :], np.asarray([row["id"]], np.int64))
            actions.append(f"re-embedded {row['path']} ({len(cells)} vectors restored)")
        if progress and lacking:
            progress("re-embedding", len(lacking), len(lacking))
        if ids:
            vectors, ids = np.concatenate(vectors), np.concatenate(ids)
            config = self.index.config
            grown(txn, lambda: [(vectors, ids)], len(ids), config.index_kind, config.nprobe,
                  self.index.ingest.kind_policy)
        return dropped, len(lacking)
