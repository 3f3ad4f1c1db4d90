"""Export a torch Embedder's network (normalisation, the backbone's feature stages, `patch_features`, the
fine-tuned head) to ONNX, check it against torch, and store it in the index (simsearch/onnx_embedder.py).

The graph takes (B, h, w, 3) float32 RGB tiles in 0..255 with batch, height and width dynamic and gives
(B, h/stride, w/stride, D) float32 patch vectors: exactly what `Embedder._forward` computes. The export is
checked on tiles of the shapes the index cuts (a full tile and a small image's); a model whose outputs
differ from torch's by more than TOLERANCE (relative to the largest activation) is not stored.
"""
from __future__ import annotations

import io
import platform
import warnings
from pathlib import Path

import numpy as np
import torch

from .features import Embedder, patch_features
from .images import file_sha256
from .onnx_embedder import INPUT, OUTPUT, OnnxEmbedder, write_model

TOLERANCE = 1e-4  # largest |onnx - torch|, as a share of the largest |torch| activation


class _Graph(torch.nn.Module):
    """Embedder._forward as one module (what is exported)."""

    def __init__(self, embedder: Embedder, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.head = embedder.head
        self.neighbourhood, self.dims = embedder.config.neighbourhood, embedder.config.dims
        self.register_buffer("mean", embedder._mean.clone())
        self.register_buffer("std", embedder._std.clone())

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        x = (tiles.permute(0, 3, 1, 2) - self.mean) / self.std
        feats = patch_features(list(self.model(x)), self.neighbourhood, self.dims)
        return self.head(feats) if self.head is not None else feats


def exportable_model(embedder: Embedder) -> torch.nn.Module:
    """The embedder's backbone rebuilt with timm's `exportable=True` (static, traceable padding), same weights."""
    import timm

    config = embedder.config
    model = timm.create_model(config.backbone, pretrained=False, features_only=True, out_indices=config.layers,
                              exportable=True)
    model.load_state_dict(embedder.backbone.model.state_dict(), strict=True)
    return model.eval()


def check_shapes(embedder: Embedder) -> list[tuple[int, int]]:
    """Tile shapes the export is checked on: a full tile and a small image's smaller one (tiles are multiples
    of 32, at most the tile size; tiling.plan_tiles)."""
    size = embedder.config.tile_size
    return [(size, size), (min(64, size), min(96, size))]


def export(embedder: Embedder, directory: Path) -> dict:
    """Export, check against torch and store the index's ONNX model; returns its description (the sidecar)."""
    graph = _Graph(embedder, exportable_model(embedder)).eval()
    shapes = check_shapes(embedder)
    example = torch.rand(2, *shapes[0], 3) * 255
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # the tracer's notes on shape-dependent Python branches, checked below
        torch.onnx.export(graph, (example,), buffer, input_names=[INPUT], output_names=[OUTPUT], dynamo=False,
                          dynamic_axes={INPUT: {0: "batch", 1: "height", 2: "width"},
                                        OUTPUT: {0: "batch", 1: "rows", 2: "cols"}})
    model_bytes = buffer.getvalue()
    import onnxruntime as ort
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    worst, largest = 0.0, 0.0
    rng = np.random.default_rng(0)
    for h, w in shapes:
        tiles = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
        ref = embedder._forward(tiles)
        out = session.run([OUTPUT], {INPUT: tiles.astype(np.float32)})[0]
        if out.shape != ref.shape:
            raise ExportMismatch(f"the ONNX model gives {out.shape} for tiles {tiles.shape}, torch {ref.shape}")
        worst, largest = max(worst, float(np.abs(out - ref).max())), max(largest, float(np.abs(ref).max()))
    if worst > TOLERANCE * max(largest, 1.0):
        raise ExportMismatch(f"the ONNX model differs from torch by up to {worst:.3g} (activations up to "
                             f"{largest:.3g}); tolerance {TOLERANCE:g} of the largest")
    import onnxruntime
    config = embedder.config
    # The index's own weights and head files it was exported from, by content: a file replaced later is noticed.
    sources = {name: file_sha256(Path(directory) / name) for name in (config.weights, config.head)
               if name and (Path(directory) / name).is_file()}
    description = {"fingerprint": config.fingerprint, "input": INPUT, "output": OUTPUT, "sources": sources,
                   "checked_shapes": [list(s) for s in shapes], "max_abs_diff": worst, "max_abs_activation": largest,
                   "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}
    write_model(directory, model_bytes, description)
    return description


class ExportMismatch(RuntimeError):
    """The exported model does not reproduce torch's vectors: the index keeps the torch embedder."""


def onnx_for(embedder: Embedder, directory: Path, log=None) -> "OnnxEmbedder | Embedder":
    """The index's ONNX embedder, exported from `embedder` now if the index has none; `embedder` itself when
    the network does not export (the reason goes to `log`)."""
    existing = OnnxEmbedder.for_index(directory, embedder.config)
    if existing is not None:
        return existing
    try:
        export(embedder, directory)
    except Exception as exc:  # noqa: BLE001 - any exporter failure: fall back to torch, and say so
        if log is not None:
            log.warning("%s does not export to ONNX (%s: %s); using torch", embedder.config.backbone,
                        type(exc).__name__, str(exc).splitlines()[0][:200])
        return embedder
    return OnnxEmbedder.for_index(directory, embedder.config)
