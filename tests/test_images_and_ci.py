"""The project images (docker/) and the CI workflows (.github/workflows/), checked without
a Docker engine or GitHub: what the Dockerfiles copy is really in the build context, they
install what `make install` installs, the GPU base matches the CUDA of the pinned torch,
the package they install carries its data files, and the workflows' triggers, secrets
and `saft` command lines are what the pipeline expects."""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = {"gpu": REPO / "docker" / "Dockerfile", "cpu": REPO / "docker" / "Dockerfile.cpu"}
WORKFLOWS = REPO / ".github" / "workflows"


# --------------------------------------------------------------------------- Dockerfile parsing


@dataclass
class Instruction:
    cmd: str
    args: str
    line: int


@dataclass
class Stage:
    image: str  # as written after FROM, global ARGs substituted
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def of(self, cmd: str) -> list[tuple[int, Instruction]]:
        return [(i, ins) for i, ins in enumerate(self.instructions) if ins.cmd == cmd]


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def external_base(self, stage: Stage) -> str:
        """The registry image a stage finally builds on (following `FROM <stage>`)."""
        names = {s.name: s for s in self.stages if s.name}
        image = stage.image
        while image in names:
            image = names[image].image
        return image


def _substitute(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), m.group(0)), text)


def parse_dockerfile(path: Path) -> Dockerfile:
    """Logical instructions (continuations joined, comment lines dropped, as Docker does),
    grouped into stages; global ARG defaults substituted into FROM."""
    logical: list[tuple[int, str]] = []
    buf, start = "", 0
    for no, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue
        if not buf:
            start = no
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        logical.append((start, (buf + stripped).strip()))
        buf = ""
    assert not buf, f"{path}: dangling line continuation"

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, text in logical:
        cmd, _, args = text.partition(" ")
        cmd, args = cmd.upper(), args.strip()
        if cmd == "FROM":
            words = [w for w in _substitute(args, global_args).split() if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else None
            stages.append(Stage(words[0], name))
        elif cmd == "ARG" and not stages:
            key, _, default = args.partition("=")
            global_args[key] = default.strip('"')
        else:
            assert stages, f"{path}:{line}: {cmd} before the first FROM"
            stages[-1].instructions.append(Instruction(cmd, args, line))
    return Dockerfile(global_args, stages)


def copy_parts(args: str) -> tuple[dict[str, str], list[str], str]:
    """Flags, sources and destination of a COPY/ADD (shell or JSON form)."""
    flags: dict[str, str] = {}
    rest = args
    while m := re.match(r"--([\w-]+)(?:=(\S*))?\s+", rest):
        flags[m.group(1)] = m.group(2) or ""
        rest = rest[m.end():]
    parts = json.loads(rest) if rest.startswith("[") else rest.split()
    return flags, parts[:-1], parts[-1]


def shell_commands(script: str) -> list[list[str]]:
    """Simple commands of a shell script, split at newlines, ;, &&, || and | outside quotes."""
    # Newlines end commands too, so they are punctuation here rather than whitespace.
    lexer = shlex.shlex(script.replace("\\\n", " "), posix=True, punctuation_chars=";&|()<>\n")
    lexer.whitespace = " \t\r"
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if set(token) <= set(";&|()\n"):
            if current:
                commands.append(current)
            current = []
        else:
            current.append(token)
    if current:
        commands.append(current)
    return commands


@dataclass
class PipInstall:
    constraints: list[str]
    requirements: list[str]
    packages: list[str]
    index_url: str | None
    no_deps: bool
    no_index: bool


PIP_VALUE_OPTIONS = {"-c": "constraints", "--constraint": "constraints", "-r": "requirements",
                     "--requirement": "requirements", "-i": "index_url", "--index-url": "index_url",
                     "--extra-index-url": "index_url", "-f": None, "--find-links": None, "-t": None,
                     "--target": None, "--prefix": None, "--root": None}


def pip_installs(script: str) -> list[PipInstall]:
    found = []
    for words in shell_commands(script):
        for i in range(len(words) - 1):
            pip = Path(words[i]).name in ("pip", "pip3") or (words[i] == "-m" and words[i + 1] == "pip" and i > 0)
            offset = 2 if words[i] == "-m" else 1
            if pip and words[i + offset:i + offset + 1] == ["install"]:
                rest = words[i + offset + 1:]
                break
        else:
            continue
        got = PipInstall([], [], [], None, False, False)
        j = 0
        while j < len(rest):
            word = rest[j]
            opt, eq, value = word.partition("=")
            if opt in PIP_VALUE_OPTIONS:
                if not eq:
                    j += 1
                    value = rest[j]
                slot = PIP_VALUE_OPTIONS[opt]
                if slot == "index_url":
                    got.index_url = value
                elif slot:
                    getattr(got, slot).append(value)
            elif word == "--no-deps":
                got.no_deps = True
            elif word == "--no-index":
                got.no_index = True
            elif not word.startswith("-"):
                got.packages.append(word)
            j += 1
        found.append(got)
    return found


# --------------------------------------------------------------------------- .dockerignore


@dataclass
class IgnoreRule:
    regex: re.Pattern
    negated: bool


def _glob_regex(pattern: str) -> re.Pattern:
    """Docker's pattern syntax (moby/patternmatcher): `*` and `?` stay within one path
    segment, `**` spans any number of them (`**/` also none), `[...]` classes, `\\` escapes."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                out += "(?:.*/)?"
                i += 1
            else:
                out += ".*"
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            end = pattern.index("]", i + 1)
            body = pattern[i + 1:end]
            out += "[" + ("^" + body[1:] if body[:1] in ("!", "^") else body) + "]"
            i = end
        elif c == "\\":
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + r"\Z")


def load_dockerignore(text: str) -> list[IgnoreRule]:
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line[1:].strip() if negated else line).lstrip("/")
        rules.append(IgnoreRule(_glob_regex(pattern), negated))
    return rules


def is_excluded(rules: list[IgnoreRule], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders wins."""
    parts = Path(path).parts
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for rule in rules:
        if any(rule.regex.match(p) for p in prefixes):
            excluded = not rule.negated
    return excluded


@pytest.fixture(scope="module")
def ignore_rules() -> list[IgnoreRule]:
    return load_dockerignore((REPO / ".dockerignore").read_text())


def tracked_files() -> set[str] | None:
    """Files git tracks (what a fresh clone, and so CI, has); None outside a git checkout."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return {p for p in out.decode().split("\0") if p}


def context_copies(df: Dockerfile) -> list[tuple[Stage, Instruction, list[str], str]]:
    """COPY/ADD instructions that read from the build context (not --from another stage)."""
    found = []
    for stage in df.stages:
        for ins in stage.instructions:
            if ins.cmd in ("COPY", "ADD"):
                flags, sources, dest = copy_parts(ins.args)
                if "from" not in flags:
                    found.append((stage, ins, sources, dest))
    return found


def requirement_closure(name: str) -> list[str]:
    """A requirements file and every file it pulls in with -r, in order."""
    files = [name]
    for line in (REPO / name).read_text().splitlines():
        words = line.split()
        if words[:1] in (["-r"], ["--requirement"]):
            files += requirement_closure(words[1])
    return files


def makefile_install() -> PipInstall:
    installs = [p for p in pip_installs((REPO / "Makefile").read_text().replace("$(BIN)/", ""))
                if p.constraints and p.requirements]
    assert len(installs) == 1, "expected one constrained requirements install in the Makefile"
    return installs[0]


# --------------------------------------------------------------------------- matcher self-test


def test_dockerignore_matcher_follows_docker_semantics():
    rules = load_dockerignore("*\n!src\n**/__pycache__\n!keep/**/x.txt\n/abs\ndocs/*.md\n**/*.py[co]\n")
    assert is_excluded(rules, ".venv/bin/python")
    assert is_excluded(rules, "README.md")
    assert not is_excluded(rules, "src")
    assert not is_excluded(rules, "src/saft/cli.py")
    assert is_excluded(rules, "src/saft/__pycache__/cli.cpython-311.pyc")
    assert is_excluded(rules, "src/saft/cli.pyc")
    assert not is_excluded(rules, "keep/a/b/x.txt")
    assert is_excluded(rules, "keep/a/b/y.txt")
    rules = load_dockerignore("abs\ndocs/*.md\nruns\n")
    assert is_excluded(rules, "abs/file") and not is_excluded(rules, "x/abs")
    assert is_excluded(rules, "docs/a.md") and not is_excluded(rules, "docs/sub/a.md")
    assert is_excluded(rules, "runs/demo/metrics.json") and not is_excluded(rules, "src/runs.py")


def test_dockerignore_keeps_local_state_and_credentials_out(ignore_rules):
    for path in (".venv/bin/python", ".git/config", "runs/demo/report.html", "mlruns/0/meta.yaml",
                 "mlflow.db", ".dvc/cache/files/md5/ab/cdef", ".dvc/config.local", ".env",
                 "tests/test_cli.py", ".pytest_cache/v/cache", "src/saft/__pycache__/cli.cpython-311.pyc",
                 "src/saft.egg-info/PKG-INFO", "data/imagenet/train/n01440764/a.JPEG"):
        assert is_excluded(ignore_rules, path), f"{path} would be sent to the Docker daemon"


# --------------------------------------------------------------------------- Dockerfiles


@pytest.fixture(params=sorted(DOCKERFILES), scope="module")
def dockerfile(request) -> tuple[str, Dockerfile]:
    return request.param, parse_dockerfile(DOCKERFILES[request.param])


def test_copy_sources_exist_and_are_in_the_build_context(dockerfile, ignore_rules):
    kind, df = dockerfile
    tracked = tracked_files()
    copies = context_copies(df)
    assert copies, f"{kind}: nothing copied from the build context"
    for _, ins, sources, _ in copies:
        for source in sources:
            where = f"{DOCKERFILES[kind].name}:{ins.line} {source}"
            matches = sorted(glob.glob(source, root_dir=REPO))
            assert matches, f"{where}: no such file in the repository"
            for match in matches:
                match = os.path.normpath(match)
                assert not is_excluded(ignore_rules, match), f"{where}: excluded by .dockerignore"
                if (REPO / match).is_dir():
                    files = [str(p.relative_to(REPO)) for p in (REPO / match).rglob("*") if p.is_file()]
                    if tracked is not None:
                        files = [f for f in files if f in tracked]
                    assert files, f"{where}: no tracked files under it"
                    lost = [f for f in files if is_excluded(ignore_rules, f)]
                    assert not lost, f"{where}: .dockerignore drops tracked files {lost[:5]}"
                elif tracked is not None:
                    assert match in tracked, f"{where}: not tracked by git, a fresh clone lacks it"


def test_images_install_what_make_install_installs(dockerfile):
    kind, df = dockerfile
    make = makefile_install()
    allowed_requirements = requirement_closure(make.requirements[0])
    pins = dict(line.split("==", 1) for line in (REPO / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    locked = project = False
    for stage in df.stages:
        copied: set[str] = set()
        for ins in stage.instructions:
            if ins.cmd == "COPY":
                flags, sources, _ = copy_parts(ins.args)
                copied.update(os.path.normpath(s) for s in sources if "from" not in flags)
            if ins.cmd != "RUN":
                continue
            for pip in pip_installs(ins.args):
                where = f"{DOCKERFILES[kind].name}:{ins.line}"
                if pip.index_url:
                    # Only torch/torchvision may come from another index, at requirements.txt's pins.
                    # (cpu: the CPU wheels; gpu: the CUDA 12.x flavour's wheels, TORCH_CUDA != cu130)
                    wanted = "/whl/cpu" if kind == "cpu" else "/whl/$TORCH_CUDA"
                    assert pip.index_url.startswith("https://download.pytorch.org") and pip.index_url.endswith(wanted), \
                        f"{where}: unexpected index {pip.index_url}"
                    assert pip.no_deps, f"{where}: deps from a non-PyPI index bypass the lock"
                    for spec in pip.packages:
                        if "$(" in spec:  # evaluated as the image's shell would, in the context
                            spec = subprocess.run(["sh", "-c", f'printf %s "{spec}"'], cwd=REPO, check=True,
                                                  capture_output=True, text=True).stdout
                        name, _, version = spec.partition("==")
                        assert name in ("torch", "torchvision"), f"{where}: {spec} from {pip.index_url}"
                        assert version == pins[name], f"{where}: {spec}, requirements.txt pins {pins[name]}"
                if pip.constraints or pip.requirements:
                    assert pip.constraints == make.constraints, f"{where}: constraints {pip.constraints}"
                    assert len(pip.requirements) == 1 and pip.requirements[0] in allowed_requirements, \
                        f"{where}: requirements {pip.requirements} not among {allowed_requirements}"
                    assert {*pip.constraints, *pip.requirements} <= copied, f"{where}: files not copied first"
                    locked = True
                if pip.packages == ["."]:
                    assert pip.no_deps, f"{where}: the project must not re-resolve its dependencies"
                    assert locked, f"{where}: project installed before the locked requirements"
                    assert {"pyproject.toml", "src"} <= copied, f"{where}: project files not copied first"
                    project = True
    assert locked, f"{kind}: no `pip install -c {make.constraints[0]} -r ...`"
    assert project, f"{kind}: the project itself is never installed (`pip install --no-deps .`)"


def _useradd_uid(stage: Stage) -> tuple[str, int] | None:
    for _, ins in stage.of("RUN"):
        for words in shell_commands(ins.args):
            if words and words[0] == "useradd":
                uid = next(int(w.split("=", 1)[1] if "=" in w else words[k + 1])
                           for k, w in enumerate(words) if w in ("-u", "--uid") or w.startswith("--uid="))
                return words[-1], uid
    return None


def test_final_stage_runs_as_non_root_after_installing(dockerfile):
    kind, df = dockerfile
    stage = df.final
    users = stage.of("USER")
    assert users, f"{kind}: the final stage never switches user (runs as root)"
    user_at, user = users[-1]
    name = user.args.split(":")[0]
    created = _useradd_uid(stage)
    assert created, f"{kind}: no useradd in the final stage"
    assert created[1] != 0
    if name.isdigit():
        assert int(name) == created[1] != 0
    else:
        assert name == created[0] and name != "root"
    for i, ins in enumerate(stage.instructions):
        installs = ins.cmd == "RUN" and any(not p.no_index for p in pip_installs(ins.args))
        copies_env = ins.cmd == "COPY" and "from" in copy_parts(ins.args)[0]
        if installs or copies_env:
            assert i < user_at, f"{kind}:{ins.line}: installs after switching to the step user"
    smoke = [ins for i, ins in stage.of("RUN") if i > user_at and "saft --version" in ins.args]
    assert smoke, f"{kind}: no `saft --version` smoke check as the step user"
    entrypoints = stage.of("ENTRYPOINT")
    assert not entrypoints or json.loads(entrypoints[-1][1].args)[:1] == ["saft"]


def test_python3_on_path_is_the_installed_environment(dockerfile):
    """KFP lightweight components run `python3 -m kfp.dsl.executor_main`: python3 on PATH
    must be the venv the build stage installed into and the final stage copied."""
    kind, df = dockerfile
    venvs = {}
    for stage in df.stages:
        for _, ins in stage.of("RUN"):
            for words in shell_commands(ins.args):
                if "-m" in words and words[words.index("-m") + 1:][:1] == ["venv"]:
                    venvs[stage.name] = words[-1]
    copied = [copy_parts(ins.args) for _, ins in df.final.of("COPY")]
    copied = [(flags["from"], src, dest) for flags, src, dest in copied if "from" in flags]
    assert copied, f"{kind}: the final stage copies no environment from a build stage"
    venv = None
    for frm, sources, dest in copied:
        if frm in venvs and sources == [venvs[frm]] and dest.rstrip("/") == venvs[frm]:
            venv = dest.rstrip("/")
    assert venv, f"{kind}: the venv {venvs} is not copied to the same path in the final stage"
    paths = [m.group(1) for _, ins in df.final.of("ENV") for m in [re.search(r"\bPATH=(\S+)", ins.args)] if m]
    assert paths and paths[-1].split(":")[0] == f"{venv}/bin", f"{kind}: PATH does not start with {venv}/bin"
    pip_targets = [p for _, ins in df.final.of("RUN") for p in pip_installs(ins.args) if not p.no_index]
    assert not pip_targets, f"{kind}: the final stage installs packages outside the copied venv"


def test_images_use_the_python_of_the_lock():
    """constraints.txt is a Python 3.11 lock: both images and both workflows use 3.11."""
    lock = ".".join(map(str, sys.version_info[:2]))
    gpu, cpu = (parse_dockerfile(DOCKERFILES[k]) for k in ("gpu", "cpu"))
    assert re.match(rf"python:{re.escape(lock)}[-.@]|python:{re.escape(lock)}$", cpu.external_base(cpu.final))
    interpreters = {w for s in gpu.stages for _, ins in s.of("RUN")
                    for w in re.findall(r"\bpython3\.\d+\b", ins.args)}
    assert interpreters == {f"python{lock}"}, interpreters
    for workflow in ("ci.yml", "retrain.yml"):
        data = yaml.safe_load((WORKFLOWS / workflow).read_text())
        versions = {str(step["with"]["python-version"]) for job in data["jobs"].values() for step in job["steps"]
                    if "setup-python" in step.get("uses", "")}
        assert versions == {lock}, f"{workflow}: {versions}"


def _torch_cuda() -> str | None:
    """torch.version.cuda of the installed torch, read without importing torch."""
    spec = importlib.util.find_spec("torch")
    assert spec and spec.submodule_search_locations, "torch is not installed"
    path = Path(list(spec.submodule_search_locations)[0]) / "version.py"
    module_spec = importlib.util.spec_from_file_location("_torch_version_probe", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.cuda


def _major_minor(version: str) -> str:
    m = re.match(r"(\d+)\.(\d+)", version)
    assert m, version
    return f"{m.group(1)}.{m.group(2)}"


def test_gpu_base_image_matches_torch_cuda():
    df = parse_dockerfile(DOCKERFILES["gpu"])
    base = df.external_base(df.final)
    repo, _, tag = base.partition(":")
    assert repo == "nvidia/cuda", f"GPU image is not built on an nvidia/cuda base: {base}"
    base_cuda = _major_minor(tag)
    locked = re.search(r"^nvidia-cuda-runtime(?:-cu\d+)?==(\S+)", (REPO / "constraints.txt").read_text(), re.M)
    torch_cuda = _torch_cuda()
    assert torch_cuda or locked, "neither the installed torch nor constraints.txt names a CUDA version"
    if torch_cuda:
        assert base_cuda == _major_minor(torch_cuda), f"{base} vs torch built for CUDA {torch_cuda}"
    if locked:
        assert base_cuda == _major_minor(locked.group(1)), f"{base} vs nvidia-cuda-runtime=={locked.group(1)}"


def test_images_carry_oci_labels(dockerfile):
    kind, df = dockerfile
    labels = " ".join(ins.args for _, ins in df.final.of("LABEL"))
    for key in ("title", "description", "source", "licenses", "version", "revision", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels, f"{kind}: no {key} label"
    license_ = re.search(r'license\s*=\s*\{\s*text\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text())
    assert license_ and f'org.opencontainers.image.licenses="{license_.group(1)}"' in labels


# --------------------------------------------------------------------------- the installed package


def test_package_built_from_the_image_context_ships_its_data(tmp_path, ignore_rules):
    """Build the wheel from exactly what the GPU Dockerfile copies (after .dockerignore) and
    import it from a plain install: the tiny checkpoint, model configs and dataset specs
    must travel with the package, as they must in the image."""
    df = parse_dockerfile(DOCKERFILES["gpu"])
    context = tmp_path / "context"
    for _, ins, sources, dest in context_copies(df):
        for source in sources:
            # The build stage mirrors the repository layout under its WORKDIR, so copying
            # each source to the same relative path reproduces it.
            assert dest.rstrip("/") in (".", "./" + source, source), f"line {ins.line}: {dest} changes the layout"
            for match in glob.glob(source, root_dir=REPO):
                root = REPO / match
                files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
                for f in files:
                    rel = str(f.relative_to(REPO))
                    if not is_excluded(ignore_rules, rel):
                        (context / rel).parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(f, context / rel)
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull}
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    str(context), "-w", str(dist)], check=True, env=env, cwd=tmp_path)
    wheels = list(dist.glob("saft-*.whl"))
    assert len(wheels) == 1, wheels
    members = set(zipfile.ZipFile(wheels[0]).namelist())

    package_data = {str(p.relative_to(REPO / "src")) for pattern in ("**/*.json", "**/*.yaml", "**/*.safetensors")
                    for p in (REPO / "src" / "saft").glob(pattern)}
    tracked = tracked_files()
    if tracked is not None:
        package_data = {p for p in package_data if f"src/{p}" in tracked}
    assert "saft/models/tiny/saft-tiny-clip.safetensors" in package_data
    assert any(p.startswith("saft/models/configs/") for p in package_data)
    assert any(p.startswith("saft/data/specs/") for p in package_data)
    missing = sorted(package_data - members)
    assert not missing, f"the wheel lacks package data: {missing}"
    entry_points = next(m for m in members if m.endswith(".dist-info/entry_points.txt"))
    assert "saft = saft.cli:main" in zipfile.ZipFile(wheels[0]).read(entry_points).decode()

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--target", str(site), str(wheels[0])], check=True, env=env, cwd=tmp_path)
    probe = ("import saft, saft.models.tiny as tiny; "
             "print(saft.__file__); print(tiny.CHECKPOINT); saft.load_model('tiny')")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                         env={**env, "PYTHONPATH": str(site)})
    assert out.returncode == 0, out.stderr[-2000:]
    module_file, checkpoint = out.stdout.split()[-2:]
    assert Path(module_file).is_relative_to(site), f"imported {module_file}, not the built wheel"
    assert Path(checkpoint).is_relative_to(site) and Path(checkpoint).is_file()


# --------------------------------------------------------------------------- workflows


def load_workflow(name: str) -> dict:
    data = yaml.safe_load((WORKFLOWS / name).read_text())
    # YAML 1.1 reads the bare key `on` as the boolean True.
    if True in data:
        data["on"] = data.pop(True)
    return data


def run_scripts(data: dict) -> list[tuple[dict, str]]:
    return [(step, step["run"]) for job in data["jobs"].values() for step in job["steps"] if "run" in step]


def with_placeholders(script: str) -> str:
    """GitHub expressions and shell variables replaced by plain words, so the command line
    can be split and parsed as the shell would after expansion."""
    script = re.sub(r"\$\{\{.*?\}\}", "GH_EXPRESSION", script)
    script = re.sub(r"\$\{[^}]*\}", "SHELL_VALUE", script)
    return re.sub(r"\$\w+", "SHELL_VALUE", script)


def saft_commands(data: dict) -> list[list[str]]:
    return [words for _, script in run_scripts(data) for words in shell_commands(with_placeholders(script))
            if words and Path(words[0]).name == "saft"]


def option(words: list[str], name: str) -> str | None:
    for k, word in enumerate(words):
        if word == name:
            return words[k + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return None


def test_retrain_workflow_triggers():
    on = load_workflow("retrain.yml")["on"]
    assert set(on) >= {"push", "pull_request", "workflow_dispatch"}
    assert "main" in on["push"]["branches"]
    assert set(on["push"]["paths"]) >= {"**/*.dvc", "params.yaml", "dvc.lock"}
    assert set(on["pull_request"]["paths"]) == set(on["push"]["paths"])
    inputs = on["workflow_dispatch"]["inputs"]
    assert "image_tag" in inputs and "experiment" in inputs
    assert "schedule" not in on, "scheduled retraining belongs to KFP recurring runs"


def test_retrain_workflow_secrets_only_as_step_env():
    data = load_workflow("retrain.yml")
    found = []

    def walk(node, path):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, path + (key,))
        elif isinstance(node, list):
            for k, value in enumerate(node):
                walk(value, path + (k,))
        elif isinstance(node, str) and "secrets." in node:
            found.append((path, node))

    walk(data, ())
    assert {p[-1] for p, _ in found} >= {"KFP_HOST", "KFP_TOKEN"}
    for path, value in found:
        assert re.fullmatch(r"\$\{\{\s*secrets\.\w+\s*\}\}", value), f"{path}: {value}"
        # step-level env only: the other steps (third-party actions included) never see them
        assert path[-2] == "env" and "steps" in path, f"{path}: secrets outside a step's env mapping"
    for step, script in run_scripts(data):
        assert "KFP_TOKEN" not in script, f"{step.get('name')}: the token is on a command line"
        assert "KFP_HOST" not in script.replace('--host "$KFP_HOST"', ""), f"{step.get('name')}: KFP_HOST used"
        assert not re.search(r"^\s*set\s+-\w*x", script, re.M), f"{step.get('name')}: set -x echoes values"


def test_retrain_workflow_installs_like_make_and_keeps_the_compiled_yaml():
    data = load_workflow("retrain.yml")
    scripts = "\n".join(script for _, script in run_scripts(data))
    make = makefile_install()
    by_make = any(words[:2] == ["make", "install"] for words in shell_commands(scripts))
    by_pip = any(p.constraints == make.constraints for p in pip_installs(scripts))
    assert by_make or by_pip, "retrain does not install under the lock"
    commands = saft_commands(data)
    compiles = [w for w in commands if w[1:3] == ["pipeline", "compile"]]
    submits = [w for w in commands if w[1:3] == ["pipeline", "submit"]]
    assert len(compiles) == 1 and len(submits) == 1, commands
    assert option(compiles[0], "--pipeline") == option(submits[0], "--pipeline") == "retrain"
    out = option(compiles[0], "--out")
    assert option(compiles[0], "--image"), "compile without --image uses no project image"
    assert option(submits[0], "--package") == out
    for name in ("--host", "--params", "--experiment", "--run-name", "--revision", "--timeout", "--summary"):
        assert option(submits[0], name), f"submit without {name}"
    assert "--wait" in submits[0]
    uploads = [step for job in data["jobs"].values() for step in job["steps"]
               if "actions/upload-artifact" in step.get("uses", "")]
    assert uploads and uploads[0]["with"]["path"] == out


def _expand(script: str, env: dict[str, str]) -> str:
    """The shell's variable expansion of ``script`` with ``env`` (GitHub expressions resolved first)."""
    script = re.sub(r"\$\{\{.*?\}\}", "GH_EXPRESSION", script)
    return re.sub(r"\$\{?(\w+)\}?", lambda m: env[m.group(1)], script)


def _step(data: dict, name: str) -> dict:
    return next(step for job in data["jobs"].values() for step in job["steps"] if step.get("name") == name)


def test_retrain_workflow_submits_the_triggering_revision_and_reports_the_run(tmp_path, monkeypatch):
    """The workflow's own commands, run with the real CLI in a git + DVC checkout: the commit
    that triggered it reaches the submitted run as data.rev; after the (bounded) wait the job
    summary and the pull-request comment hold the results table and the registry decision,
    read from what the pipeline's finish-run task leaves on its MLflow parent run."""
    from dvc_repos import make_dvc_repo
    from fake_kfp import fake_kfp_server, submitted_run

    from saft.cli import main
    from saft.orchestration.parent_run import PIPELINE_RUN_ENV
    from saft.orchestration.tasks import finish_task, start_task

    data = load_workflow("retrain.yml")
    job = data["jobs"]["retrain"]
    assert "DATA_REV" in job["env"] and "pull_request.head.sha" in job["env"]["DATA_REV"]
    comment = _step(data, "Comment on the pull request")
    assert "pull_request" in comment["if"] and "always()" in comment["if"]
    assert shell_commands(comment["run"])[0][:3] == ["gh", "pr", "comment"]
    assert option(shell_commands(comment["run"])[0], "--body-file") == "retrain-summary.md"

    checkout = tmp_path / "checkout"
    _, rev2 = make_dvc_repo(checkout, monkeypatch)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["root"] = "data/ds"
    (checkout / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(checkout)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("SAFT_PARENT_RUN_ID", raising=False)
    monkeypatch.delenv("SAFT_TRACKING", raising=False)

    # what the retrain run leaves in MLflow: its parent run, tagged with the KFP run id, holding the table and decision
    monkeypatch.setenv(PIPELINE_RUN_ENV, "run-42")
    start_task({"data": params["data"]}, "saft-retrain", True)
    results, decision = tmp_path / "results", tmp_path / "decision"
    results.mkdir()
    decision.mkdir()
    (results / "results.md").write_text("method  ID  OOD mean\nsaft    61.3  66.8\n")
    (decision / "register.json").write_text(json.dumps({"verdict": "rejected", "version": "2",
                                                       "summary": "saft-tiny v2: rejected (OOD mean drop)"}))
    finish_task(True, results_dir=str(results), decision_dir=str(decision))
    monkeypatch.delenv(PIPELINE_RUN_ENV)

    summary = tmp_path / "step-summary.md"
    summary.write_text("# earlier steps\n")
    with fake_kfp_server(monkeypatch) as (host, requests):
        env = {**job["env"], "IMAGE": "registry.example.com/ml/saft:1.2.3", "KFP_HOST": host, "DATA_REV": rev2,
               "REPO_URL": "https://github.example.com/acme/saft", "EXPERIMENT": "saft-retrain",
               "GITHUB_STEP_SUMMARY": str(summary)}
        for step in ("Compile pipeline", "Submit, wait, summarize"):
            for words in shell_commands(_expand(_step(data, step)["run"], env)):
                if words and words[0] == "saft":
                    assert main(words[1:]) == 0, words
        run = submitted_run(requests)
    parameters = run["runtime_config"]["parameters"]
    assert parameters["data_rev"] == rev2 and parameters["data_root"] == "data/ds"
    assert parameters["data_repo"] == "https://github.example.com/acme/saft"
    assert run["display_name"] == f"retrain-{rev2}"
    spec = run["pipeline_spec"]
    assert spec.get("pipeline_spec", spec)["pipelineInfo"]["name"] == "saft-retrain"
    for path in (summary, checkout / "retrain-summary.md"):
        text = path.read_text()
        assert "## saft retrain: run `run-42` succeeded" in text and f"Data revision: `{rev2}`" in text
        assert "saft    61.3  66.8" in text and "**Registry: rejected**" in text
    assert summary.read_text().startswith("# earlier steps\n")  # appended, as GitHub expects


def _has_pipeline_command() -> bool:
    from saft.cli import build_parser

    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return "pipeline" in subcommands.choices


def test_workflow_saft_commands_parse_with_the_cli(capsys):
    from saft.cli import build_parser

    commands = saft_commands(load_workflow("retrain.yml"))
    assert commands
    if not _has_pipeline_command():
        pytest.xfail("`saft pipeline` (compile/submit/schedule/run) has not landed in saft.cli yet")
    for words in commands:
        try:
            build_parser().parse_args(words[1:])
        except SystemExit as exc:
            pytest.fail(f"`{shlex.join(words)}` does not parse (exit {exc.code}): {capsys.readouterr().err}")


def test_ci_workflow_runs_the_ci_entry_point():
    data = load_workflow("ci.yml")
    assert {"push", "pull_request"} <= set(data["on"])
    scripts = [script.strip() for _, script in run_scripts(data)]
    assert ".ci/run" in scripts
    entry = REPO / ".ci" / "run"
    assert os.access(entry, os.X_OK) and "make test" in entry.read_text()


def test_gpu_image_cuda12_flavour_is_a_consistent_build_argument():
    """TORCH_CUDA (the torch wheel's CUDA) defaults to the base image's CUDA, and a 12.x build is one argument pair."""
    text = DOCKERFILES["gpu"].read_text()
    base = re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:(\S+)", text, re.M)
    torch_cuda = re.search(r"^ARG TORCH_CUDA=cu(\d+)$", text, re.M)
    assert base and torch_cuda, "docker/Dockerfile lost its CUDA_IMAGE / TORCH_CUDA build arguments"
    assert _major_minor(base.group(1)).replace(".", "") == torch_cuda.group(1), (base.group(1), torch_cuda.group(1))
    # a non-default TORCH_CUDA installs torch from PyTorch's index for it, at the locked version
    assert 'download.pytorch.org/whl/$TORCH_CUDA' in text
    assert re.search(r'"torch==\$\(sed -n .s/\^torch==//p. requirements.txt\)"', text)
    # the documented 12.x pair agrees with itself, and the build refuses a mismatched pair
    pair = re.search(r"CUDA_IMAGE=nvidia/cuda:(12\.\d+)\.\d+-base\S* --build-arg TORCH_CUDA=cu(\d+)", text)
    assert pair and pair.group(1).replace(".", "") == pair.group(2)
    assert "torch.version.cuda" in text and "CUDA_VERSION" in text
