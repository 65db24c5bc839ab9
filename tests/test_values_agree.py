"""The rule N-process trained values are held to against one process (saft.sparse.distributed.VALUES_RULE)."""

from __future__ import annotations

import torch

from saft.sparse.distributed import NEAR_TIE_SHARE, NEAR_TIE_TOLERANCE, VALUE_TOLERANCE, values_agree


def _values(n: int = 4000) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(0)) * 1e-2


def test_rounding_level_differences_agree():
    ref = _values()
    check = values_agree(ref, ref + VALUE_TOLERANCE * 0.5 * float(ref.abs().max()))
    assert check["passed"] and check["beyond_tolerance"] == 0


def test_every_entry_off_is_refused():
    ref = _values()
    check = values_agree(ref, ref + VALUE_TOLERANCE * 2 * float(ref.abs().max()))
    assert not check["passed"] and check["beyond_tolerance"] == ref.numel()


def test_a_few_near_ties_pass_within_their_bound_and_no_further():
    ref, scale = _values(), float(_values().abs().max())
    allowed = int(NEAR_TIE_SHARE * ref.numel())
    few = ref.clone()
    few[:allowed] += NEAR_TIE_TOLERANCE * 0.5 * scale
    assert values_agree(ref, few)["passed"]
    many = ref.clone()
    many[: allowed + 1] += NEAR_TIE_TOLERANCE * 0.5 * scale
    assert not values_agree(ref, many)["passed"]
    far = ref.clone()
    far[0] += NEAR_TIE_TOLERANCE * 2 * scale
    assert not values_agree(ref, far)["passed"]


def test_a_one_entry_tensor_and_a_shape_mismatch():
    one = torch.tensor([0.01])
    assert values_agree(one, one + 1e-6)["passed"]
    assert not values_agree(one, one + 1.0)["passed"]
    mismatch = values_agree(_values(10), _values(11))
    assert not mismatch["passed"] and mismatch["max_abs_diff"] == float("inf")
