"""Comparisons of tensors: relative errors, cosines, unit-in-the-last-place closeness."""

from __future__ import annotations

from typing import Dict

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor, min_norm: float = 1e-30) -> float:
    """``|a - b| / |b|`` in fp64 (Frobenius norms), ``|b|`` floored at ``min_norm``. With
    ``min_norm=0`` a zero reference gives nan (0/0) or inf, which fails any ``<`` bound."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(min_norm))


def worst_rel_err(got: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor]) -> float:
    """The largest :func:`rel_err` over the tensors of ``ref`` (gradients by name); every reference
    must be finite and non-zero (else the comparison would not test it)."""
    assert got.keys() == ref.keys()
    for name, g in ref.items():
        assert torch.isfinite(g).all(), name
        assert g.norm() > 0, f"reference gradient of {name} is zero: the test would not test it"
    return max(rel_err(got[n], ref[n]) for n in ref)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of the flattened tensors, in fp64."""
    a, b = a.double().flatten(), b.double().flatten()
    return float(torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-30))


def lora_cosines(got: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """:func:`cosine` of every LoRA tensor (``lora_`` in its name) of ``ref``."""
    return {n: cosine(got[n], ref[n]) for n in ref if "lora_" in n}


def ulp_close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, fp32_tol: float, slack: float) -> bool:
    """``a`` equals the reference ``b`` but for the final rounding to ``dtype``: within one unit in
    the last place of bf16/fp16 (relative to ``|b|``) plus ``slack``; for fp32, ``allclose`` with
    ``rtol = atol = fp32_tol``."""
    if dtype == torch.float32:
        return torch.allclose(a.float(), b.float(), rtol=fp32_tol, atol=fp32_tol)
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    return bool(((a.float() - b.float()).abs() <= ulp * b.float().abs() + slack).all())
