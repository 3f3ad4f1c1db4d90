"""Bundles: a self-contained, checksummed copy of an index for a line PC without torch.

    simsearch export --index IDX --out BUNDLE      # on the workstation (the full install)
    simsearch bundle verify BUNDLE                 # anywhere
    simsearch query PART.png --index BUNDLE        # on the line PC (`pip install .`: ONNX Runtime, no torch)

A bundle is an index folder (catalog, the current generation's bank files, weights/ with the ONNX model and
its description) plus `manifest.json`: every file's sha256 and size, the fingerprint, the generation, the
versions it was made with. Opening a bundle verifies it, and a changed, missing or unexpected file is refused
with the file named, before any verdict. A write on a bundle (`index add`, `calibrate`, ...) seals it again
under the writer lock, so it stays verifiable.
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from pathlib import Path

from .errors import BadInput, IndexDamaged
from .images import file_sha256
from .store import bankfiles
from .store.layout import DB
from .version import __version__

MANIFEST = "manifest.json"
FORMAT = 1


class BundleError(IndexDamaged):
    """A bundle that does not match its manifest, or whose manifest cannot be used."""


def is_bundle(directory: str | os.PathLike) -> bool:
    return (Path(directory) / MANIFEST).is_file()


def _files(directory: Path, generation: int) -> list[str]:
    """What a bundle holds, relative to it: the catalog, the generation's bank files, weights/."""
    names = [DB]
    for bank in bankfiles.BANKS:
        path = bankfiles.existing_path(directory, bank, generation)
        if path is not None:
            names.append(path.name)
    spreads = bankfiles.spreads_path(directory, generation)
    if spreads.is_file():
        names.append(spreads.name)
    weights = directory / "weights"
    if weights.is_dir():
        names += sorted(str(p.relative_to(directory)) for p in weights.rglob("*")
                        if p.is_file() and not p.name.endswith(".tmp"))
    return names


def _versions() -> dict:
    import faiss
    import numpy

    out = {"simsearch": __version__, "faiss": faiss.__version__, "numpy": numpy.__version__}
    try:
        import onnxruntime
        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return out


def seal(directory: Path, fingerprint: str, generation: int) -> dict:
    """Write `manifest.json` for the bundle's files as they are now (temporary name, then renamed)."""
    directory = Path(directory)
    files = {name: {"sha256": file_sha256(directory / name), "bytes": (directory / name).stat().st_size}
             for name in _files(directory, generation)}
    manifest = {"format": FORMAT, "fingerprint": fingerprint, "generation": generation, "files": files,
                "versions": _versions(), "sealed_at": time.time()}
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, directory / MANIFEST)
    return manifest


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise BadInput(f"{directory}: not a bundle (no {MANIFEST}); `simsearch export` makes one from an index")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: unreadable ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise BundleError(f"{path}: not a simsearch bundle manifest")
    if manifest.get("format", 0) > FORMAT:
        raise BundleError(f"{path}: bundle format {manifest['format']} is from a newer simsearch (this one reads "
                          f"{FORMAT}); upgrade simsearch to open it")
    return manifest


def verify(directory: str | os.PathLike) -> dict:
    """Check every file against the manifest; raise BundleError naming the first that differs. Returns the
    manifest. Files a bundle holds but its manifest does not list (bank files, weights) are refused too."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    for name, expected in sorted(manifest["files"].items()):
        path = directory / name
        if not path.is_file():
            raise BundleError(f"{path}: missing from the bundle (its manifest lists it)")
        if path.stat().st_size != expected.get("bytes") or file_sha256(path) != expected.get("sha256"):
            raise BundleError(f"{path}: changed since the bundle was sealed (sha256 differs from its manifest)")
    extra = sorted(set(_files(directory, manifest.get("generation", 0))) - set(manifest["files"]))
    if extra:
        raise BundleError(f"{directory / extra[0]}: not in the bundle's manifest (added after it was sealed)")
    return manifest


def export(engine, out: str | os.PathLike) -> dict:
    """Copy `engine`'s index into a new bundle folder `out` and seal it. The index must have an ONNX model
    (made here if it has none and torch can export it). Returns the manifest."""
    from .onnx_embedder import OnnxEmbedder

    out = Path(out)
    if out.exists():
        raise BadInput(f"{out} already exists; a bundle is written to a new folder")
    if not isinstance(engine.embedder, OnnxEmbedder):
        raise BadInput(f"{engine.directory}: its embedder ({engine.config.backbone}) has no ONNX model, which a "
                       "bundle needs (is onnxruntime installed? SIMSEARCH_RUNTIME=torch?)")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        with engine.writer_lock():  # no write moves the generation while it is copied
            generation = engine.generation
            source = sqlite3.connect(str(engine.folder.db_path))
            target = sqlite3.connect(str(partial / DB))
            with target:
                source.backup(target)  # a consistent copy, the WAL's pages included
            source.close()
            target.execute("PRAGMA journal_mode=DELETE")  # a bundle's catalog is one file (store/catalog.py)
            target.close()
            for name in _files(engine.directory, generation)[1:]:
                (partial / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(engine.directory / name, partial / name)
            manifest = seal(partial, engine.config.fingerprint, generation)
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return manifest
