"""The index's FAISS files, named by the bank generation they hold.

The SQLite catalog is the source of truth and carries the bank generation; its commit is the one
moment an `add` or `remove` takes effect. A writer first writes the FAISS files of the next
generation (`patches.g000008.faiss`, `images.g000008.faiss`: temporary name, fsync, rename, fsync of
the folder), then commits the catalog at that generation, then deletes older generations' files.
Killed before the commit, the catalog still names the old generation, whose files are untouched, and
the new files are strays the next writer deletes; killed after it, the new files are complete.
Readers load the files of the generation they read from the catalog and never delete anything.

The commit also records each file's size, sha256 and vector count (`write_generation`'s records, in
the catalog's bank_files). Every load checks all three against the record before a file is trusted
(a file overwritten in part, truncated, or swapped for another index's of the same dimension is
refused, not searched); hashing costs about a second per GB, once per generation and process. An
index written before the records were kept has none: its files load unchecked until its next write.

A generation searched in two stages also has its spread table (`spreads.g000008.safetensors`, store/spreads.py),
written, recorded and checked the same way; one without a record (small banks, older indexes) has none.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from ..faults import crash_point
from .spreads import SpreadTable
from .vectors import VectorIndex

BANKS = ("patches", "images")  # patch vectors (the PatchCore bank) and one pooled vector per image
SPREADS = "spreads"  # the patch bank's spread table, where the generation has one
_NAME = re.compile(r"^(?:(patches|images)(?:\.g(\d+))?\.faiss|spreads\.g(\d+)\.safetensors)(\.tmp)?$")


def bank_path(directory: Path, bank: str, generation: int) -> Path:
    return Path(directory) / f"{bank}.g{generation:06d}.faiss"


def spreads_path(directory: Path, generation: int) -> Path:
    return Path(directory) / f"{SPREADS}.g{generation:06d}.safetensors"


def legacy_path(directory: Path, bank: str) -> Path:
    """Before generation-named files (simsearch 0.1 indexes): one file per bank, replaced in place."""
    return Path(directory) / f"{bank}.faiss"


def existing_path(directory: Path, bank: str, generation: int) -> Path | None:
    for path in (bank_path(directory, bank, generation), legacy_path(directory, bank)):
        if path.is_file():
            return path
    return None


def file_record(path: Path, vectors: int) -> dict:
    """What the catalog records of a bank file: {bytes, sha256, vectors}."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": digest.hexdigest(), "vectors": int(vectors)}


def _check_record(path: Path, generation: int, record: dict) -> None:
    found = file_record(path, record["vectors"])  # a file deleted meanwhile raises FileNotFoundError
    for key in ("bytes", "sha256"):
        if found[key] != record[key]:
            raise ValueError(f"{path}: {key} {found[key]}, but the catalog recorded {record[key]} when generation "
                             f"{generation} was committed: the file was damaged or replaced")


def load_bank(directory: Path, bank: str, generation: int, record: dict | None) -> VectorIndex:
    """One bank of `generation`, checked against its `record` (None: an index from before records: unchecked).

    Raises FileNotFoundError when the file is missing (a newer writer may just have replaced it: re-read the
    generation and retry) and ValueError when it is not the file the catalog committed, or not readable."""
    path = existing_path(directory, bank, generation)
    if path is None:
        raise FileNotFoundError(f"{directory}: missing {bank_path(directory, bank, generation).name} for bank "
                                f"generation {generation}")
    if record is not None:
        _check_record(path, generation, record)
    index = VectorIndex.load(path)
    if record is not None and index.ntotal != record["vectors"]:
        raise ValueError(f"{path}: holds {index.ntotal} vectors, the catalog recorded {record['vectors']}")
    return index


def load_spreads(directory: Path, generation: int, record: dict | None) -> SpreadTable | None:
    """The spread table of `generation` when the catalog recorded one (None otherwise), checked against the record;
    raises as `load_bank`."""
    if record is None:
        return None
    path = spreads_path(directory, generation)
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: missing {path.name} for bank generation {generation}")
    _check_record(path, generation, record)
    table = SpreadTable.load(path)
    if len(table) != record["vectors"]:
        raise ValueError(f"{path}: holds {len(table)} spreads, the catalog recorded {record['vectors']}")
    return table


def load_generation(directory: Path, generation: int, records: dict[str, dict] | None = None) -> dict | None:
    """Both banks of `generation` and its spread table (key SPREADS, None without one), each checked against its
    record (`records`: name -> record, as the catalog keeps them); None when the index has never been written
    (generation 0, no files). Raises as `load_bank`."""
    records = records or {}
    if generation == 0 and all(existing_path(directory, b, generation) is None for b in BANKS):
        return None
    out: dict = {bank: load_bank(directory, bank, generation, records.get(bank)) for bank in BANKS}
    out[SPREADS] = load_spreads(directory, generation, records.get(SPREADS))
    return out


def write_generation(directory: Path, generation: int, banks: dict[str, VectorIndex],
                     spreads: SpreadTable | None = None) -> dict[str, dict]:
    """Write every bank of `generation` (and its spread table, if given) durably; nothing refers to these files
    until the catalog commits. Returns name -> its record ({bytes, sha256, vectors}), for the catalog to keep
    in the same commit."""
    records = {}
    for bank in BANKS:
        path = bank_path(directory, bank, generation)
        banks[bank].save(path)
        crash_point(f"wrote {bank} generation {generation}")
        records[bank] = file_record(path, banks[bank].ntotal)
    if spreads is not None:
        path = spreads_path(directory, generation)
        spreads.save(path)
        crash_point(f"wrote {SPREADS} generation {generation}")
        records[SPREADS] = file_record(path, len(spreads))
    return records


def stray_files(directory: Path, generation: int) -> list[Path]:
    """Bank files that the catalog's `generation` does not use: older, uncommitted or half-written ones."""
    directory = Path(directory)
    current = {bank_path(directory, b, generation).name for b in BANKS} | {spreads_path(directory, generation).name}
    uses_legacy = any(existing_path(directory, b, generation) == legacy_path(directory, b) for b in BANKS)
    out = []
    for path in sorted(directory.iterdir()):
        m = _NAME.match(path.name)
        if not m or path.name in current:
            continue
        if m.group(1) and m.group(2) is None and not m.group(4) and uses_legacy:
            continue  # the legacy file is the current one
        out.append(path)
    return out


def remove_stray(directory: Path, generation: int) -> list[Path]:
    """Delete stray bank files (only under the writer lock: a running writer's new files are strays too)."""
    removed = []
    for path in stray_files(directory, generation):
        path.unlink(missing_ok=True)
        removed.append(path)
        crash_point(f"removed {path.name}")
    return removed
