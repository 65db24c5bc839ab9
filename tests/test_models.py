import os
from pathlib import Path

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


def test_activation_suffixes_parse_and_print():
    assert ModelSpec.parse("ViT-B-16-gelu@/m/w.bin") == ModelSpec("ViT-B-16", "/m/w.bin", "gelu")
    assert str(ModelSpec.parse("saft-tiny-vit-quickgelu")) == "saft-tiny-vit-quickgelu@random"
    # open_clip's own QuickGELU config is an architecture of its own, not a suffix
    assert ModelSpec.parse("ViT-B-16-quickgelu@openai") == ModelSpec("ViT-B-16-quickgelu", "openai")
    with pytest.raises(ModelSpecError, match="QuickGELU architecture by definition"):
        ModelSpec.parse("ViT-B-16-quickgelu-gelu@/w.bin")


def test_ambiguous_local_weights_are_refused_naming_both_choices():
    # ViT-B-16's published weights use QuickGELU (openai) and GELU (laion2b): a file does not say which
    with pytest.raises(ModelSpecError) as err:
        saft.load_model("ViT-B-16@/models/vitb16.safetensors")
    text = str(err.value)
    assert "ViT-B-16-quickgelu@/models/vitb16.safetensors" in text and "ViT-B-16-gelu@" in text
    assert "openai" in text and "laion2b" in text


def test_activation_that_contradicts_the_tag_is_refused_before_any_download():
    with pytest.raises(ModelSpecError, match="trained with QUICKGELU, not GELU"):
        saft.load_model("ViT-B-16-gelu@openai")


def test_fingerprint_covers_the_activation(tmp_path, vit):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in vit.model.state_dict().items()}, str(path))
    gelu = saft.load_model(f"saft-tiny-vit@{path}")
    quick = saft.load_model(f"saft-tiny-vit-quickgelu@{path}")
    assert type(quick.model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert type(gelu.model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "GELU"
    assert gelu.fingerprint == vit.fingerprint != quick.fingerprint
    assert saft.fingerprint_model(quick.model) == quick.fingerprint
    # a delta trained on one build is refused by the other, though the weights are identical
    delta = saft.Delta({"visual.proj": torch.ones(1)}, {"visual.proj": torch.tensor([0])}, gelu.fingerprint)
    with pytest.raises(saft.FingerprintMismatch):
        saft.apply_delta(quick.model, delta)


def _fill_hub_cache(hub: Path, repo_id: str, filename: str, state_dict) -> Path:
    """A Hugging Face hub cache holding ``filename`` of ``repo_id`` (the layout huggingface_hub reads offline)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(snapshot / filename))
    return snapshot / filename


@pytest.mark.slow
def test_pretrained_tag_loads_offline_from_the_hub_cache_with_its_activation(tmp_path):
    """ViT-B-16@openai through open_clip's real download path, served by a filled hub cache offline."""
    import json
    import subprocess
    import sys

    import open_clip

    cfg = open_clip.get_pretrained_cfg("ViT-B-16", "openai")
    repo_id = cfg["hf_hub"].rstrip("/")  # timm/vit_base_patch16_clip_224.openai
    weights = saft.load_model("ViT-B-16", seed=5).model.state_dict()  # random, under the real names
    local = _fill_hub_cache(tmp_path / "hf" / "hub", repo_id, "open_clip_model.safetensors", weights)
    script = (
        "import json, saft\n"
        "tag = saft.load_model('ViT-B-16@openai')\n"
        f"quick = saft.load_model('ViT-B-16-quickgelu@{local}')\n"
        f"gelu = saft.load_model('ViT-B-16-gelu@{local}')\n"
        "act = type(tag.model.transformer.resblocks[0].mlp.gelu).__name__\n"
        "print(json.dumps({'act': act, 'tag': tag.fingerprint, 'quick': quick.fingerprint, 'gelu': gelu.fingerprint}))\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["act"] == "QuickGELU"  # open_clip alone would build GELU here and only warn
    assert out["tag"] == out["quick"] != out["gelu"]


@pytest.mark.hub
@pytest.mark.skip(reason="downloads ViT-B-32@openai from a model hub; no hub is reachable on this machine")
def test_pretrained_tag_loads():
    loaded = saft.load_model("ViT-B-32@openai")
    assert loaded.model.visual.conv1.weight.shape[-1] == 32
