import pytest
import torch
from safetensors.torch import save_file

import saft
from saft.models import ModelSpec, ModelSpecError, read_state_dict


def test_spec_parsing():
    assert ModelSpec.parse("ViT-B-16@openai") == ModelSpec("ViT-B-16", "openai")
    assert ModelSpec.parse("ViT-B-32").is_random
    assert ModelSpec.parse("ViT-B-16@/models/b16.bin").is_file
    with pytest.raises(ModelSpecError, match="unknown architecture"):
        ModelSpec.parse("ViT-Q-99@openai")
    with pytest.raises(ModelSpecError, match="empty"):
        ModelSpec.parse("  ")


def test_random_init_is_seeded(arch):
    a = saft.load_model(arch, seed=3)
    b = saft.load_model(arch, seed=3)
    c = saft.load_model(arch, seed=4)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert a.fingerprint == saft.fingerprint_model(a.model)


def test_local_weights_files_round_trip(tmp_path, vit):
    sd = {k: v.clone() for k, v in vit.model.state_dict().items()}
    st, pt = tmp_path / "w.safetensors", tmp_path / "w.pt"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    torch.save({"state_dict": sd}, pt)
    for path in (st, pt):
        other = saft.load_model(f"saft-tiny-vit@{path}", seed=99)
        assert other.fingerprint == vit.fingerprint
    in_memory = saft.load_model("saft-tiny-vit", state_dict=sd, seed=99)
    assert in_memory.fingerprint == vit.fingerprint


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "obj": ModelSpec("x")}, path)
    with pytest.raises(ModelSpecError, match="cannot be read safely"):
        read_state_dict(path)


def test_weights_for_another_architecture_are_refused(tmp_path, vit):
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.model.state_dict().items()}, str(path))
    with pytest.raises(ModelSpecError, match="do not match the architecture"):
        saft.load_model(f"saft-tiny-rn@{path}")


def test_missing_file_and_unknown_tag():
    with pytest.raises(FileNotFoundError):
        saft.load_model("saft-tiny-vit@/nonexistent/w.safetensors")
    with pytest.raises(ModelSpecError, match="unknown pretrained tag"):
        saft.load_model("ViT-B-32@no-such-tag")


def test_fingerprint_sees_one_changed_entry(vit):
    before = vit.fingerprint
    with torch.no_grad():
        vit.model.visual.conv1.weight.view(-1)[7] += 1e-6
    assert saft.fingerprint_model(vit.model) != before


@pytest.mark.hub
@pytest.mark.skip(reason="downloads ViT-B-32@openai from a model hub; no hub is reachable on this machine")
def test_pretrained_tag_loads():
    loaded = saft.load_model("ViT-B-32@openai")
    assert loaded.model.visual.conv1.weight.shape[-1] == 32
