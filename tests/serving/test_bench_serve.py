"""``saft bench serve`` on a small setting: the server starts on 127.0.0.1, answers every request, stops.

The baseline (``mlflow models serve`` of the same model) is left out here to save its start-up;
tests/tracking/test_serving.py serves the champion with it, and docs/serving.md has a full run.
"""

from __future__ import annotations

import json

import pytest

from saft.bench.serve import ServeBenchConfig, class_names, templates


def test_generated_names_and_templates_are_distinct_and_in_the_tiny_vocabulary() -> None:
    from saft.models.tiny import tiny_tokenizer

    names, prompts = class_names(1000), templates(80)
    assert len(set(names)) == 1000 and len(set(prompts)) == 80
    tiny_tokenizer()([p.format(n) for p in prompts[:3] for n in names[::97]])  # raises on an unknown word
    with pytest.raises(ValueError, match="at least 1"):
        ServeBenchConfig(clients=0)
    with pytest.raises(ValueError, match="v1 or v2"):
        ServeBenchConfig(protocol="v3")


@pytest.mark.slow
def test_the_load_benchmark_measures_the_server(tmp_path, capsys) -> None:
    from saft.cli import main

    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--requests", "12", "--clients", "3", "--images-per-request", "2",
                 "--startup-repeats", "1", "--threads", "1", "--no-baseline", "--protocol", "v2",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["servers"]) == {"saft serve"} and report["config"]["protocol"] == "v2"  # binary tensor data
    for name, r in report["servers"].items():
        assert r["requests"] == 12 and r["errors"] == 0, (name, r)
        assert r["p50_s"] <= r["p99_s"] and r["images_per_s"] > 0 and r["ready_s"] > 0
        assert r["rss_ready_bytes"] > 0 and r["rss_samples"] > 0
    startup = report["startup"]
    assert startup["stored_head_s"] > 0 and startup["encode_at_start_s"] > 0 and startup["classes"] == 10
    assert report["ratios_saft_vs_mlflow"]["images_per_s"] is None
    assert "saft serve" in capsys.readouterr().out
