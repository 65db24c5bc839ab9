"""Every hint names a command or flag that exists: the strings of src/saft are searched for `saft ...` commands
and --flags, and each is looked up in the real command line."""

from __future__ import annotations

import argparse
import ast
import re
import shlex
from pathlib import Path

from saft.cli import build_parser

SRC = Path(__file__).resolve().parents[1] / "src" / "saft"
COMMAND = re.compile(r"`saft ([^`]+)`")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9]*(?:-[a-z0-9]+)*)")
# flags of other programs that our messages name (torchrun, dvc, pip, docker, open_clip's own tools)
FOREIGN = {"--nproc_per_node", "--standalone", "--force", "--no-deps", "--build-arg", "--index-url", "--extra-index-url",
           "--dry-run", "--cpus", "--name-only", "--all", "--env-manager", "--function"}


def _strings() -> list[tuple[Path, int, str]]:
    """The string literals of src/saft that reach users: every one but the docstrings."""
    out = []
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
                and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, (ast.Constant, ast.JoinedStr))}
        for node in ast.walk(tree):
            if id(node) in docs:
                continue
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                out.append((path, node.lineno, node.value))
            elif isinstance(node, ast.JoinedStr):
                text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
                out.append((path, node.lineno, text))
    return out


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _all_options(parser: argparse.ArgumentParser) -> set[str]:
    found = {o for a in parser._actions for o in a.option_strings}
    for sub in _subparsers(parser).values():
        found |= _all_options(sub)
    return found


def _leaf(words: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    parser, rest = build_parser(), list(words)
    while rest and rest[0] in _subparsers(parser):
        parser = _subparsers(parser)[rest.pop(0)]
    return parser, rest


def test_every_saft_command_named_in_a_message_exists_with_its_flags() -> None:
    bad = []
    for path, line, text in _strings():
        for match in COMMAND.finditer(text):
            command = match.group(1).replace("{}", "X")
            if any(c in command for c in "|<>") or "ARGV" in command:
                continue  # a pattern of commands, not one
            try:
                words = shlex.split(command)
            except ValueError:
                words = command.split()
            parser, rest = _leaf(words)
            if _subparsers(parser) and rest:  # stopped on a group: the next word is no command of it
                bad.append(f"{path.relative_to(SRC)}:{line}: `saft {command}` names no command")
                continue
            options = {o for a in parser._actions for o in a.option_strings}
            for word in rest:
                flag = word.split("=", 1)[0]
                if flag.startswith("--") and flag not in options:
                    bad.append(f"{path.relative_to(SRC)}:{line}: `saft {command}`: {flag} is no flag of it")
    assert not bad, "\n".join(bad)


def test_every_flag_named_in_a_message_exists_somewhere() -> None:
    known = _all_options(build_parser()) | FOREIGN
    bad = sorted({f"{path.relative_to(SRC)}:{line}: {flag}" for path, line, text in _strings()
                  for flag in FLAG.findall(text) if flag not in known and " " in text.strip()})
    assert not bad, "flags that no saft command takes:\n" + "\n".join(bad)


def test_a_mistyped_dataset_name_gets_the_closest_supported_one(tmp_path: Path, capsys) -> None:
    from saft.cli import main

    assert main(["data", "prepare", str(tmp_path), "--out", str(tmp_path / "out"), "--dataset", "imagenett"]) != 0
    err = capsys.readouterr().err
    assert "dataset 'imagenett' is not supported (did you mean imagenet?)" in err and "imagefolder" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["data", "prepare", str(tmp_path), "--out", str(tmp_path / "out"), "--dataset", "cifar10"]) != 0
    assert "did you mean" not in capsys.readouterr().err  # no far-fetched guess (ucf101)
