"""`import saft` makes a frozen linear layer with a non-contiguous 3-D input take the flattened
matmul (TORCH_LINEAR_FLATTEN_3D), the path trainable weights take anyway: the batched matmul
torch uses otherwise copies its operands under CPU bf16 autocast (docs/library.md#speed-and-memory).

Each case runs in a fresh interpreter: torch reads the variable once per process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# A frozen self-attention block as open_clip builds it (batch_first), forward and input-gradient
# backward under bf16 autocast; prints the aten matmul ops it dispatched.
PROBE = """
import os, sys
if sys.argv[1] == "saft":
    import saft  # noqa: F401
import torch
from torch.utils._python_dispatch import TorchDispatchMode

class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = set()
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

attn = torch.nn.MultiheadAttention(64, 4, batch_first=True).requires_grad_(False)
x = torch.randn(3, 7, 64, requires_grad=True)
with Ops() as ops:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = attn(x, x, x, need_weights=False)
    y.float().sum().backward()
print(os.environ.get("TORCH_LINEAR_FLATTEN_3D"), " ".join(sorted(n for n in ops.seen if "mm" in n)))
"""


def _probe(importing: str, **env: str) -> tuple[str, set[str]]:
    environ = {k: v for k, v in os.environ.items() if k != "TORCH_LINEAR_FLATTEN_3D"} | env
    out = subprocess.run([sys.executable, "-c", PROBE, importing], env=environ, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    value, *ops = out.stdout.split()
    return value, set(ops)


@pytest.mark.parametrize("importing", ["saft", "torch only"])
def test_frozen_attention_takes_the_flattened_matmul_once_saft_is_imported(importing):
    value, ops = _probe(importing)
    if importing == "saft":
        assert value == "1"
        assert "bmm" not in ops and ops & {"addmm", "mm"}, ops
    else:  # the control: without the setting torch takes the batched matmul this guards against
        assert value == "None"
        assert "bmm" in ops, ops


def test_a_value_the_user_set_is_kept():
    value, ops = _probe("saft", TORCH_LINEAR_FLATTEN_3D="0")
    assert value == "0" and "bmm" in ops, ops
