"""One definition per step configuration: the command line, params.yaml, the Kubeflow components and the
torchrun command lines agree with it, field by field (name, type, default)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import typing
from pathlib import Path

import pytest

from saft.cli import build_parser
from saft.config import ConfigError, default_of, defaults, from_arguments, from_mapping, hints, meta, to_argv
from saft.data.prepare import PrepareConfig
from saft.orchestration.arguments import shared_arguments
from saft.orchestration.repository import component_functions, find_repository
from saft.orchestration.torchrun import evaluate_argv, finetune_argv, score_argv
from saft.serving.kserve import PredictorSettings
from saft.serving.rollout import RolloutConfig
from saft.steps import params as P
from saft.steps.configs import DeltaRun, EvaluateConfig, FinetuneStepConfig, ScoreConfig, WiseftConfig
from saft.steps.register import CLI_ONLY, PIPELINE_DEFAULTS, RegisterConfig

REPO = find_repository()
# step -> (config, the CLI command, the arguments the command needs beside the config's flags)
STEPS = {
    "score": (ScoreConfig, ["score"], ["--data", "D", "--out", "O"]),
    "finetune": (FinetuneStepConfig, ["finetune"], ["--data", "D", "--out", "O"]),
    "evaluate": (EvaluateConfig, ["evaluate"], ["--out", "O"]),
    "prepare": (PrepareConfig, ["data", "prepare"], ["ROOT", "--out", "O"]),
    "deploy-predictor": (PredictorSettings, ["deploy"], ["--out", "O"]),
    "deploy-rollout": (RolloutConfig, ["deploy"], ["--out", "O"]),
    "register": (RegisterConfig, ["register"], ["--metrics", "M", "--delta", "D", "--data", "A", "--model", "m",
                                                "--out", "O"]),
    "wiseft": (WiseftConfig, ["wiseft"], ["--data", "D", "--out", "O", "--delta", "F"]),
}
# params.yaml section of each step, and the fields a pipeline sets per task or run instead of in the section
SECTIONS = {"score": "score", "finetune": "finetune", "evaluate": "evaluate", "prepare": "data",
            "deploy-predictor": "deploy", "deploy-rollout": "deploy", "register": "register"}
# where a section's default differs from the command line's on purpose (named beside the step's definition)
SECTION_DEFAULTS = {"register": PIPELINE_DEFAULTS}
PER_TASK = {
    "score": {"model", "kind", "seed", "device"},
    "finetune": {"model", "method", "lr", "seed", "device"},
    "evaluate": {"model", "device", "deltas", "zeroshot", "only"},
    "prepare": {"seed"},
    "deploy-predictor": {"extra_env"},
    "deploy-rollout": set(),
    "register": set(CLI_ONLY),
}
LOADER = {f.name for f in dataclasses.fields(P.LoaderSettings)}


def _other_value(f: dataclasses.Field, tp):
    """A valid value of field ``f`` that differs from its default (to prove every field travels)."""
    m, default = meta(f), default_of(f)
    inner = next((a for a in typing.get_args(tp) if a is not type(None)), tp) if type(None) in typing.get_args(tp) \
        else tp
    origin = typing.get_origin(inner)
    if m["choices"] is not None and origin not in (list, tuple):
        return next(c for c in m["choices"] if c != default)
    if inner is bool:
        return not default
    if inner is int:
        return (default or 0) + 3
    if inner is float:
        value = 0.003 if default is None else default / 2 + 0.25
        return min(value, m["maximum"]) if m["maximum"] is not None else value
    if inner is str:
        return f"x-{f.name}"
    if origin is tuple and typing.get_args(inner)[-1] is not Ellipsis:
        return tuple(0.8 + i / 10 if a is float else f"v{i}" for i, a in enumerate(typing.get_args(inner)))
    if origin in (list, tuple):
        item = typing.get_args(inner)[0]
        values = [0.25, 0.75] if item is float else [m["choices"][-1]] if m["choices"] else ["p1", "p2"]
        return tuple(values) if origin is tuple else values
    raise AssertionError(f"no test value for {f.name}: {tp}")


def _changed(cls, **fixed):
    types = hints(cls)
    values = {f.name: _other_value(f, types[f.name]) for f in dataclasses.fields(cls) if meta(f)["cli"]}
    return cls(**{**values, **fixed})


@pytest.mark.parametrize("step", STEPS)
def test_every_field_has_a_flag_with_its_default_and_round_trips(step: str) -> None:
    cls, command, io = STEPS[step]
    parser = build_parser()
    required = [x for f in dataclasses.fields(cls) if meta(f)["required"] for x in (f"--{f.name.replace('_', '-')}",
                                                                                   "r")]
    args = parser.parse_args([*command, *io, *required])
    for f in dataclasses.fields(cls):
        if meta(f)["cli"] and not meta(f)["required"]:
            value = getattr(args, f.name)
            assert (tuple(value) if isinstance(default_of(f), tuple) else value) == default_of(f), f.name
    cfg = _changed(cls)
    back = from_arguments(cls, parser.parse_args([*command, *io, *to_argv(cfg)]), **(
        {"deltas": cfg.deltas} if cls is EvaluateConfig else {}))
    assert back == cfg


def test_the_torchrun_command_lines_parse_back_to_their_configs() -> None:
    parser = build_parser()
    score = _changed(ScoreConfig)
    assert from_arguments(ScoreConfig, parser.parse_args(score_argv(score, "D", "M", root="R"))) == score
    ft = _changed(FinetuneStepConfig)
    a = parser.parse_args(finetune_argv(ft, "D", "F", mask_path="M", resume=True, checkpoint_dir="C"))
    assert from_arguments(FinetuneStepConfig, a) == ft and (a.mask, a.resume, a.checkpoint_dir) == ("M", True, "C")
    ev = _changed(EvaluateConfig, deltas=[DeltaRun("saft", "F/delta.safetensors", 1), DeltaRun("full", "G")])
    a = parser.parse_args(evaluate_argv(ev, "E"))
    assert from_arguments(EvaluateConfig, a, deltas=[DeltaRun.parse(d) for d in a.delta]) == ev


@pytest.mark.parametrize("step", SECTIONS)
def test_each_params_section_is_the_step_config_without_what_a_task_sets(step: str) -> None:
    cls, section = STEPS[step][0], getattr(P.PipelineParams(), SECTIONS[step])
    own = {f.name: f for f in dataclasses.fields(section)}
    config = {f.name: f for f in dataclasses.fields(cls)}
    types_, section_types = hints(cls), hints(type(section))
    for name, f in config.items():
        if name in PER_TASK[step] or name in LOADER:
            if (step, name) == ("finetune", "lr"):  # per method instead: finetune.lr {method: rate}
                assert section_types[name] == dict[str, float]
            else:
                assert name not in own, f"{SECTIONS[step]}.{name} is set per task, not in params.yaml"
            continue
        assert name in own, f"params.yaml {SECTIONS[step]}: has no key {name}"
        assert section_types[name] == types_[name], name
        assert default_of(own[name]) == SECTION_DEFAULTS.get(step, {}).get(name, default_of(f)), name
        assert meta(own[name])["help"] == meta(f)["help"], name
    if step in ("score", "finetune", "evaluate"):
        assert LOADER <= set(config), "a step that reads images takes the loader: section"


def test_the_repository_params_yaml_is_the_defaults_with_their_help() -> None:
    assert (REPO / "params.yaml").read_text() == P.render(P.PipelineParams()), \
        "params.yaml differs from the parameters' definitions: regenerate it with `saft params show --defaults`"


def _component_parameters(name: str) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(component_functions(REPO)[name]).parameters)


_FINETUNE_SETTINGS = set(defaults(FinetuneStepConfig)) - {"model", "method", "lr", "seed", "device"}
# component -> (config, fields fed by a JSON parameter (settings, or loader) instead of one parameter each,
#               fields the task derives from its inputs)
COMPONENTS = {
    "score": (ScoreConfig, LOADER, set()),
    "finetune": (FinetuneStepConfig, _FINETUNE_SETTINGS, set()),
    "train_method": (FinetuneStepConfig, _FINETUNE_SETTINGS, {"lr", "seed"}),  # its grid's rates; the data's seed
    "baseline": (FinetuneStepConfig, _FINETUNE_SETTINGS, set()),
    "finetune_trainjob": (FinetuneStepConfig, _FINETUNE_SETTINGS, {"method", "device"}),
    "evaluate": (EvaluateConfig, LOADER, {"deltas", "only"}),
    "prepare": (PrepareConfig, set(), set()),
    "register": (RegisterConfig, set(), set(CLI_ONLY)),
}
_TYPES = {str: str, int: int, float: float, bool: bool, list: list}


@pytest.mark.parametrize("component", COMPONENTS)
def test_components_take_every_setting_with_the_config_types_and_defaults(component: str) -> None:
    cls, via_settings, derived = COMPONENTS[component]
    params = _component_parameters(component)
    types_ = hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in via_settings or f.name in derived:
            continue
        assert f.name in params, f"component {component} has no parameter {f.name}"
        p = params[f.name]
        tp = types_[f.name]
        if type(None) in typing.get_args(tp):  # X | None: the pipeline always passes a resolved X
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        origin = typing.get_origin(tp) or tp
        assert _TYPES.get(p.annotation, p.annotation) in (origin, list if origin is tuple else origin), \
            f"{component}.{f.name}: {p.annotation} vs {types_[f.name]}"
        if p.default is not inspect.Parameter.empty:
            default = default_of(f)
            assert p.default == (list(default) if isinstance(default, tuple) else default), f"{component}.{f.name}"
    if via_settings - LOADER:
        assert "settings" in params, f"component {component} takes its settings as JSON"
    if via_settings & LOADER and not via_settings - LOADER:
        assert "loader" in params


def test_the_section_defaults_that_differ_from_the_command_line_are_named_and_real() -> None:
    for step, redefaulted in SECTION_DEFAULTS.items():
        cls, section = STEPS[step][0], getattr(P.PipelineParams(), SECTIONS[step])
        for name, value in redefaulted.items():
            assert defaults(cls)[name] != value == getattr(section, name), f"{step}.{name}"


def test_register_params_build_the_step_config_and_reach_the_component() -> None:
    p = P.PipelineParams()
    cfg = p.register_config()
    assert dataclasses.asdict(cfg) == {**defaults(RegisterConfig), **PIPELINE_DEFAULTS}
    assert p.register_config("hm").gate == "hm"
    args = shared_arguments(p)
    for key, name in (("register_model_name", "model_name"), ("promote", "promote"),
                      ("ood_tolerance", "ood_tolerance"), ("id_tolerance", "id_tolerance"),
                      ("register_baseline", "baseline"), ("register_gate", "gate"), ("hm_tolerance", "hm_tolerance")):
        assert args[key] == getattr(cfg, name), key
    with pytest.raises(P.ParamsError, match=r"register\.method must be one of .*got 'sfat' \(did you mean saft\?\)"):
        P.load_params(None, ["register.method=sfat"])
    with pytest.raises(P.ParamsError, match=r"register\.ood_tolerance must be a fraction in \[0, 1\)"):
        P.load_params(None, ["register.ood_tolerance=1.5"])


def test_wiseft_alphas_are_one_setting_for_the_command_line_params_and_the_component() -> None:
    own = {f.name: f for f in dataclasses.fields(P.FinetuneParams)}["wiseft_alphas"]
    f = {f.name: f for f in dataclasses.fields(WiseftConfig)}["alphas"]
    assert hints(P.FinetuneParams)["wiseft_alphas"] == hints(WiseftConfig)["alphas"] == list[float]
    assert default_of(own) == default_of(f) and meta(own)["help"] == meta(f)["help"]
    assert P.PipelineParams().wiseft_alphas() == default_of(f)
    assert _component_parameters("train_method")["wiseft_alphas"].annotation is list
    # the pipeline scores the alphas at the training's batch size and device, both of which default like wiseft's
    ft = {f.name: f for f in dataclasses.fields(FinetuneStepConfig)}
    assert default_of(ft["device"]) == defaults(WiseftConfig)["device"]


def test_settings_json_carries_every_setting_and_refuses_unknown_keys() -> None:
    from saft.orchestration.tasks import settings_config

    p = P.PipelineParams()
    p.finetune.epochs, p.finetune.max_grad_norm, p.loader.num_workers = 2.0, 0.5, 3
    args = shared_arguments(p)
    cfg = settings_config(FinetuneStepConfig, args["settings"], model="tiny", method="saft", lr=0.1, seed=2,
                          device="cpu")
    assert cfg == p.finetune_config("saft", 2).__class__(**{**dataclasses.asdict(p.finetune_config("saft", 2)),
                                                            "lr": 0.1, "device": "cpu"})
    assert json.loads(args["settings"]).keys() == set(defaults(FinetuneStepConfig)) - {"model", "method", "lr",
                                                                                         "seed", "device"}
    with pytest.raises(ConfigError, match="did you mean epochs"):
        settings_config(FinetuneStepConfig, {"epoch": 2}, model="tiny", method="saft", lr=0.1, seed=1, device="cpu")
    with pytest.raises(ConfigError, match="set by the program"):
        settings_config(FinetuneStepConfig, {"seed": 2}, model="tiny", method="saft", lr=0.1, seed=1, device="cpu")


def test_pipeline_arguments_are_the_params_defaults() -> None:
    p, args = P.PipelineParams(), shared_arguments(P.PipelineParams())
    pairs = {"density": p.score.density, "score_rule": p.score.rule, "score_batch_size": p.score.batch_size,
             "score_prompts": p.score.prompts, "score_text_batch": p.score.text_batch,
             "score_include": p.score.include, "score_exclude": p.score.exclude, "shots": p.data.shots,
             "val_shots": p.data.val_shots, "dataset": p.data.dataset, "split": p.data.split,
             "train_templates": p.data.train_templates, "templates": p.data.templates,
             "skip_corrupt": p.data.skip_corrupt, "data_subset": p.data.subset, "alphas": p.evaluate.alphas,
             "eval_batch_size": p.evaluate.batch_size, "eval_reference": p.evaluate.reference,
             "eval_templates": p.evaluate.template_set, "suite": p.evaluate.suite,
             "eval_allow_train_overlap": p.evaluate.allow_train_overlap,
             "eval_data_root": p.evaluate.data_root}
    for key, value in pairs.items():
        assert args[key] == value, key


def test_one_learning_rate_default_per_method_and_model() -> None:
    from saft.models.tiny import recipe_lr
    from saft.sparse.config import DEFAULT_LR, default_lr

    p = P.PipelineParams()
    # the shipped model's recipe wins where it names a method; the library's default elsewhere
    assert p.learning_rates() == {m: default_lr(m, "tiny") for m in DEFAULT_LR} == {**DEFAULT_LR, **recipe_lr("tiny")}
    assert P.PipelineParams(model="ViT-B-16@openai").learning_rates() == DEFAULT_LR
    assert FinetuneStepConfig(model="tiny", method="full").training().lr == recipe_lr("tiny")["full"]
    p.finetune.lr = {"saft": 0.5}
    assert p.finetune_config("saft", 1).lr == 0.5 and p.finetune_config("full", 1).lr == recipe_lr("tiny")["full"]


def test_params_errors_name_the_key_and_the_closest_one(tmp_path: Path) -> None:
    with pytest.raises(P.ParamsError, match=r"unknown key finetune\.step \(did you mean steps\?\)"):
        P.load_params(None, ["finetune.step=3"])
    with pytest.raises(P.ParamsError, match=r"score\.density must be in \(0, 1\], got 2\.0"):
        P.load_params(None, ["score.density=2"])
    with pytest.raises(P.ParamsError, match=r"finetune\.precision must be one of auto, fp32, bf16, fp16, got 'bf61' "
                                            r"\(did you mean bf16\?\)"):
        P.load_params(None, ["finetune.precision=bf61"])
    with pytest.raises(P.ParamsError, match=r"finetune.lr names no method sfat \(did you mean saft\?\)"):
        P.load_params(None, ["finetune.lr={sfat: 0.1}"])
    assert from_mapping(ScoreConfig, {"density": 0.5}, source="x", model="m").density == 0.5
