"""Check and repair: the catalog against the FAISS files of its generation, from one diff (`bank_diff`).

`check` changes nothing. It runs SQLite's quick_check over the catalog (a damaged catalog is a
CatalogError: repair cannot rebuild the source of truth), reads the catalog's state in one transaction
and the bank files of that generation, each checked against the size, sha256 and vector count recorded
at its commit; a writer that commits in between (and removes the files `check` was about to read) makes
it read again, so a normal write never shows as damage. `repair` holds the writer lock, deletes stray
files, removes bank ids the catalog does not know and restores what the banks lack: a bank file that
is missing or not the one committed is rebuilt (the other one, if sound, is kept), patch vectors are
embedded again from the image files, pooled vectors are taken from the bank when it holds all of an
image's vectors exactly. When the patch bank comes out as it was, the calibration is carried over.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import CatalogError, ImageError
from .images import load_image
from .ingest import grown, pooled_vector
from .records import Progress
from .store import bankfiles
from .store.banks import BankView, bank_diff
from .store.twostage import unit_mean
from .store.vectors import VectorIndex
from .tiling import scaled_size

ATTEMPTS = 5


class Checker:
    """check / repair for one index: `index` is the Engine (folder, catalog, bank store, embedder)."""

    def __init__(self, index):
        self.index = index

    def _load(self, generation: int, records: dict) -> tuple[dict[str, VectorIndex | None], dict[str, str]]:
        """Each bank of `generation` freshly read from disk and checked against its record, or None with the
        reason it cannot be used (all None and no reasons: an index never written), and its spread table
        (key SPREADS) where it has a sound one."""
        banks: dict[str, VectorIndex | None] = dict.fromkeys(bankfiles.BANKS)
        why: dict[str, str] = {}
        if generation == 0 and all(bankfiles.existing_path(self.index.directory, b, 0) is None for b in banks):
            return banks, why
        for bank in bankfiles.BANKS:
            try:
                banks[bank] = bankfiles.load_bank(self.index.directory, bank, generation, records.get(bank))
            except (FileNotFoundError, ValueError) as exc:
                why[bank] = str(exc)
        try:
            spreads = bankfiles.load_spreads(self.index.directory, generation, records.get(bankfiles.SPREADS))
        except (FileNotFoundError, ValueError) as exc:
            why[bankfiles.SPREADS] = str(exc)
        else:
            if spreads is not None and banks["patches"] is not None and not spreads.matches(banks["patches"]):
                why[bankfiles.SPREADS] = (f"the spread table of generation {generation} does not hold the patch bank's "
                                          "ids")
            else:
                banks[bankfiles.SPREADS] = spreads  # sound: repair's next generation starts from it
        return banks, why

    def check(self) -> dict:
        """`ok` is True when the bank files are the ones committed, every vector id in the catalog is in the
        bank and vice versa, every reference image has its pooled vector, and no stray file is left (files of
        a writer at work are not strays). Raises CatalogError when SQLite finds the catalog damaged."""
        damage = self.index.catalog.quick_check()
        if damage:
            raise CatalogError(f"{self.index.catalog.path}: the catalog is damaged (SQLite quick_check: "
                               f"{'; '.join(damage)[:300]}); `simsearch index repair` cannot rebuild it: restore "
                               "it from a backup, or build the index again in a new folder")
        for _attempt in range(ATTEMPTS):
            report = self._check_once()
            if self.index.catalog.state()["generation"] == report["generation"]:
                return report
        return report  # the index kept changing: the last report stands

    def _check_once(self) -> dict:
        snap = self.index.catalog.snapshot()
        generation, records = snap["generation"], snap["bank_files"]
        problems: list[str] = []
        report = {"index": str(self.index.directory), "generation": generation, "catalog": "ok",
                  "catalog_vectors": len(snap["vector_ids"]), "reference_images": len(snap["reference_ids"]),
                  "bank_vectors": None, "bank_files_recorded": sorted(records), "missing_from_bank": 0,
                  "orphans_in_bank": 0, "missing_pooled": 0, "orphan_pooled": 0, "stray_files": [],
                  "problems": problems, "notes": []}
        banks, why = self._load(generation, records)
        problems += why.values()
        if banks["patches"] is None and not why and len(snap["vector_ids"]):
            problems.append(f"no bank files, but the catalog lists {len(snap['vector_ids'])} vectors")
        if generation and not records and not why:
            report["notes"].append(f"no sizes or checksums recorded for generation {generation} (written by an older "
                                   "simsearch): the files were loaded unchecked; the next write records them")
        if banks["patches"] is not None:
            report["bank_vectors"] = banks["patches"].ntotal
        if not why and banks["patches"] is not None:
            diff = bank_diff(snap["vector_ids"], snap["reference_ids"],
                             BankView(generation, banks["patches"], banks["images"]))
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

        Stray files are deleted; bank ids the catalog does not know are removed; a bank file that is missing or
        not the one committed is rebuilt. A reference image whose patch vectors are missing is embedded again
        from its file when that file still has the stored sha256, and dropped from the index otherwise; one
        that lacks only its pooled vector keeps its place (see `_restore`). Returns what it did, with a check
        before and after.
        """
        actions: list[str] = []
        index, catalog = self.index, self.index.catalog
        dim = index.config.feature_dim
        with index.writer_lock(clean=False):
            before = self.check()
            snap = catalog.snapshot()
            generation = snap["generation"]
            removed = bankfiles.remove_stray(index.directory, generation)
            if removed:
                actions.append(f"deleted {len(removed)} stray bank files: {', '.join(p.name for p in removed)}")
            banks, why = self._load(generation, snap["bank_files"])
            for bank, reason in why.items():
                actions.append(f"{bank} bank of generation {generation} unusable ({reason}): rebuilding it")
            view = BankView(generation, *(banks[b] or VectorIndex.flat(dim) for b in ("patches", "images")),
                            banks.get(bankfiles.SPREADS))
            diff = bank_diff(snap["vector_ids"], snap["reference_ids"], view)
            # `view` was read privately from disk: the transaction may change its banks in place.
            with index.banks.transaction(view) as txn:
                txn.patches, txn.images = view.patches, view.images
                changed = {bank: bank in why for bank in (*bankfiles.BANKS, bankfiles.SPREADS)}
                for bank, name, orphans in (("patches", "bank vectors", diff["orphans_in_bank"]),
                                            ("images", "pooled vectors", diff["orphan_pooled"])):
                    if len(orphans):
                        getattr(view, bank).remove(orphans)
                        actions.append(f"removed {len(orphans)} {name} that the catalog does not know")
                        changed[bank] = True
                dropped = self._restore(txn, diff, actions, changed, progress)
                if dropped:
                    gone = catalog.vector_ids_of(txn.conn, dropped)
                    catalog.delete_images(txn.conn, dropped)
                    txn.patches.remove(gone)
                    txn.images.remove(np.asarray(dropped, np.int64))
                    changed["patches"] = True
                if any(changed.values()):
                    new = txn.publish()
                    if not changed["patches"]:  # the same patch bank scores the same: the thresholds still hold
                        catalog.carry_calibration(txn.conn, generation, new, f"carried over to generation {new} by "
                                                  "repair (the patch bank was unchanged)")
        return {"actions": actions, "before": before, "after": self.check()}

    def _restore(self, txn, diff: dict, actions: list[str], changed: dict, progress: Progress | None) -> list[int]:
        """Give back what the banks lack: patch vectors by embedding the image again (an image whose file is
        gone or changed is dropped: the ids of those are returned), and pooled vectors from the bank when it
        holds every vector of the image exactly (no re-embedding), else from the file, else approximately from
        the image's vectors in the bank (never dropped for a pooled vector alone)."""
        catalog, config = self.index.catalog, self.index.config
        missing, missing_pooled = set(diff["missing_from_bank"].tolist()), set(diff["missing_pooled"].tolist())
        lacking = []
        for row in catalog.images("reference"):
            cells = catalog.image_cells(row["id"])
            gaps = np.fromiter((int(v) in missing for v in cells[:, 0]), bool, len(cells))
            if gaps.any() or row["id"] in missing_pooled:
                lacking.append((row, cells, gaps))
        dropped, vectors, ids = [], [], []
        for i, (row, cells, gaps) in enumerate(lacking):
            if progress:
                progress("restoring", i, len(lacking))
            pooled = None
            if not gaps.any():  # only the pooled vector is missing
                changed["images"] = True
                pooled, how = self._pooled_from_bank(txn.patches, row, cells)
                if pooled is not None:
                    txn.images.add(pooled[None, :], np.asarray([row["id"]], np.int64))
                    actions.append(f"pooled vector of {row['path']} {how}")
                    continue
            try:
                img = load_image(row["path"])
                why = "its file has changed since it was added"
            except ImageError as exc:
                img, why = None, str(exc)
            if img is None or img.sha256 != row["sha256"]:
                if gaps.any():
                    dropped.append(row["id"])
                    actions.append(f"dropped {row['path']} from the index: {why}")
                else:
                    pooled = self._pooled_from_bank(txn.patches, row, cells, exact=False)[0]
                    txn.images.add(pooled[None, :], np.asarray([row["id"]], np.int64))
                    actions.append(f"pooled vector of {row['path']} approximated from its {len(cells)} bank vectors "
                                   f"({why})")
                continue
            grid = self.index.embedder.embed(img)
            if gaps.any():
                vectors.append(grid.features[cells[gaps, 1], cells[gaps, 2]])
                ids.append(cells[gaps, 0])
                changed["patches"] = True
            if row["id"] in missing_pooled:
                txn.images.add(pooled_vector(grid)[None, :], np.asarray([row["id"]], np.int64))
                changed["images"] = True
            actions.append(f"re-embedded {row['path']} ({int(gaps.sum())} vectors restored)")
        if progress and lacking:
            progress("restoring", len(lacking), len(lacking))
        if ids:
            vectors, ids = np.concatenate(vectors), np.concatenate(ids)
            grown(txn, lambda: [(vectors, ids)], len(ids), config.index_kind, config.nprobe,
                  self.index.ingest.kind_policy)
        return dropped

    def _pooled_from_bank(self, bank: VectorIndex, row: dict, cells: np.ndarray, exact: bool = True):
        """(the image's pooled vector from its vectors in `bank`, how it was got), or (None, None) when `exact`
        and the bank cannot give it exactly: a lossy bank, or a coreset that kept only some of its cells."""
        config = self.index.config
        h, w = scaled_size(row["height"], row["width"], config.scale_for(row["height"], row["width"]))
        every_cell = len(cells) == math.ceil(h / config.patch_stride) * math.ceil(w / config.patch_stride)
        if exact and (bank.lossy or not every_cell):
            return None, None
        order = np.lexsort((cells[:, 2], cells[:, 1]))  # row-major, as the embedder's grid: the same float sums
        return unit_mean(bank.reconstruct(cells[order, 0])), "taken from the patch bank"
