"""The published component library: ``components/<name>/component.yaml`` and ``README.md``.

``saft components compile`` compiles every ``components/<name>/component.py`` for one
image into the ``component.yaml`` any KFP user loads with
``kfp.components.load_component_from_file``, and writes its README from the same
definition: the docstring (what it does, each input and output), the input types and
defaults from the compiled spec, and the resources, caching and retries the saft
pipelines give it (``saft.orchestration.cluster``). Both files are generated, so they
cannot drift from the code; a test recompiles them and compares.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from saft.io import atomic_path
from saft.images import SNAPSHOT_IMAGE
from saft.orchestration.cluster import CHECKPOINTED, NO_RETRY, TASK_RESOURCES, UNCACHED, ClusterConfig

YAML_FILE = "component.yaml"
README_FILE = "README.md"
_ITEM = re.compile(r"^(\w+): (.*)$")


def docstring_sections(fn) -> tuple[str, dict[str, str], dict[str, str]]:
    """(description, Args items, Returns items) of a Google-style docstring."""
    doc = inspect.getdoc(fn) or ""
    description, section, items = [], None, {"Args": {}, "Returns": {}}
    current = None
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped in ("Args:", "Returns:"):
            section, current = stripped[:-1], None
            continue
        if section is None:
            description.append(line)
            continue
        indent = len(line) - len(line.lstrip())
        match = _ITEM.match(stripped)
        if match and indent <= 4:
            current = match.group(1)
            items[section][current] = match.group(2)
        elif stripped and current:
            items[section][current] += " " + stripped
        elif stripped and section == "Returns":
            current = "Output"
            items[section][current] = stripped
    return "\n".join(description).strip(), items["Args"], items["Returns"]


def _type(spec) -> str:
    kind = str(spec.type).split("@")[0]
    return f"List[{kind}]" if getattr(spec, "is_artifact_list", False) else kind


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _used_by(repo: Path, name: str) -> list[str]:
    """The pipelines whose compiled YAML runs the component."""
    return sorted(p.parent.name for p in (repo / "pipelines").glob("*/pipeline.yaml")
                  if re.search(rf"--function_to_execute\s*\n\s*- {name}\n", p.read_text()))


def _resources(name: str, cfg: ClusterConfig) -> list[str]:
    res = TASK_RESOURCES[name]
    lines = [f"- requests {res.cpu} CPU and {res.memory} of memory (limit {res.memory_limit})"]
    if res.gpu:
        lines.append(f"- one accelerator of the pipeline's `gpu_type` (`gpu_count` of them), on nodes labelled "
                     f"`{'='.join(cfg.gpu_node_label)}` (toleration `{cfg.gpu_toleration_key}`), with a "
                     f"{cfg.shm_size} memory-backed `/dev/shm` for DataLoader workers")
    lines.append("- never cached (side effects, or an answer that changes over time)" if name in UNCACHED else
                 "- cached: the key covers the component and its inputs (the data version wherever data is read)")
    if name not in NO_RETRY:
        lines.append(f"- retried {cfg.retries} times with backoff (60 s, doubling)")
    if name in CHECKPOINTED:
        lines.append(f"- checkpoints on the PVC `{cfg.checkpoint_pvc}` at `{cfg.checkpoint_mount}` "
                     "(`checkpoint_root`): a retry resumes from the last one")
    lines.append(f"- S3 (`{cfg.s3_secret}`) and MLflow (`{cfg.mlflow_secret}`) credentials from Kubernetes secrets; "
                 "`SAFT_PIPELINE_RUN` from the pod's `pipeline/runid` label")
    return lines


def component_readme(name: str, fn, component, repo: Path, image: str, cfg: ClusterConfig) -> str:
    description, args, returns = docstring_sections(fn)
    spec = component.component_spec
    calls = sorted(set(re.findall(r"from (saft\.[\w.]+) import", inspect.getsource(fn))))
    lines = [f"# `{name}`", "", description, "",
             "```python",
             "from kfp import components",
             f'{name} = components.load_component_from_file("components/{name}/{YAML_FILE}")',
             "```", "",
             f"Definition: [`component.py`](component.py) (the function `{name}`), compiled to "
             f"[`{YAML_FILE}`]({YAML_FILE}) for the image `{image}` by `saft components compile` (this README "
             "too). The body runs in the project image (`docker/`) and calls "
             + ", ".join(f"`{c}`" for c in calls) + ".", "",
             "## Inputs", "", "| name | type | default | description |", "|---|---|---|---|"]
    for key, inp in (spec.inputs or {}).items():
        default = "required" if inp.default is None and not inp.optional else (
            "optional" if inp.default is None else f"`{inp.default!r}`")
        lines.append(f"| `{key}` | {_type(inp)} | {default} | {_cell(args.get(key, ''))} |")
    lines += ["", "## Outputs", "", "| name | type | description |", "|---|---|---|"]
    for key, out in (spec.outputs or {}).items():
        lines.append(f"| `{key}` | {_type(out)} | {_cell(args.get(key) or returns.get(key, ''))} |")
    used = _used_by(repo, name)
    lines += ["", "## Resources (as the saft pipelines run it)", "", *_resources(name, cfg), "",
              "## Used by", "", (", ".join(f"[`{p}`](../../pipelines/{p}/)" for p in used) or "no pipeline yet"), ""]
    return "\n".join(lines)


def compile_components(image: str = SNAPSHOT_IMAGE, out_root: str | Path | None = None, repo=None) -> list[Path]:
    """Write ``<out_root>/<name>/component.yaml`` and ``README.md`` for every component; returns the folders.

    Default: the reviewed ``components/`` of the checkout, for the snapshot image."""
    from kfp import compiler

    from saft.orchestration.repository import component_functions, find_repository, load_components

    root = find_repository(repo)
    out_root = Path(out_root) if out_root else root / "components"
    functions, components = component_functions(root), load_components(image, root)
    written = []
    for name, fn in functions.items():
        folder = out_root / name
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / YAML_FILE) as tmp:
            compiler.Compiler().compile(getattr(components, name), str(tmp.with_suffix(".yaml")))
            tmp.with_suffix(".yaml").replace(tmp)
        with atomic_path(folder / README_FILE) as tmp:
            tmp.write_text(component_readme(name, fn, getattr(components, name), root, image, ClusterConfig()))
        written.append(folder)
    return written


__all__ = ["compile_components", "component_readme", "docstring_sections"]
