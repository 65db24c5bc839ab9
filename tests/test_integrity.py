"""Masks, deltas and checkpoints are checked on load against the sha256 recorded when they were written: a
flipped byte anywhere is refused naming the file, never loaded into a silently wrong model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from saft.io import CONTENT_SHA256, DamagedArtifactError
from saft.sparse.checkpoint import CHECKPOINT_NAME, DIGEST_NAME, read_checkpoint, save_checkpoint
from saft.sparse.delta import Delta
from saft.sparse.mask import Mask


def _delta() -> Delta:
    return Delta({"w": torch.tensor([0.5, -1.25, 3.0]), "b": torch.ones(2, 2)}, {"w": torch.tensor([1, 4, 7])},
                 "f" * 64, {"method": "saft"})


def _payload_offset(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_delta_round_trips_and_records_its_checksum(tmp_path: Path) -> None:
    path = _delta().save(tmp_path / "delta.safetensors")
    back = Delta.load(path)
    assert torch.equal(back.values["w"], _delta().values["w"]) and back.indices["w"].tolist() == [1, 4, 7]
    header = json.loads(path.read_bytes()[8:_payload_offset(path)])
    assert len(header["__metadata__"][CONTENT_SHA256]) == 64


@pytest.mark.parametrize("where", ["values", "indices", "metadata"])
def test_a_flipped_byte_in_a_delta_is_refused_naming_it(tmp_path: Path, where: str) -> None:
    path = _delta().save(tmp_path / "delta.safetensors")
    header = json.loads(path.read_bytes()[8:_payload_offset(path)])
    if where == "metadata":  # a digit of the base fingerprint: still valid JSON
        offset = path.read_bytes().index(b"f" * 64) + 3
    else:
        key = "w::values" if where == "values" else "w::indices"
        offset = _payload_offset(path) + header[key]["data_offsets"][0] + 1
    _flip(path, offset)
    with pytest.raises(DamagedArtifactError, match=rf"{path}: damaged delta: its content does not match"):
        Delta.load(path)


def test_a_flipped_byte_in_a_mask_is_refused(tmp_path: Path) -> None:
    mask = Mask({"w": torch.tensor([0, 5, 9])}, {"w": (4, 4)}, {"base_model": "tiny"})
    path = mask.save(tmp_path / "mask.safetensors")
    assert Mask.load(path).indices["w"].tolist() == [0, 5, 9]
    _flip(path, _payload_offset(path) + 4)
    with pytest.raises(DamagedArtifactError, match="damaged mask"):
        Mask.load(path)


def test_indices_outside_their_tensor_are_refused_on_apply() -> None:
    from saft.sparse.delta import apply_delta

    model = torch.nn.Linear(3, 2)
    bad = Delta({"weight": torch.ones(2)}, {"weight": torch.tensor([1, 6])}, "x", {})
    with pytest.raises(ValueError, match="fall outside its 6 entries"):
        apply_delta(model, bad, check_fingerprint=False)


def test_a_damaged_checkpoint_is_refused_and_a_kill_between_the_two_writes_is_not_damage(tmp_path: Path) -> None:
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(path, {"step": 1, "params": [torch.zeros(3)]})
    first = path.read_bytes()
    save_checkpoint(path, {"step": 2, "params": [torch.ones(3)]})
    assert read_checkpoint(path)["step"] == 2
    digests = json.loads((tmp_path / DIGEST_NAME).read_text())["digests"]
    assert sorted(digests.values()) == [1, 2]  # the record keeps the previous checkpoint's digest too
    path.write_bytes(first)  # killed after the record, before the rename: the old checkpoint still matches
    assert read_checkpoint(path)["step"] == 1
    _flip(path, len(first) // 2)
    with pytest.raises(DamagedArtifactError, match=rf"{path}: damaged checkpoint"):
        read_checkpoint(path)


def test_the_command_line_names_a_damaged_delta_in_one_line(tmp_path: Path, capsys) -> None:
    from image_trees import write_tree

    from saft.cli import main

    write_tree(tmp_path / "a", size=(16, 16))
    path = _delta().save(tmp_path / "delta.safetensors")
    _flip(path, _payload_offset(path) + 2)
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: s\ndatasets: [{name: a, dataset: imagefolder, root: a, role: id}]\n")
    code = main(["evaluate", "--model", "saft-tiny-vit", "--suite", str(suite), "--data-root", str(tmp_path),
                 "--delta", f"saft={path}", "--out", str(tmp_path / "E")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"{path}: damaged delta" in err[0]
