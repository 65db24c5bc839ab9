"""``--device`` and ``--precision`` reach the model (or are refused with the reason), from deploy to serve.

MLflow hands ``model_config`` to a pyfunc only if the model was logged with one; before this
was fixed, ``saft serve --device cuda:3 --precision bf16`` served on the CPU in fp32 without
a word. Models are now logged with ``model_config``; versions logged before get the settings
through the environment, and the loaded classifier is checked either way.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml

from saft.serving.server import LOAD_FAILED_EXIT, ServeConfig, ServedModel, serve


@pytest.fixture
def models(served_folder, tmp_path, monkeypatch):
    """``{"logged with model_config": folder, "logged before": folder without it}``."""
    monkeypatch.setenv("SAFT_CACHE_DIR", str(served_folder / "cache"))
    old = tmp_path / "old-model"
    shutil.copytree(served_folder / "model", old)
    mlmodel = yaml.safe_load((old / "MLmodel").read_text())
    assert mlmodel["flavors"]["python_function"].pop("config") == {"device": "auto", "precision": "auto"}
    (old / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    return {"logged with model_config": served_folder / "model", "logged before": old}


@pytest.mark.parametrize("kind", ["logged with model_config", "logged before"])
def test_saft_serve_runs_the_model_where_and_how_it_is_told(models, kind, monkeypatch) -> None:
    monkeypatch.delenv("SAFT_SERVE_PRECISION", raising=False)
    for precision, autocast in (("bf16", torch.bfloat16), ("fp32", None)):
        served = ServedModel(ServeConfig(str(models[kind]), device="cpu", precision=precision))
        served.load()
        try:
            assert served.classifier.autocast is autocast and served.classifier.device == torch.device("cpu")
            assert served.describe()["precision"] == precision and served.describe()["device"] == "cpu"
        finally:
            served.close()
    import os

    assert "SAFT_SERVE_PRECISION" not in os.environ  # set for the old model's load only


def test_the_pyfunc_takes_model_config_then_the_environment(models, monkeypatch) -> None:
    import mlflow.pyfunc

    folder = models["logged with model_config"]
    monkeypatch.setenv("SAFT_SERVE_PRECISION", "bf16")
    assert mlflow.pyfunc.load_model(str(folder)).unwrap_python_model().classifier.autocast is torch.bfloat16
    loaded = mlflow.pyfunc.load_model(str(folder), model_config={"device": "cpu", "precision": "fp32"})
    assert loaded.unwrap_python_model().classifier.autocast is None  # the loader's setting wins
    monkeypatch.setenv("SAFT_SERVE_DEVICE", "cuda:3")
    with pytest.raises(ValueError, match="SAFT_SERVE_DEVICE cuda:3"):
        mlflow.pyfunc.load_model(str(folder))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_device_this_machine_lacks_is_refused_with_the_reason(models, capsys, caplog, monkeypatch) -> None:
    from saft.cli import main

    assert main(["serve", str(models["logged with model_config"]), "--device", "cuda:3", "--precision", "bf16"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda:3" in err and "no CUDA device" in err and "--device cpu" in err
    assert main(["serve", str(models["logged with model_config"]), "--device", "tpu"]) == 2
    assert "'tpu' is not a device" in capsys.readouterr().err
    # the same refusal if the server is started another way: the load fails, the process exits with 3
    from services import free_port

    with caplog.at_level("ERROR", logger="saft.serve"):
        status = serve(ServeConfig(str(models["logged with model_config"]), device="cuda:3", port=free_port()))
    assert status == LOAD_FAILED_EXIT and "no CUDA device" in caplog.text


def test_deploy_precision_and_device_reach_the_server(monkeypatch, tmp_path) -> None:
    """`saft deploy --precision bf16` -> the manifest's container -> `saft serve`'s own parser."""
    import saft.steps.deploy as deploy_module
    from saft.cli import build_parser, main
    from saft.serving.kserve import render

    seen = {}

    def capture(cfg, out, log=None):
        seen["cfg"] = cfg
        return {"model_name": cfg.model_name, "version": "7", "service": "s", "status": "created", "reason": "test"}

    monkeypatch.setattr(deploy_module, "deploy_step", capture)
    for gpus, device in ((0, "cpu"), (1, "cuda")):
        assert main(["deploy", "--model-name", "saft_ViT.B", "--out", str(tmp_path), "--precision", "bf16",
                     "--gpu-count", str(gpus), "--dry-run"]) == 0
        manifest = render("saft-vit-b", "saft_ViT.B", "7", seen["cfg"].predictor)
        container = manifest["spec"]["predictor"]["containers"][0]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert container["command"] == ["saft", "serve"]
        monkeypatch.setenv("SAFT_SERVE_DEVICE", env["SAFT_SERVE_DEVICE"])  # as the pod's environment
        args = build_parser().parse_args(["serve", *container["args"]])
        assert (args.precision, args.device) == ("bf16", device)
