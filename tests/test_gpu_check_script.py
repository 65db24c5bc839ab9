"""scripts/gpu-check.sh: valid shell, refuses without a GPU, and every saft command in it parses."""

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import torch

from saft.cli import build_parser

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu-check.sh"


def test_the_script_is_valid_shell():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the script would run for real")
def test_without_a_gpu_it_stops_at_once_and_says_why(tmp_path):
    done = subprocess.run([str(SCRIPT), str(tmp_path / "r.json")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no CUDA device visible" in done.stderr
    assert not (tmp_path / "r.json").exists()


def test_its_saft_commands_parse_with_the_cli():
    commands = re.findall(r'"\$saft" (bench \w+ [^>]+)>', SCRIPT.read_text().replace("\\\n", " "))
    assert {c.split()[1] for c in commands} == {"step", "eval"}
    for command in commands:
        args = build_parser().parse_args(shlex.split(command.replace('"$work/', '"/tmp/')))
        assert args.device == "cuda"
