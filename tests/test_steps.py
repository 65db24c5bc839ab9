import json

import pytest

import saft
from saft.cli import main
from saft.data.synth import write_domain


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("steps")
    root = write_domain(base / "shapes", "photo", per_class=6)
    assert main(["data", "prepare", str(root), "--out", str(base / "data"), "--shots", "4", "--val-shots", "2"]) == 0
    return base


def test_score_then_finetune_then_resume(prepared, tmp_path, capsys):
    data = str(prepared / "data")
    assert main(["score", "--model", "saft-tiny-vit", "--data", data, "--out", str(tmp_path / "score"),
                 "--density", "0.002", "--batch-size", "8"]) == 0
    assert "mask:" in capsys.readouterr().out
    mask = saft.Mask.load(tmp_path / "score" / "mask.safetensors")
    assert mask.num_selected == round(0.002 * mask.eligible_count)
    assert mask.meta["manifest_hash"] == json.loads((prepared / "data" / "prepare.json").read_text())[
        "manifests"]["train"]["sha256"]

    args = ["finetune", "--model", "saft-tiny-vit", "--data", data, "--mask", str(tmp_path / "score" / "mask.safetensors"),
            "--steps", "4", "--batch-size", "8", "--lr", "1e-2", "--checkpoint-every", "2"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    delta_a = saft.load_delta(tmp_path / "a" / "delta.safetensors")
    assert delta_a.num_values == mask.num_selected
    assert (tmp_path / "a" / "checkpoints" / "checkpoint.pt").is_file()
    history = json.loads((tmp_path / "a" / "history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3, 4]

    # resume from the step-2 checkpoint of an identical run: same delta
    (tmp_path / "b").mkdir()
    import shutil
    shutil.copytree(tmp_path / "a" / "checkpoints", tmp_path / "b" / "checkpoints")
    assert main(args + ["--out", str(tmp_path / "b"), "--resume"]) == 0
    delta_b = saft.load_delta(tmp_path / "b" / "delta.safetensors")
    for name in delta_a.values:
        assert (delta_a.values[name] == delta_b.values[name]).all()


def test_finetune_full_needs_no_mask_and_saft_needs_one(prepared, tmp_path, capsys):
    data = str(prepared / "data")
    rc = main(["finetune", "--model", "saft-tiny-vit", "--data", data, "--out", str(tmp_path), "--steps", "1"])
    assert rc == 2 and "method saft trains the entries of a mask: pass --mask" in capsys.readouterr().err
    rc = main(["finetune", "--model", "saft-tiny-vit", "--data", data, "--out", str(tmp_path), "--steps", "2",
               "--method", "full", "--batch-size", "8"])
    assert rc == 0
    assert not saft.load_delta(tmp_path / "delta.safetensors").indices
    capsys.readouterr()
    rc = main(["finetune", "--model", "saft-tiny-vit", "--data", data, "--out", str(tmp_path / "x"), "--method", "full",
               "--mask", "whatever.safetensors"])  # a mask given to full fine-tuning is refused, not ignored
    assert rc == 2 and "method full trains every eligible parameter and takes no mask" in capsys.readouterr().err


def test_mask_from_another_base_is_refused(prepared, tmp_path, capsys):
    from safetensors.torch import save_file

    data = str(prepared / "data")
    other = saft.load_model("saft-tiny-vit", seed=7).model.state_dict()
    save_file({k: v.contiguous() for k, v in other.items()}, str(tmp_path / "other.safetensors"))
    assert main(["score", "--model", "saft-tiny-vit", "--data", data, "--out", str(tmp_path / "s"),
                 "--kind", "random", "--seed", "5"]) == 0
    rc = main(["finetune", "--model", f"saft-tiny-vit@{tmp_path / 'other.safetensors'}", "--data", data,
               "--out", str(tmp_path / "f"), "--mask", str(tmp_path / "s" / "mask.safetensors"), "--steps", "1"])
    assert rc == 2 and "another base model" in capsys.readouterr().err


def test_missing_data_folder_is_a_clear_error(tmp_path, capsys):
    rc = main(["score", "--model", "saft-tiny-vit", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "not a prepared data folder" in err and "saft data prepare" in err


def test_training_prompts_are_not_evaluation_prompts(tmp_path):
    """prepare writes both prompt sets; score and finetune use the training one unless told otherwise,
    and the mask and delta record which templates they were made with."""
    root = write_domain(tmp_path / "shapes", "photo", per_class=5)
    ensemble = tmp_path / "ensemble.txt"
    ensemble.write_text("a photo of a {}.\na drawing of a {}.\nan image of a {}.\n")
    assert main(["data", "prepare", "--val-shots", "0", str(root), "--out", str(tmp_path / "data"), "--shots", "2",
                 "--templates", str(ensemble)]) == 0
    assert json.loads((tmp_path / "data" / "templates.json").read_text()) == ensemble.read_text().split("\n")[:3]
    assert json.loads((tmp_path / "data" / "train_templates.json").read_text()) == ["a photo of a {}."]
    data = str(tmp_path / "data")
    assert main(["score", "--model", "saft-tiny-vit", "--data", data, "--out", str(tmp_path / "score"),
                 "--density", "0.002"]) == 0
    mask_file = str(tmp_path / "score" / "mask.safetensors")
    assert json.loads(saft.Mask.load(mask_file).meta["prompt_templates"]) == ["a photo of a {}."]
    assert main(["finetune", "--model", "saft-tiny-vit", "--data", data, "--mask", mask_file, "--steps", "1",
                 "--prompts", "eval", "--out", str(tmp_path / "ft")]) == 0
    delta = saft.load_delta(tmp_path / "ft" / "delta.safetensors")
    assert len(json.loads(delta.meta["prompt_templates"])) == 3
    assert json.loads(delta.meta["mask_prompt_templates"]) == ["a photo of a {}."]


def test_prompt_and_loader_parameters_are_checked():
    from saft.steps.params import ParamsError, load_params

    with pytest.raises(ParamsError, match="finetune.prompts must be one of train, eval, got 'all'"):
        load_params(None, ["finetune.prompts=all"])
    with pytest.raises(ParamsError, match="loader.num_workers"):
        load_params(None, ["loader.num_workers=-3"])
    params = load_params(None, ["loader.num_workers=2", "score.text_batch=64"])
    assert params.loader.num_workers == 2 and params.score.text_batch == 64
