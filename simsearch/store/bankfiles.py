"""The index's FAISS files, named by the bank generation they hold.

The SQLite catalog is the source of truth and carries the bank generation; its commit is the one
moment an `add` or `remove` takes effect. A writer first writes the FAISS files of the next
generation (`patches.g000008.faiss`, `images.g000008.faiss`: temporary name, fsync, rename, fsync of
the folder), then commits the catalog at that generation, then deletes older generations' files.
Killed before the commit, the catalog still names the old generation, whose files are untouched, and
the new files are strays the next writer deletes; killed after it, the new files are complete.
Readers load the files of the generation they read from the catalog and never delete anything.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..faults import crash_point
from .vectors import VectorIndex

BANKS = ("patches", "images")  # patch vectors (the PatchCore bank) and one pooled vector per image
_NAME = re.compile(r"^(patches|images)(?:\.g(\d+))?\.faiss(\.tmp)?$")


def bank_path(directory: Path, bank: str, generation: int) -> Path:
    return Path(directory) / f"{bank}.g{generation:06d}.faiss"


def legacy_path(directory: Path, bank: str) -> Path:
    """Before generation-named files (simsearch 0.1 indexes): one file per bank, replaced in place."""
    return Path(directory) / f"{bank}.faiss"


def existing_path(directory: Path, bank: str, generation: int) -> Path | None:
    for path in (bank_path(directory, bank, generation), legacy_path(directory, bank)):
        if path.is_file():
            return path
    return None


def load_generation(directory: Path, generation: int) -> dict[str, VectorIndex] | None:
    """Both banks of `generation`; None when the index has never been written (generation 0, no files).

    Raises FileNotFoundError when a file is missing (a newer writer may just have replaced it: re-read
    the generation and retry) and ValueError when a file is not a readable FAISS index.
    """
    paths = {bank: existing_path(directory, bank, generation) for bank in BANKS}
    if generation == 0 and all(p is None for p in paths.values()):
        return None
    missing = [bank_path(directory, b, generation).name for b, p in paths.items() if p is None]
    if missing:
        raise FileNotFoundError(f"{directory}: missing {', '.join(missing)} for bank generation {generation}")
    return {bank: VectorIndex.load(path) for bank, path in paths.items()}


def write_generation(directory: Path, generation: int, banks: dict[str, VectorIndex]) -> None:
    """Write every bank of `generation` durably; nothing refers to these files until the catalog commits."""
    for bank in BANKS:
        banks[bank].save(bank_path(directory, bank, generation))
        crash_point(f"wrote {bank} generation {generation}")


def stray_files(directory: Path, generation: int) -> list[Path]:
    """Bank files that the catalog's `generation` does not use: older, uncommitted or half-written ones."""
    directory = Path(directory)
    current = {bank_path(directory, b, generation).name for b in BANKS}
    uses_legacy = any(existing_path(directory, b, generation) == legacy_path(directory, b) for b in BANKS)
    out = []
    for path in sorted(directory.iterdir()):
        m = _NAME.match(path.name)
        if not m or path.name in current:
            continue
        if m.group(2) is None and not m.group(3) and uses_legacy:
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
