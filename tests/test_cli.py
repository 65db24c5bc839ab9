import json

import pytest

from saft.cli import main


def test_bench_step_writes_ratios(tmp_path, capsys):
    out = tmp_path / "step.json"
    rc = main(["bench", "step", "--arch", "saft-tiny-vit", "--image-size", "32", "--batch-size", "4",
               "--warmup", "0", "--repeats", "1", "--density", "0.01", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    for method in ("full", "masked_dense", "saft", "floor"):
        assert report["methods"][method]["step_time_s"] > 0
        assert "step_time" in report["ratios_vs_full"][method]
    assert report["ratios_vs_full"]["full"]["state_bytes"] == 1.0
    assert report["ratios_vs_full"]["saft"]["state_bytes"] < 0.05
    assert report["mask"]["num_selected"] == round(0.01 * report["mask"]["eligible"])
    assert "saft / floor" in capsys.readouterr().out


def test_cli_reports_bad_input_without_traceback(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "step", "--repeats", "many"])
    assert "invalid int value" in capsys.readouterr().err
    rc = main(["bench", "step", "--arch", "ViT-Q-99", "--repeats", "1"])
    assert rc == 2
    assert "unknown architecture" in capsys.readouterr().err
