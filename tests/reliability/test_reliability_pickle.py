"""No pickle from untrusted sources: a weights, delta, mask or checkpoint file that would run
code when unpickled is refused with a clear error, and the code never runs."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from synthetic import CLASS_NAMES, make_dataset

import saft
from saft.models.loading import ModelSpecError
from saft.sparse.checkpoint import CHECKPOINT_NAME

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # torch, on the bare pickles


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _write_malicious(path: Path, marker: Path, how: str) -> Path:
    payload = {"visual.conv1.weight": torch.zeros(1), "evil": Payload(marker)}
    if how == "torch.save":  # zip container, like a real .pt checkpoint
        torch.save(payload, path)
    else:  # a bare pickle stream renamed to .bin (protocol 2: what torch's legacy format used)
        path.write_bytes(pickle.dumps(payload, protocol=4 if how == "pickle4" else 2))
    return path


@pytest.mark.parametrize("how", ["torch.save", "pickle2", "pickle4"])
def test_payload_is_live_when_unpickled_unsafely(tmp_path: Path, how: str) -> None:
    # The control: the same file does create its marker under an unrestricted load,
    # so the refusal below is what protects us, not a broken payload.
    marker = tmp_path / "pwned"
    path = _write_malicious(tmp_path / "control.bin", marker, how)
    if how == "torch.save":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth"])
@pytest.mark.parametrize("how", ["torch.save", "pickle2", "pickle4"])
def test_malicious_weights_file_is_refused(tmp_path: Path, suffix: str, how: str) -> None:
    marker = tmp_path / "pwned"
    path = _write_malicious(tmp_path / f"weights{suffix}", marker, how)
    with pytest.raises(ModelSpecError, match=r"cannot be read safely \(.+\)\. Loading it fully could run arbitrary "
                                             r"code.*convert the file to \.safetensors") as caught:
        saft.load_model(f"saft-tiny-vit@{path}")
    assert not marker.exists()
    assert path.name in str(caught.value)
    if how == "torch.save":  # bare pickles are refused even earlier (an unknown opcode or global)
        assert "GLOBAL posix.system" in str(caught.value)
    for unsafe_advice in ("weights_only` set to `False`", "add_safe_globals"):  # not repeated from torch
        assert unsafe_advice not in str(caught.value)


@pytest.mark.parametrize("loader", ["delta", "mask"])
def test_pickle_given_as_delta_or_mask_is_refused(tmp_path: Path, loader: str) -> None:
    marker = tmp_path / "pwned"
    path = _write_malicious(tmp_path / f"{loader}.safetensors", marker, "torch.save")
    load = saft.load_delta if loader == "delta" else saft.Mask.load
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load(path)
    assert not marker.exists()


def test_tampered_checkpoint_is_refused_on_resume(vit, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    _write_malicious(ckpt / CHECKPOINT_NAME, marker, "torch.save")
    shapes = {n: tuple(p.shape) for n, p in saft.Eligibility().select(vit.model).items()}
    mask = saft.random_mask(shapes, 0.01, seed=0)
    prompts = saft.ClassPrompts.build(vit.tokenizer, CLASS_NAMES)
    with pytest.raises(ValueError, match="checkpoint cannot be read safely"):
        saft.finetune(vit.model, make_dataset(8), prompts, mask=mask, config=saft.FinetuneConfig(steps=2, batch_size=4),
                      checkpoint_dir=ckpt, resume=True, progress=False)
    assert not marker.exists()
