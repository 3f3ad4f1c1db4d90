"""simsearch.backbones: key renaming, weight files, hashing and building."""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from simsearch.backbones import (BackboneError, build_backbone, embedded_weights_file, layers_for_strides,
                                 read_state_dict, rename_lukemelas_keys, state_dict_sha256)


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite1"])
def test_rename_lukemelas_keys_fits_timm_strictly(name):
    state = read_state_dict(embedded_weights_file(name))
    assert any(k.startswith("_blocks.") for k in state)
    model = timm.create_model(name, pretrained=False)
    renamed = rename_lukemelas_keys(state, [len(stage) for stage in model.blocks])
    assert len(renamed) == len(state)
    result = model.load_state_dict(renamed, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # Values are carried over, not just names.
    assert torch.equal(model.conv_stem.weight, state["_conv_stem.weight"])
    assert torch.equal(model.blocks[0][0].conv_dw.weight, state["_blocks.0._depthwise_conv.weight"])
    assert torch.equal(model.blocks[1][0].conv_pw.weight, state["_blocks.1._expand_conv.weight"])
    assert torch.equal(model.blocks[1][0].conv_pwl.weight, state["_blocks.1._project_conv.weight"])
    assert torch.equal(model.classifier.weight, state["_fc.weight"])


def test_rename_rejects_unknown_keys_and_extra_blocks():
    with pytest.raises(BackboneError, match="unknown lukemelas key"):
        rename_lukemelas_keys({"_mystery.weight": torch.zeros(1)}, [1])
    with pytest.raises(BackboneError, match="block part"):
        rename_lukemelas_keys({"_blocks.0._weird.weight": torch.zeros(1)}, [1])
    with pytest.raises(BackboneError, match="block 2"):
        rename_lukemelas_keys({"_blocks.2._depthwise_conv.weight": torch.zeros(1)}, [1, 1])


def test_rename_block_tables():
    state = {
        "_blocks.0._depthwise_conv.weight": torch.zeros(1),  # no expansion: depthwise-separable block
        "_blocks.0._project_conv.weight": torch.zeros(1),
        "_blocks.1._expand_conv.weight": torch.zeros(1),  # expansion: inverted residual
        "_blocks.1._project_conv.weight": torch.zeros(1),
        "_blocks.1._bn0.weight": torch.zeros(1),
        "_bn1.bias": torch.zeros(1),
    }
    assert sorted(rename_lukemelas_keys(state, [1, 1])) == sorted([
        "blocks.0.0.conv_dw.weight", "blocks.0.0.conv_pw.weight",
        "blocks.1.0.conv_pw.weight", "blocks.1.0.conv_pwl.weight", "blocks.1.0.bn1.weight", "bn2.bias"])


def test_state_dict_sha256_changes_when_one_value_changes():
    state = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4)}
    h = state_dict_sha256(state)
    assert len(h) == 64
    assert state_dict_sha256({k: v.clone() for k, v in reversed(list(state.items()))}) == h  # order-free
    changed = {k: v.clone() for k, v in state.items()}
    changed["a"][1, 2] = 5.0000005
    assert state_dict_sha256(changed) != h
    assert state_dict_sha256({"a": state["a"], "c": state["b"]}) != h  # names count
    assert state_dict_sha256({"a": state["a"].double(), "b": state["b"]}) != h  # dtype counts
    assert state_dict_sha256({"a": state["a"].contiguous(), "b": state["b"].clone()}) == h  # values, not storage


def test_state_dict_sha256_includes_the_shape():
    state = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    assert state_dict_sha256({"a": state["a"].reshape(3, 2)}) != state_dict_sha256(state)


def test_read_state_dict_safetensors_and_pth(tmp_path):
    state = {"w": torch.randn(3, 4), "n": torch.tensor(7, dtype=torch.int64)}
    st = tmp_path / "w.safetensors"
    save_file(state, str(st))
    pth = tmp_path / "w.pth"
    torch.save(state, pth)
    for path in (st, pth):
        loaded = read_state_dict(path)
        assert sorted(loaded) == ["n", "w"]
        assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["n"], state["n"])
    # a checkpoint that wraps the weights in "state_dict"
    wrapped = tmp_path / "ckpt.pt"
    torch.save({"state_dict": state, "epoch": 3}, wrapped)
    assert torch.equal(read_state_dict(wrapped)["w"], state["w"])


class Payload:
    def __init__(self):
        self.x = 1


def test_read_state_dict_rejects_a_pickle_with_python_objects(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "obj": Payload()}, path)
    with pytest.raises(BackboneError, match="not a loadable state dict"):
        read_state_dict(path)


def test_read_state_dict_rejects_non_tensor_values(tmp_path):
    path = tmp_path / "plain.pth"
    torch.save({"w": torch.zeros(2), "lr": 0.1}, path)
    with pytest.raises(BackboneError, match="expected a dict of tensors"):
        read_state_dict(path)
    path2 = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path2)
    with pytest.raises(BackboneError, match="expected a dict of tensors"):
        read_state_dict(path2)


def test_read_state_dict_rejects_text_and_missing(tmp_path):
    text = tmp_path / "weights.pth"
    text.write_text("definitely not weights\n")
    with pytest.raises(BackboneError, match="weights.pth"):
        read_state_dict(text)
    with pytest.raises(BackboneError, match="no such weights file"):
        read_state_dict(tmp_path / "missing.pth")
    with pytest.raises(BackboneError, match="no such weights file"):
        read_state_dict(tmp_path)


def test_read_state_dict_rejects_a_damaged_safetensors_file(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_text("definitely not weights\n")
    with pytest.raises(BackboneError, match="weights.safetensors"):
        read_state_dict(path)


def test_build_backbone_from_a_local_safetensors_file(tmp_path, lite1_backbone):
    state = read_state_dict(embedded_weights_file("tf_efficientnet_lite1"))
    path = tmp_path / "lite1.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    local = build_backbone("tf_efficientnet_lite1", "local", (2, 3), weights_file=path)
    assert local.weights_sha256 == lite1_backbone.weights_sha256
    assert local.channels == (40, 112) and local.reductions == (8, 16)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        a, b = local.model(x), lite1_backbone.model(x)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_other_weights_give_another_sha256(tmp_path, lite1_backbone):
    path = tmp_path / "random.pth"
    torch.save(timm.create_model("tf_efficientnet_lite1", pretrained=False).state_dict(), path)
    random = build_backbone("tf_efficientnet_lite1", "local", (2, 3), weights_file=path)
    assert random.weights_sha256 != lite1_backbone.weights_sha256


def test_build_backbone_needs_a_weights_file():
    with pytest.raises(BackboneError, match="weights file is required"):
        build_backbone("tf_efficientnet_lite1", "local", (2, 3))


def test_build_backbone_rejects_weights_of_another_model(tmp_path):
    path = tmp_path / "lite0.pth"
    torch.save(read_state_dict(embedded_weights_file("tf_efficientnet_lite0")), path)
    with pytest.raises(BackboneError, match="do not fit"):
        build_backbone("tf_efficientnet_lite1", "local", (2, 3), weights_file=path)


def test_unknown_backbone_has_no_embedded_weights():
    with pytest.raises(BackboneError, match="no embedded weights for 'resnet18'"):
        embedded_weights_file("resnet18")


def test_layers_for_strides():
    assert layers_for_strides("tf_efficientnet_lite1") == (2, 3)
    assert layers_for_strides("tf_efficientnet_lite1", (4, 8, 16, 32)) == (1, 2, 3, 4)
    with pytest.raises(BackboneError, match="no feature map at stride 64"):
        layers_for_strides("tf_efficientnet_lite1", (64,))
    with pytest.raises(BackboneError, match="cannot build"):
        layers_for_strides("no_such_model_xyz")


def test_nothing_in_the_package_unpickles():
    """Stored data is FAISS, SQLite, JSON or safetensors; torch files are read with weights_only=True."""
    import re
    from pathlib import Path

    import simsearch

    offenders = []
    for path in Path(simsearch.__file__).parent.rglob("*.py"):
        text = path.read_text()
        if re.search(r"^\s*(import|from)\s+(pickle|dill|joblib|cloudpickle)\b", text, re.M):
            offenders.append(f"{path.name}: imports a pickler")
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            if "weights_only=True" not in call:
                offenders.append(f"{path.name}: {call}")
        if "allow_pickle=True" in text:
            offenders.append(f"{path.name}: allow_pickle=True")
    assert not offenders, offenders
