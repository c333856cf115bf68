"""Where the Triton kernels run: compiled on CUDA, or interpreted on the CPU under
``TRITON_INTERPRET=1`` (set by ``make test``; it must be set before Python starts). And their
ahead-of-time compile for the H200 (sm_90), which needs no GPU."""

from __future__ import annotations

import os
import sys

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_TRITON_DEVICE = INTERPRET or torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not HAS_TRITON_DEVICE, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if (torch.cuda.is_available() and not INTERPRET) else "cpu"  # where the kernels' tensors live


_AOT_SCRIPT = r"""
import importlib, json, os, subprocess, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
out = []
for case in json.loads(sys.argv[1]):
    kern = getattr(importlib.import_module(case["module"]), case["kernel"])
    sig = {}
    for p in kern.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name in case["ptrs"]:
            sig[p.name] = "*" + case["ptrs"][p.name]
        else:
            sig[p.name] = "fp32" if p.name in case["floats"] else "i32"
    ck = triton.compile(ASTSource(fn=kern, signature=sig, constexprs=case["consts"]),
                        target=GPUTarget("cuda", 90, 64),
                        options=dict(num_warps=case["warps"], enable_fp_fusion=False))
    with open("k.cubin", "wb") as fh:
        fh.write(ck.asm["cubin"])
    res = subprocess.run([cuobjdump, "-res-usage", "k.cubin"], capture_output=True, text=True).stdout
    line = next(l for l in res.splitlines() if "REG:" in l)
    usage = dict(kv.split(":") for kv in line.split() if ":" in kv)
    out.append([case["tag"], int(usage["REG"]), int(usage["STACK"]), int(usage["LOCAL"])])
print("RESULT" + json.dumps(out))
"""


def compile_for_sm90(cases, tmp_path):
    """Compile Triton kernels ahead of time for sm_90 in a subprocess without TRITON_INTERPRET
    (the interpreter replaces @triton.jit); returns ``[tag, registers, stack, local]`` per case,
    read from the cubin with Triton's bundled cuobjdump. Skips when ptxas is unavailable."""
    import json
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, json.dumps(cases)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    if "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("Triton's ptxas is not available here")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.split("RESULT", 1)[1])
    print("sm_90 resource usage [case, registers, stack, local]:", results)
    assert len(results) == len(cases)
    return results
