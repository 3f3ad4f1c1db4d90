"""Embedder resolution: from options (backbone, weights, head) or an index's stored configuration to an
`Embedder`, with the compatibility checks written once.

- `resolve_new`: what `Engine.create` builds from the user's options (a head file's metadata decides its
  base backbone, weights and settings; given options that contradict it are refused).
- `base_embedder`: the frozen embedder some options name, built but written nowhere (fine-tuning uses it).
- `load_for_index`: the index's own embedder, its weights and head checked against the stored hashes.
- `check_compatible`: refuse options that name another embedder than an existing index's.

Everything that loads a model goes through here; the rest of the engine only sees the `Embedder`
interface (`config`, `dim`, `embed`, `embed_many`; simsearch/embedding.py).

Which runtime runs the network: ONNX Runtime wherever it is installed (the index's ONNX model, exported
from its torch model once and stored in its weights/ folder), torch otherwise, or for a network that does
not export. `SIMSEARCH_RUNTIME=torch` (or `onnx`) forces one.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .config import DEFAULT_BACKBONE, IndexConfig
from .errors import BadInput, EmbedderMismatch, IndexDamaged

BUILT_IN_SOURCES = ("embedded", "hub")
RUNTIMES = ("auto", "onnx", "torch")
TORCH_INSTALL = "pip install 'simsearch[torch]'"
log = logging.getLogger("simsearch")


def runtime_choice() -> str:
    choice = os.environ.get("SIMSEARCH_RUNTIME", "auto")
    if choice not in RUNTIMES:
        raise BadInput(f"SIMSEARCH_RUNTIME must be one of {', '.join(RUNTIMES)}, got {choice!r}")
    return choice


def require_torch(what: str) -> None:
    """A one-line error where torch is needed but not installed."""
    try:
        import timm  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        raise BadInput(f"{what} needs torch and timm, which this install lacks: {TORCH_INSTALL}") from None


def for_inference(directory: Path, torch_embedder) -> "Embedder":  # noqa: F821
    """The embedder an index answers with: its ONNX model where ONNX Runtime is installed (exported from
    `torch_embedder` now if the index has none yet), else `torch_embedder`."""
    from .onnx_embedder import onnxruntime_available

    choice = runtime_choice()
    if choice == "torch" or not onnxruntime_available():
        return torch_embedder
    from .onnx_export import onnx_for
    log.info("exporting %s to ONNX for this index (once)", torch_embedder.config.backbone)
    return onnx_for(torch_embedder, directory, log)


@dataclass
class NewEmbedder:
    """What a new index is made of: its configuration, its model, and the user's files to copy into it."""

    config: IndexConfig  # `weights` is "embedded", "hub" or "file"; `head` is "" until the head is stored
    net: "Backbone"  # noqa: F821 - simsearch.backbones.Backbone
    head: "ProjectionHead | None"  # noqa: F821 - simsearch.heads.ProjectionHead
    weights_file: Path | None  # backbone weights given as a file
    head_file: Path | None  # the fine-tuned head's file
    given: object = None  # a model built elsewhere, used as it is

    def embedder(self, config: IndexConfig) -> "Embedder":  # noqa: F821
        """The model under the configuration as stored (its file names filled in)."""
        from .features import Embedder
        from .runtime import configure_threads

        if self.given is not None:
            return self.given
        embedder = Embedder(config, self.net, self.head)
        configure_threads()
        return embedder


def base_embedder(backbone: str | None = None, weights: str | None = None,
                  **settings) -> tuple[IndexConfig, "Backbone", Path | None]:  # noqa: F821
    """The frozen embedder these options name, built but written nowhere: (configuration, network,
    weights file or None). The configuration's `weights` is "embedded", "hub" or "file".

    `weights`: None (embedded if shipped, else the hub), "embedded", "hub", or a backbone weights file.
    """
    require_torch("building an embedder from a timm model")
    from .backbones import EMBEDDED, build_backbone, layers_for_strides

    backbone = backbone or DEFAULT_BACKBONE
    weights_file = None
    if weights is None:
        source = "embedded" if backbone in EMBEDDED else "hub"
    elif weights in BUILT_IN_SOURCES:
        source = weights
    else:
        weights_file = Path(weights)
        if not weights_file.is_file():
            raise BadInput(f"{weights}: no such weights file")
        source = "file"
    if settings.get("scale") is not None and "short_side" not in settings:
        settings["short_side"] = None  # a fixed scale replaces the default short side
    layers = tuple(settings.pop("layers", None) or layers_for_strides(backbone, (8, 16)))
    net = build_backbone(backbone, source, layers, weights_file)
    config = IndexConfig(backbone=backbone, weights=source, weights_sha256=net.weights_sha256,
                         mean=net.mean, std=net.std, interpolation=net.interpolation, layers=layers,
                         patch_stride=net.reductions[0], **settings)
    return config.replace(feature_dim=config.dims or sum(net.channels)), net, weights_file


def split_head(weights: str | None, head: str | os.PathLike | None) -> tuple[str | None, str | os.PathLike | None]:
    """A `weights` file whose safetensors metadata marks it as a head is the head: (weights, head)."""
    if weights in (None, *BUILT_IN_SOURCES):
        return weights, head
    from .headfile import HEAD_KIND, read_metadata

    metadata = read_metadata(weights)
    if metadata is not None and metadata.get("simsearch_kind") == HEAD_KIND:
        if head is not None:
            raise BadInput(f"{weights} is a fine-tuned head, and a head was given too; give one")
        return None, weights
    return weights, head


def resolve_new(backbone: str | None = None, weights: str | None = None, head: str | os.PathLike | None = None,
                **settings) -> NewEmbedder:
    """The embedder of a new index. Settings not given are the head's base ones; given ones that differ
    from them are refused. `settings`: any IndexConfig field."""
    require_torch("building a new index's embedder")
    from .headfile import check_base
    from .heads import load_head

    weights, head = split_head(weights, head)
    head_module = head_info = None
    if head is not None:
        head_module, head_info = load_head(head)
        base = head_info.base
        if backbone is not None and backbone != base["backbone"]:
            raise EmbedderMismatch(f"{head} was fine-tuned on {base['backbone']}, not {backbone}")
        backbone = base["backbone"]
        if weights is None:
            if head_info.base_weights == "file":
                raise BadInput(f"{head} was fine-tuned on a backbone weights file: give that file too "
                               "(Python: Engine.create(..., weights=FILE, head=HEAD))")
            weights = head_info.base_weights
        if settings.get("scale") is None and settings.get("short_side") is None:
            settings["short_side"], settings["scale"] = base["short_side"], base["scale"]
        for key in ("layers", "neighbourhood", "dims"):
            if settings.get(key) is None:
                settings[key] = tuple(base[key]) if key == "layers" else base[key]
    config, net, weights_file = base_embedder(backbone, weights, **settings)
    if head_info is not None:
        check_base(head_info, config, "this index")
        config = config.replace(head_sha256=head_info.sha256, feature_dim=head_module.out_dim)
    return NewEmbedder(config, net, head_module, weights_file, None if head is None else Path(head))


def given_embedder(embedder, **search_settings) -> NewEmbedder:
    """A model built elsewhere (behind the Embedder interface) as the embedder of a new index."""
    from .config import SEARCH_FIELDS

    embedding = sorted(set(search_settings) - set(SEARCH_FIELDS))
    if embedding:
        raise BadInput(f"an embedder was given: its configuration decides {', '.join(embedding)}")
    return NewEmbedder(embedder.config.replace(**search_settings), None, None, None, None, given=embedder)


def load_for_index(directory: Path, config: IndexConfig) -> "Embedder":  # noqa: F821
    """The embedder an index was built with: its stored ONNX model where ONNX Runtime is installed (checked
    against its hash and the fingerprint), else (or with SIMSEARCH_RUNTIME=torch) the torch model from its
    configuration and weights/ folder, whose weights and head must hash to what the configuration recorded."""
    choice = runtime_choice()
    if choice != "torch":
        from .onnx_embedder import OnnxEmbedder, onnxruntime_available
        if onnxruntime_available():
            stored = OnnxEmbedder.for_index(directory, config)
            if stored is not None:
                log.info("embedder: %s (ONNX Runtime)", stored.model_file.name)
                return stored
        elif choice == "onnx":
            raise BadInput("SIMSEARCH_RUNTIME=onnx, but onnxruntime is not installed: pip install onnxruntime")
    require_torch(f"{directory} has no ONNX model yet, and loading its {config.backbone} model")
    log.info("loading %s (torch)", config.backbone)
    return for_inference(directory, load_torch(directory, config))


def load_torch(directory: Path, config: IndexConfig) -> "Embedder":  # noqa: F821
    """The index's torch embedder, from its configuration and weights/ folder (hashes checked)."""
    from .backbones import build_backbone
    from .features import Embedder
    from .heads import load_head
    from .runtime import configure_threads

    weights_file = directory / config.weights if config.weights not in BUILT_IN_SOURCES else None
    if weights_file is not None and not weights_file.is_file():
        raise IndexDamaged(f"{weights_file}: the index's weights file is missing")
    net = build_backbone(config.backbone, "file" if weights_file else config.weights, config.layers, weights_file)
    if net.weights_sha256 != config.weights_sha256:
        raise EmbedderMismatch(f"the {config.backbone} weights found here differ from the ones this index was "
                               f"built with (hash {net.weights_sha256[:12]} vs {config.weights_sha256[:12]})")
    head = None
    if config.head:
        head_file = directory / config.head
        if not head_file.is_file():
            raise IndexDamaged(f"{head_file}: the index's fine-tuned head file is missing")
        head, _info = load_head(head_file)
        if head.sha256() != config.head_sha256:
            raise EmbedderMismatch(f"{head_file} is not the head this index was built with (hash "
                                   f"{head.sha256()[:12]} vs {config.head_sha256[:12]})")
    embedder = Embedder(config, net, head)
    configure_threads()
    return embedder


def check_compatible(config: IndexConfig, where: Path, backbone: str | None = None, weights: str | None = None,
                     head: str | os.PathLike | None = None, **settings) -> None:
    """Refuse options naming another embedder than `config`'s (a fine-tuned head and the frozen embedder
    included). `where` names the index in the message."""
    differences = []
    if backbone is not None and backbone != config.backbone:
        differences.append(f"backbone {backbone} (index: {config.backbone})")
    weights, head = split_head(weights, head)
    if head is not None:
        from .headfile import read_head_info
        info = read_head_info(head)
        if not config.head_sha256:
            differences.append(f"fine-tuned head {head} (index: the frozen embedder)")
        elif info.sha256 != config.head_sha256:
            differences.append(f"head {head} (a different head from the index's)")
    elif weights is not None and config.head_sha256:
        differences.append(f"weights {weights} without a head (index: fine-tuned, head {config.head})")
    if weights is not None:
        if weights in BUILT_IN_SOURCES:
            if weights != config.weights:
                differences.append(f"weights {weights} (index: {config.weights})")
        else:
            from .backbones import build_backbone
            net = build_backbone(config.backbone, "file", config.layers, Path(weights))
            if net.weights_sha256 != config.weights_sha256:
                differences.append(f"weights {weights} (a different file from the index's)")
    for key, value in settings.items():
        if value is not None and getattr(config, key) != value:
            differences.append(f"{key} {value} (index: {getattr(config, key)})")
    if differences:
        raise EmbedderMismatch(f"{where} was built with another embedder: " + "; ".join(differences)
                               + ". Its configuration is fixed; use a new --index for a different one")
