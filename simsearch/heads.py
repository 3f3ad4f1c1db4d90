"""Fine-tuned projection heads: the model and its file.

The head is residual, `y = x + W2 relu(W1 x + b1) + b2`, with W2 and b2 starting at zero: untrained it
is the identity, so fine-tuning (simsearch/finetune.py) starts from exactly the frozen embedder and keeps
its dimension.

It is stored as safetensors (tensors `w1`, `b1`, `w2`, `b2`) whose metadata names it
(`simsearch_kind = projection-head`) and the base embedder it was trained on (backbone, weights hash,
the configuration fields that decide its input). That metadata is how `index add --weights FILE` tells
a head from backbone weights.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .backbones import state_dict_sha256
from .config import IndexConfig
from .errors import HeadError

HEAD_KIND = "projection-head"
HEAD_FORMAT = "1"
# The configuration fields that decide what a head's input vectors are: a head is only valid on an index
# whose values of these match the ones it was trained with.
HEAD_BASE_FIELDS = ("backbone", "weights_sha256", "mean", "std", "interpolation", "short_side", "scale", "layers",
                    "patch_stride", "neighbourhood", "dims", "pipeline_version")


# -- the head ---------------------------------------------------------------------------------------
class ProjectionHead(torch.nn.Module):
    """(..., D) -> (..., D): x + W2 relu(W1 x + b1) + b2; the identity until trained (W2 = 0, b2 = 0)."""

    def __init__(self, dim: int, hidden: int, generator: torch.Generator | None = None):
        super().__init__()
        if dim < 1 or hidden < 1:
            raise ValueError(f"head dimensions must be >= 1, got dim {dim}, hidden {hidden}")
        bound = 1.0 / np.sqrt(dim)  # nn.Linear's default range, drawn from our generator for determinism
        self.w1 = torch.nn.Parameter((torch.rand(hidden, dim, generator=generator) * 2 - 1) * bound)
        self.b1 = torch.nn.Parameter(torch.zeros(hidden))
        self.w2 = torch.nn.Parameter(torch.zeros(dim, hidden))
        self.b2 = torch.nn.Parameter(torch.zeros(dim))

    @property
    def in_dim(self) -> int:
        return int(self.w1.shape[1])

    @property
    def out_dim(self) -> int:
        return int(self.w2.shape[0])

    @property
    def hidden(self) -> int:
        return int(self.w1.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"head expects vectors of {self.in_dim} dims, got {tuple(x.shape)}")
        return x + F.linear(F.relu(F.linear(x, self.w1, self.b1)), self.w2, self.b2)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().cpu().contiguous().clone() for name, p in self.named_parameters()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "ProjectionHead":
        if set(tensors) != {"w1", "b1", "w2", "b2"}:
            raise HeadError(f"a projection head has tensors w1, b1, w2, b2; got {sorted(tensors)}")
        hidden, dim = tensors["w1"].shape
        head = cls(int(dim), int(hidden))
        expected = {"w1": (hidden, dim), "b1": (hidden,), "w2": (dim, hidden), "b2": (dim,)}
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != tuple(shape):
                raise HeadError(f"head tensor {name} has shape {tuple(tensors[name].shape)}, expected {shape}")
        with torch.no_grad():
            for name, p in head.named_parameters():
                p.copy_(tensors[name].float())
        return head.eval()

    def sha256(self) -> str:
        """Content hash of the head's tensors (what the index's fingerprint records)."""
        return state_dict_sha256(self.tensors())



# -- files ----------------------------------------------------------------------------------------------------
def base_fields(config: IndexConfig) -> dict:
    """The HEAD_BASE_FIELDS of a configuration, as JSON values."""
    d = config.to_dict()
    return {k: d[k] for k in HEAD_BASE_FIELDS}


@dataclass(frozen=True)
class HeadInfo:
    """What a head file says about itself."""

    sha256: str  # of its tensors
    in_dim: int
    hidden: int
    base: dict  # HEAD_BASE_FIELDS of the embedder it was trained on
    base_weights: str  # "embedded", "hub" or "file": where the base weights came from
    base_fingerprint: str
    training: dict


def save_head(path: str | os.PathLike, head: ProjectionHead, base_config: IndexConfig, base_weights: str,
              training: dict) -> HeadInfo:
    """Write the head as safetensors with its metadata, under a temporary name then renamed (a failed
    save leaves no file). The metadata holds no time or path, so one seed gives one file, byte for byte."""
    from safetensors.torch import save

    path = Path(path)
    if path.suffix != ".safetensors":
        raise HeadError(f"{path}: a head is saved as .safetensors")
    if base_config.feature_dim and base_config.feature_dim != head.in_dim:
        raise HeadError(f"head takes {head.in_dim} dims, the base embedder gives {base_config.feature_dim}")
    metadata = {
        "simsearch_kind": HEAD_KIND, "format": HEAD_FORMAT,
        "base_backbone": base_config.backbone, "base_weights": base_weights,
        "base_weights_sha256": base_config.weights_sha256, "base_fingerprint": base_config.fingerprint,
        "base_config": json.dumps(base_fields(base_config), sort_keys=True),
        "in_dim": str(head.in_dim), "hidden": str(head.hidden), "sha256": head.sha256(),
        "training": json.dumps(training, sort_keys=True),
    }
    tmp = path.with_name(path.name + ".partial")
    try:
        tmp.write_bytes(canonical_safetensors(save(head.tensors(), metadata=metadata)))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return read_head_info(path)


def canonical_safetensors(blob: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted. safetensors writes the metadata in
    hash-map order, which changes from run to run; sorted, one head is one file, byte for byte."""
    size = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8:8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header with spaces to 8-byte alignment
    return len(header).to_bytes(8, "little") + header + blob[8 + size:]


def read_metadata(path: str | os.PathLike) -> dict[str, str] | None:
    """A safetensors file's metadata, or None if the file is not safetensors."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="numpy") as f:
            return f.metadata() or {}
    except Exception:  # noqa: BLE001 - safetensors raises its own types for a damaged header
        return None


def is_head_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a simsearch projection head (rather than backbone weights)."""
    metadata = read_metadata(path)
    return metadata is not None and metadata.get("simsearch_kind") == HEAD_KIND


def read_head_info(path: str | os.PathLike) -> HeadInfo:
    metadata = read_metadata(path)
    if metadata is None or metadata.get("simsearch_kind") != HEAD_KIND:
        raise HeadError(f"{path}: not a simsearch projection head (no simsearch_kind={HEAD_KIND} in its metadata)")
    if metadata.get("format") != HEAD_FORMAT:
        raise HeadError(f"{path}: head format {metadata.get('format')!r}; this simsearch reads {HEAD_FORMAT}")
    try:
        return HeadInfo(sha256=metadata["sha256"], in_dim=int(metadata["in_dim"]), hidden=int(metadata["hidden"]),
                        base=json.loads(metadata["base_config"]), base_weights=metadata["base_weights"],
                        base_fingerprint=metadata["base_fingerprint"], training=json.loads(metadata["training"]))
    except (KeyError, ValueError) as exc:
        raise HeadError(f"{path}: damaged head metadata ({exc})") from None


def load_head(path: str | os.PathLike) -> tuple[ProjectionHead, HeadInfo]:
    """The head and its metadata; its tensors must hash to what its metadata says."""
    from safetensors.torch import load_file

    info = read_head_info(path)
    head = ProjectionHead.from_tensors(load_file(str(path)))
    if head.sha256() != info.sha256:
        raise HeadError(f"{path}: the head's tensors do not match the hash in its metadata (damaged or edited)")
    return head, info


def check_base(info: HeadInfo, config: IndexConfig, what: str = "the index") -> None:
    """Refuse a head trained on another embedder than `config`'s (backbone, weights, layers, scale...)."""
    ours = base_fields(config)
    differences = [f"{k} {info.base.get(k)!r} (head) vs {ours[k]!r} ({what})" for k in HEAD_BASE_FIELDS
                   if info.base.get(k) != ours[k]]
    if differences:
        raise HeadError("the head was fine-tuned on another embedder than " + what + "'s: "
                        + "; ".join(d.replace("weights_sha256 ", "weights hash ") for d in differences))


