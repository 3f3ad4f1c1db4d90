"""Fine-tuned projection heads: the model and its file.

The head is residual, `y = x + W2 relu(W1 x + b1) + b2`, with W2 and b2 starting at zero: untrained it
is the identity, so fine-tuning (simsearch/finetune.py) starts from exactly the frozen embedder and keeps
its dimension.

It is stored as safetensors (tensors `w1`, `b1`, `w2`, `b2`) whose metadata names it
(`simsearch_kind = projection-head`) and the base embedder it was trained on (backbone, weights hash,
the configuration fields that decide its input). That metadata is how `index add --weights FILE` tells
a head from backbone weights (that metadata is read without torch: simsearch/headfile.py).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .backbones import state_dict_sha256
from .config import IndexConfig
from .errors import HeadError
from .headfile import HEAD_FORMAT, HEAD_KIND, HeadInfo, base_fields, read_head_info


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


def load_head(path: str | os.PathLike) -> tuple[ProjectionHead, HeadInfo]:
    """The head and its metadata; its tensors must hash to what its metadata says."""
    from safetensors.torch import load_file

    info = read_head_info(path)
    head = ProjectionHead.from_tensors(load_file(str(path)))
    if head.sha256() != info.sha256:
        raise HeadError(f"{path}: the head's tensors do not match the hash in its metadata (damaged or edited)")
    return head, info


