"""World versions: the collected world's renderer, the version marker, the frozen fingerprint."""

import json
from collections import Counter

import numpy as np
import pytest

from saft.data.synth import SHAPES
from saft.data.synth_v2 import COLOUR_RULES, TYPICAL_COLOUR, render_collected
from saft.world.spec import DEFAULT_WORLD, UnknownWorldError, get_world, world_fingerprint
from saft.world.task import WorldMismatchError, build_world


def test_collected_images_are_pure_functions_of_their_arguments():
    a, b = render_collected("photo", "star", 3, 7), render_collected("photo", "star", 3, 7)
    assert a.image.tobytes() == b.image.tobytes() != render_collected("photo", "star", 3, 8).image.tobytes()
    assert a.image.size == (32, 32) and a.image.mode == "RGB"
    for domain in COLOUR_RULES:
        images = {render_collected(domain, s, 0, 7).image.tobytes() for s in SHAPES}
        assert len(images) == len(SHAPES), domain
    with pytest.raises(ValueError, match="no 'textile' domain"):
        render_collected("textile", "star", 0)


def test_the_colour_cue_holds_where_the_id_data_was_collected_only():
    def typical_rate(domain):
        hits = Counter(render_collected(domain, s, i, 7).colour == TYPICAL_COLOUR[s]
                       for s in SHAPES for i in range(60))
        return hits[True] / sum(hits.values())

    assert 0.72 <= typical_rate("photo") <= 0.88 and 0.72 <= typical_rate("photo_v2") <= 0.88
    assert typical_rate("cartoon") == 0 and typical_rate("clutter") == 0  # renditions never show the cue


def test_a_world_folder_belongs_to_one_version(tmp_path):
    root = build_world(tmp_path / "w", pool_per_class=1, test_per_class=1, log=lambda *_: None)
    marker = json.loads((root / "world.json").read_text())
    assert marker["version"] == DEFAULT_WORLD and marker["id"] == "photo"
    suite = (root / "synthshift.yaml").read_text()
    assert "photo/test" in suite and "textile" not in suite
    assert len(list((root / "photo" / "pool").rglob("*.png"))) == len(SHAPES)
    with pytest.raises(WorldMismatchError, match="holds the synthshift-v2 world, not synthshift-v1"):
        build_world(root, pool_per_class=1, test_per_class=1, version="synthshift-v1", log=lambda *_: None)
    legacy = tmp_path / "old"
    (legacy / "textile" / "pool").mkdir(parents=True)
    with pytest.raises(WorldMismatchError, match="without a world.json"):
        build_world(legacy, pool_per_class=1, test_per_class=1, log=lambda *_: None)
    with pytest.raises(UnknownWorldError, match="versions: synthshift-v1, synthshift-v2"):
        get_world("synthshift-v9")


def test_the_default_world_is_frozen_and_still_renders_its_fingerprint():
    """A renderer, Pillow or checkpoint change that alters the frozen world fails here, not in a benchmark."""
    from saft.models import load_model

    world = get_world()
    assert world.frozen, "the default world must be frozen before it is the default"
    assert world_fingerprint(world, load_model("tiny").fingerprint) == world.frozen["fingerprint"]
    assert world.frozen["model_fingerprint"] == load_model("tiny").fingerprint


def test_the_v1_world_keeps_its_images():
    """v1 stays reachable: its renderer (also pre-training's) is unchanged by v2's additions."""
    from saft.data.synth import render

    img = np.asarray(render("textile", "ring", 10_000, 7).image)
    assert img.shape == (32, 32, 3) and img.std() > 5
    v1 = get_world("synthshift-v1")
    assert v1.id_domain == "textile" and "photo" in v1.ood_domains and v1.task.val_shots == 8


def test_world_cli_fingerprint_and_version(tmp_path, capsys):
    from saft.cli import main

    assert main(["world", "--fingerprint"]) == 0
    assert "matches the fingerprint frozen on" in capsys.readouterr().out
    assert main(["world", "--out", str(tmp_path / "v1"), "--version", "synthshift-v1", "--pool-per-class", "1",
                 "--test-per-class", "1"]) == 0
    assert "world synthshift-v1" in capsys.readouterr().out and (tmp_path / "v1" / "textile" / "pool").is_dir()
    assert main(["world", "--sheet", str(tmp_path / "sheet.png")]) == 0
    from PIL import Image

    with Image.open(tmp_path / "sheet.png") as sheet:  # a column per class, two rows per domain
        assert sheet.size == (70 + 96 * len(SHAPES), 16 + 96 * 2 * len(get_world().domains))


def test_protocol_defaults_come_from_the_world_and_deviations_are_recorded():
    from saft.protocols.synthshift import WorldConfig, protocol_deviations

    cfg = WorldConfig()
    task = get_world().task
    assert (cfg.shots, cfg.val_shots, cfg.seeds, cfg.alphas) == (task.shots, task.val_shots, task.seeds, task.alphas)
    assert protocol_deviations(cfg) == {}
    assert protocol_deviations(WorldConfig(steps=10, seeds=(1,))) == {"seeds": [[1, 2, 3], [1]], "steps": [100, 10]}
    assert WorldConfig(world="synthshift-v1").val_shots == 8
    with pytest.raises(ValueError, match="exceed the pool"):
        WorldConfig(shots=40, val_shots=40)


def test_a_killed_benchmark_resumes_from_the_deltas_it_left(tmp_path):
    from dataclasses import replace

    from saft.protocols.synthshift import WorldConfig, run_world

    cfg = WorldConfig(out_dir=tmp_path, model="saft-tiny-clip@random", seeds=(1,), steps=2, batch_size=16,
                      methods=("full", "saft"), grids={"full": [1e-4], "saft": [1e-3]}, pool_per_class=6,
                      test_per_class=2, shots=2, val_shots=2, alphas=(1.0,))
    first = run_world(cfg, log=lambda *_: None)
    logs: list[str] = []
    again = run_world(replace(cfg, resume=True), log=logs.append)
    assert sum("reusing" in line for line in logs) == 2 and again["aggregates"] == first["aggregates"]
    logs.clear()
    run_world(replace(cfg, resume=True, steps=3), log=logs.append)  # another configuration: trained anew
    assert not any("reusing" in line for line in logs)
