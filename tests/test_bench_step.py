"""`saft bench step`: every method in one process, rounds interleaved, PEFT matched to SAFT, warnings."""

import itertools

import pytest
import torch.nn as nn

import saft
from saft.bench import step as step_bench
from saft.bench import step_peft
from saft.bench.step import StepBenchConfig, format_step_benchmark, run_step_benchmark

peft = pytest.importorskip("peft", reason="peft is a dev requirement: pip install -r requirements-dev.txt")


def _cfg(**kw):
    base = dict(arch="saft-tiny-vit", image_size=32, batch_size=4, num_classes=6, density=0.01, warmup=0,
                repeats=2)
    base.update(kw)
    return StepBenchConfig(**base)


def test_every_method_runs_interleaved_on_the_same_batch_and_reports_ratios():
    messages = []
    report = run_step_benchmark(_cfg(value_grads=["gather", "dense"]), progress=messages.append)
    methods = report["methods"]
    assert list(methods) == ["full", "masked_dense", "saft", "saft[gather]", "saft[dense]", "floor", "lora",
                             "shira"]
    rounds = [m.split(": ", 1)[1].rstrip(" .").split(", ") for m in messages if m.startswith("round")]
    assert len(rounds) == 2 and rounds[1] == rounds[0][1:] + rounds[0][:1]  # every method each round, rotated
    for name, r in methods.items():
        assert len(r["step_times_s"]) == 2 and r["step_time_s"] > 0
        assert report["ratios_vs_floor"][name] == r["step_time_s"] / methods["floor"]["step_time_s"]
    k = report["mask"]["num_selected"]
    assert methods["saft"]["trainable_entries"] == methods["masked_dense"]["trainable_entries"] == k
    assert methods["full"]["trainable_entries"] == report["mask"]["eligible"]
    assert methods["floor"]["trainable_entries"] == 0 and methods["floor"]["state_bytes"] == 0
    # saft's state: fp32 gradient + two AdamW moments per value (+ the step counters)
    assert 3 * 4 * k <= methods["saft"]["state_bytes"] <= 3 * 4 * k + 1024
    assert report["ratios_vs_full"]["full"]["state_bytes"] == 1.0
    assert methods["lora"]["r"] == 8 and methods["shira"]["matched_to_entries"] == k
    assert report["peak_memory"].startswith("not reported")  # the CPU
    assert report["environment"]["torch_linear_flatten_3d"] == "1"  # the setting `import saft` makes
    assert set(report["targets"]) == {"saft_vs_floor_max", "saft_at_floor", "saft_faster_than_lora",
                                      "saft_faster_than_shira"}
    text = format_step_benchmark(report)
    assert "saft / floor" in text and "shira" in text and "faster than lora" in text


def test_peft_counts_follow_the_targets_and_shira_is_matched_to_saft():
    model = saft.load_model("saft-tiny-vit", seed=0).model
    targets = step_peft.linear_targets(model)
    modules = dict(model.named_modules())
    assert targets and all(isinstance(modules[n], nn.Linear) for n in targets)
    assert not any(n.endswith("attn.out_proj") for n in targets)  # read by the attention, never called
    per_rank = sum(modules[n].in_features + modules[n].out_features for n in targets)
    lora, params, info = step_peft.lora_model(model, 4)
    assert sum(p.numel() for p in params) == 4 * per_rank and info["target_modules"] == len(targets)
    assert all(p.requires_grad == ("lora_" in n) for n, p in lora.named_parameters())
    assert step_peft.shira_rank(model, 1) == 1  # never below rank 1
    assert step_peft.shira_rank(model, int(2.4 * per_rank)) == 2
    assert step_peft.shira_rank(model, int(2.6 * per_rank)) == 3
    shira, params, info = step_peft.shira_model(model, 2 * per_rank)
    assert sum(p.numel() for p in params) == 2 * per_rank and info["r"] == 2
    assert saft.fingerprint_model(model) == saft.load_model("saft-tiny-vit", seed=0).fingerprint  # copies only


def test_many_classes_use_the_trainers_chunked_text_side_and_bf16_runs():
    report = run_step_benchmark(_cfg(num_classes=40, text_batch=16, precision="bf16", repeats=1),
                                progress=lambda _: None)
    assert report["text_side"] == {"prompts": 40, "text_batch": 16, "chunked": True}
    assert report["config"]["precision"] == "bf16"
    assert "chunks of 16" in format_step_benchmark(report)


def test_without_peft_the_rows_are_skipped_and_said_so(monkeypatch):
    monkeypatch.setattr(step_peft, "peft_version", lambda: None)
    report = run_step_benchmark(_cfg(repeats=1), progress=lambda _: None)
    assert "lora" not in report["methods"] and "saft_faster_than_lora" not in report["targets"]
    assert report["skipped"][0].startswith("lora (peft is not installed")
    assert "skipped: shira" in format_step_benchmark(report)


def test_rounds_that_vary_widely_make_the_report_warn(monkeypatch):
    """A fake clock: every other round takes 3x longer, as on a machine that another job keeps busy."""
    class Clock:
        calls = itertools.count()

        def perf_counter(self):
            n = next(self.calls)
            step, end = divmod(n, 2)  # two readings per step
            rnd = step // 6  # six methods a round
            return step * 100.0 + end * (3.0 if rnd % 2 else 1.0)

    monkeypatch.setattr(step_bench, "time", Clock())
    report = run_step_benchmark(_cfg(repeats=2), progress=lambda _: None)
    assert all(r["spread"] == pytest.approx(1.0) for r in report["methods"].values())
    assert report["warnings"] and "rounds vary widely" in report["warnings"][0]
    assert "WARNING: rounds vary widely" in format_step_benchmark(report)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16"):
        _cfg(precision="fp8")
    with pytest.raises(ValueError, match="value-gradient strategy must be one of"):
        _cfg(value_grads=["fastest"])
    with pytest.raises(ValueError, match="text_batch"):
        _cfg(text_batch=-1)
