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


def test_bench_scale_measures_every_part_and_reports_targets(tmp_path):
    """The benchmark's measurements on a tiny model, in this process (the CLI spawns one per measurement)."""
    from saft.bench.scale import ScaleBenchConfig, format_scale_benchmark, run_scale_benchmark

    cfg = ScaleBenchConfig(arch="saft-tiny-vit", image_size=32, batch_size=2, score_batches=2, classes=40,
                           small_classes=4, old_class_counts=[1, 2], old_score_batches=1, text_sample_classes=2,
                           text_batch=16, warmup=0, isolate=False)
    report = run_scale_benchmark(cfg, progress=lambda _: None)
    ours = report["scoring"]["ours"]
    assert ours["classes"] == 40 and ours["seconds"] > ours["image_side_s"] > 0
    assert ours["text_forward_backward_s"] > 0 and ours["peak_bytes"] > 0
    assert [p["classes"] for p in report["training"]["ours"]] == [4, 40]
    assert all(p["text_trains"] for p in report["training"]["ours"])
    assert report["text"]["prompts"] == 2 * 80 and max(report["text"]["cut_lengths"]) < 16
    assert report["scoring"]["old_extrapolated"]["classes"] == 40
    assert set(report["targets"]) == {"train_peak_ratio", "scoring_ratio", "text_speedup"}
    assert "extrapolated" in format_scale_benchmark(report)


def test_bench_scale_command_is_wired(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "scale", "--old-classes", "one"])
    assert "invalid int value" in capsys.readouterr().err
    assert main(["bench", "scale", "--old-classes", "2", "2"]) == 2
    assert "two different class counts" in capsys.readouterr().err
