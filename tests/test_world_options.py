"""Options of the synthshift benchmark: SAFT variants, method subsets, lr grids, base-to-new."""

import json
import math

import pytest
import torch

from saft.sparse import Mask, Scores, select_mask
from saft.sparse.mask import select_mask_layerwise
from saft.protocols.synthshift import DEFAULT_GRIDS, WorldConfig, parse_grid


def _scores(seed=0):
    gen = torch.Generator().manual_seed(seed)
    # distinct values (a permutation) so every top-k is unique; "big" is on a larger scale
    # and would take the whole global budget
    shapes = {"big": (40, 10), "mid": (8, 25), "small": (3,)}
    values, offset = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        perm = torch.randperm(n, generator=gen).float() + offset
        values[name] = (perm * (100.0 if name == "big" else 1.0)).view(shape)
        offset += n
    return Scores(values, "abs_mean", 10)


def test_layerwise_mask_takes_each_tensors_own_top_entries():
    scores = _scores()
    mask = select_mask_layerwise(scores, density=0.05, meta={"manifest_hash": "abc"})
    counts = mask.counts()
    assert counts == {"big": 20, "mid": 10}  # round(0.05 * 400), round(0.05 * 200); "small" rounds to 0
    for name, k in counts.items():
        flat = scores.values[name].reshape(-1)
        expected = torch.sort(torch.argsort(flat, descending=True)[:k]).values
        assert torch.equal(mask.indices[name], expected), name
    assert mask.shapes["small"] == (3,) and "small" not in mask.indices
    assert mask.meta["selection"] == "layerwise" and mask.meta["manifest_hash"] == "abc"


def test_global_mask_is_unchanged_by_the_layerwise_option():
    scores = _scores()
    glob = select_mask(scores, density=0.05)
    assert glob.num_selected == 30 and set(glob.counts()) == {"big"}  # the larger scale takes everything
    assert select_mask_layerwise(scores, density=0.05).counts()["mid"] == 10


def test_layerwise_mask_refuses_a_density_that_selects_nothing():
    with pytest.raises(ValueError, match="no entry"):
        select_mask_layerwise(_scores(), density=0.001)
    with pytest.raises(ValueError, match="density"):
        select_mask_layerwise(_scores(), density=0.0)


def test_parse_grid():
    assert parse_grid("saft=1e-3,3e-3") == ("saft", [1e-3, 3e-3])
    assert parse_grid("full=1e-4") == ("full", [1e-4])
    for bad in ("saft", "zeroshot=1e-3", "saft=", "saft=fast", "saft=-1e-3"):
        with pytest.raises(ValueError):
            parse_grid(bad)


def test_world_config_validates_its_options():
    assert WorldConfig(methods=("saft",)).methods == ("saft",)
    with pytest.raises(ValueError, match="methods"):
        WorldConfig(methods=("saft", "lorra"))
    with pytest.raises(ValueError, match="wiseft interpolates"):
        WorldConfig(methods=("saft", "wiseft"))
    with pytest.raises(ValueError, match="grid"):
        WorldConfig(methods=("saft",), grids={"full": [1e-4]})
    with pytest.raises(ValueError, match="selection"):
        WorldConfig(selection="blockwise")
    with pytest.raises(ValueError, match="score_rule"):
        WorldConfig(score_rule="fisher")
    with pytest.raises(ValueError, match="density"):
        WorldConfig(density=2.0)


def test_cli_builds_the_config():
    from saft.cli import build_parser
    from saft.cli.protocols import world_config

    parse = build_parser().parse_args
    default = world_config(parse(["benchmark", "synthshift"]))
    assert default.methods == ("full", "wiseft", "lora", "saft", "random") and default.b2n
    assert default.density == 0.001
    assert default.grids == DEFAULT_GRIDS and default.exclude == ("logit_scale", "logit_bias")
    assert default.include == ("*",) and default.selection == "global" and default.score_rule == "abs_mean"

    cfg = world_config(parse(["benchmark", "synthshift", "--methods", "saft", "random", "--lr", "saft=1e-3,3e-3",
                              "--lr", "random=1e-2", "--density", "0.005", "--exclude", "visual.conv1.*",
                              "--include", "visual.*", "--score-rule", "mean_sq", "--selection", "layerwise",
                              "--no-b2n", "--world", "w"]))
    assert cfg.methods == ("saft", "random") and not cfg.b2n and cfg.density == 0.005
    assert cfg.grids["saft"] == [1e-3, 3e-3] and cfg.grids["random"] == [1e-2]
    assert cfg.grids["full"] == DEFAULT_GRIDS["full"]
    assert cfg.exclude == ("logit_scale", "logit_bias", "visual.conv1.*") and cfg.include == ("visual.*",)
    assert cfg.score_rule == "mean_sq" and cfg.selection == "layerwise" and str(cfg.world_dir) == "w"
    assert not cfg.eligibility.allows("visual.conv1.weight") and cfg.eligibility.allows("visual.proj")
    assert not cfg.eligibility.allows("text_projection")


def test_saft_only_variant_with_base_to_new(tmp_path):
    from saft.protocols.synthshift import run_world
    from saft.world.table import format_checks, format_results

    cfg = WorldConfig(out_dir=tmp_path, model="saft-tiny-clip@random", seeds=(1,), steps=2, batch_size=16,
                      grids={"saft": [1e-3, 3e-3]}, methods=("saft",), pool_per_class=4, test_per_class=2,
                      shots=2, val_shots=1, density=0.01, exclude=("logit_scale", "visual.conv1.*"),
                      selection="layerwise", b2n=True)
    summary = run_world(cfg, log=lambda *_: None)
    assert {row["method"] for row in summary["grid"]} == {"saft"}
    assert {a["model"] for a in summary["aggregates"]} == {"zeroshot", "saft"}
    # without full fine-tuning the world is not judged, and the output says so
    assert summary["checks_computed"] is False and summary["checks"] == {} and summary["checks_passed"] is None
    assert "not computed" in format_checks(summary)
    landing = summary["masks"]["saft"]
    assert "random" not in summary["masks"]
    assert landing["per_tensor"] and not any(n.startswith("visual.conv1") for n in landing["per_tensor"])
    # layer-wise: every tensor with at least 50 entries holds 1% of them
    assert landing["per_tensor"]["visual.transformer.resblocks.0.attn.in_proj_weight"] == round(0.01 * 384 * 128)
    saved = Mask.load(tmp_path / "seed1" / "mask.safetensors")
    assert saved.meta["selection"] == "layerwise" and "visual.conv1.*" in json.loads(saved.meta["eligible_exclude"])
    b2n = summary["b2n"]["table"]
    assert set(b2n) == {"zeroshot", "saft"}
    for row in b2n.values():
        assert {"base", "new", "hm"} <= set(row) and 0.0 <= row["hm"]["mean"] <= 1.0
    assert (tmp_path / "seed1" / "b2n" / "data" / "classes.json").is_file()
    assert len(json.loads((tmp_path / "seed1" / "b2n" / "data" / "classes.json").read_text())) == 5  # base half
    assert (tmp_path / "eval-b2n" / "metrics.json").is_file()
    table = format_results(summary)
    assert "base-to-new" in table and "HM" in table and "saft mask" in table
