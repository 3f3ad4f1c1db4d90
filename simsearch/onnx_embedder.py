"""The ONNX Runtime embedder: the same tiles as the torch one (simsearch/embedding.py), the network run by
onnxruntime from the index's stored ONNX file. Needs neither torch nor timm.

An index keeps its ONNX model in `weights/` as `embedder-<sha256 prefix>.onnx`, described by
`weights/embedder.onnx.json` (written last, so it always names a complete file): the file's sha256, the
index fingerprint it was exported for, the largest difference from torch measured at export, and versions.
Loading checks the hash and the fingerprint before the model answers anything.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .config import IndexConfig
from .embedding import TileEmbedder
from .errors import EmbedderMismatch, IndexDamaged
from .images import file_sha256

SIDECAR = Path("weights") / "embedder.onnx.json"
INPUT, OUTPUT = "tiles", "patches"  # (B, h, w, 3) float32 RGB in 0..255 -> (B, h/stride, w/stride, D) float32


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def read_sidecar(directory: Path) -> dict | None:
    """The index's ONNX description, or None when it has no ONNX model yet."""
    path = Path(directory) / SIDECAR
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise IndexDamaged(f"{path}: unreadable ({exc})") from None


class OnnxEmbedder(TileEmbedder):
    runtime = "onnxruntime"

    def __init__(self, config: IndexConfig, model_file: Path, threads: int | None = None):
        import onnxruntime as ort

        from .runtime import configure_threads

        options = ort.SessionOptions()
        options.intra_op_num_threads = configure_threads(threads)  # the same count for faiss
        options.inter_op_num_threads = 1
        # Idle workers sleep rather than spin after a run: faiss's search follows every forward in a query, and
        # spinning workers held both cores from it (docs/benchmarks.md, "Where a query's time goes").
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.config = config
        self.model_file = Path(model_file)
        self.session = ort.InferenceSession(str(self.model_file), options, providers=["CPUExecutionProvider"])
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        if INPUT not in inputs or OUTPUT not in outputs or len(outputs[OUTPUT]) != 4:
            raise EmbedderMismatch(f"{self.model_file}: expected input {INPUT!r} and a 4-d output {OUTPUT!r}, "
                                   f"found inputs {sorted(inputs)} and outputs {sorted(outputs)}")
        dim = outputs[OUTPUT][-1]  # an int, or a symbolic name where the exporter left it open
        if isinstance(dim, int) and dim != config.feature_dim:
            raise EmbedderMismatch(f"{self.model_file} gives {dim}-dim vectors, the index holds {config.feature_dim}")

    @classmethod
    def for_index(cls, directory: Path, config: IndexConfig) -> "OnnxEmbedder | None":
        """The index's stored ONNX embedder, checked (hash, fingerprint); None when it has none."""
        sidecar = read_sidecar(directory)
        if sidecar is None:
            return None
        model_file = Path(directory) / "weights" / sidecar.get("file", "")
        if not model_file.is_file():
            raise IndexDamaged(f"{model_file}: the index's ONNX model is missing (see {SIDECAR})")
        if file_sha256(model_file) != sidecar.get("sha256"):
            raise IndexDamaged(f"{model_file}: does not match the sha256 in {SIDECAR} (damaged or replaced)")
        if sidecar.get("fingerprint") != config.fingerprint:
            raise EmbedderMismatch(f"{model_file} was exported for fingerprint {sidecar.get('fingerprint')}, the "
                                   f"index has {config.fingerprint}")
        for name, sha in sidecar.get("sources", {}).items():  # the weights / head files it was made from
            source = Path(directory) / name
            if not source.is_file():
                raise IndexDamaged(f"{source}: the index's {'head' if name == config.head else 'weights'} file "
                                   "is missing")
            if file_sha256(source) != sha:
                what = "head" if name == config.head else "weights"
                raise EmbedderMismatch(f"{source} is not the {what} this index was built with (its ONNX model was "
                                       "exported from another file)")
        return cls(config, model_file)

    @property
    def dim(self) -> int:
        return self.config.feature_dim

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        """(B, h, w, 3) uint8 RGB tiles of one shape -> (B, h/stride, w/stride, D) float32, one session run."""
        x = np.ascontiguousarray(batch, dtype=np.float32)
        out = self.session.run([OUTPUT], {INPUT: x})[0]
        if out.shape[-1] != self.config.feature_dim:
            raise EmbedderMismatch(f"{self.model_file} gives {out.shape[-1]}-dim vectors, the index holds "
                                   f"{self.config.feature_dim}")
        return out


def write_model(directory: Path, model_bytes: bytes, description: dict) -> Path:
    """Store `model_bytes` as the index's ONNX model (named by its hash) and its sidecar, each written under a
    temporary name and renamed; the sidecar last, so it never names a file that is not complete."""
    sha = hashlib.sha256(model_bytes).hexdigest()
    folder = Path(directory) / "weights"
    folder.mkdir(exist_ok=True)
    model = folder / f"embedder-{sha[:16]}.onnx"
    if not model.is_file():
        tmp = model.with_name(model.name + f".{os.getpid()}.tmp")
        tmp.write_bytes(model_bytes)
        os.replace(tmp, model)
    sidecar = Path(directory) / SIDECAR
    tmp = sidecar.with_name(sidecar.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**description, "file": model.name, "sha256": sha}, indent=1, sort_keys=True))
    os.replace(tmp, sidecar)
    return model
