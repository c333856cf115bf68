"""Why a CUDA-graph capture gets invalidated with cold caches (BENCHMARKS run 18). GPU only.

``python benchmarks/probe_capture_collections.py collect graph|event``
    An earlier CUDAGraph (or a recorded CUDA event) left in a garbage reference cycle, then 20
    captures that each call ``gc.collect()`` inside, which frees it there: does freeing it inside
    a capture invalidate the capture?

``python benchmarks/probe_capture_collections.py tests pause|plain``
    The real-capture GPU tests (``tests/test_cuda_graphs.py -m gpu``, stopping at the first
    failure), with hyclora's collector pause or with it patched out, printing what runs inside a
    capture: cyclic collections, Triton compiles (in-process cache misses) and hyclora tunings
    (the INFO lines of the ``hyclora.kernels.tuning`` logger). Remove ``~/.triton/cache`` and ``~/.cache/hyclora`` first for cold caches.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import sys

import torch


def capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def collect_inside(kind: str, captures: int = 20) -> None:
    x = torch.zeros(64, device="cuda")
    gc.disable()  # the garbage must survive until the collection inside the capture
    freed = 0
    for i in range(captures):
        if kind == "graph":
            earlier = torch.cuda.CUDAGraph()
            with torch.cuda.graph(earlier):
                x.add_(1)
        else:
            earlier = torch.cuda.Event(enable_timing=True)
            earlier.record()
        cycle = [earlier]
        cycle.append(cycle)
        del earlier, cycle
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                y = x * 3
                freed += gc.collect()
                out = y * 2
        except Exception as exc:  # the finding, not an error of this script
            print(f"{kind}: capture {i} failed: {type(exc).__name__}: {str(exc)[:300]}")
            return
        x.fill_(2)
        graph.replay()
        torch.cuda.synchronize()
        assert out[0].item() == 12.0, out[0].item()
    print(f"{kind}: {captures} of {captures} captures held with a collection inside each "
          f"({freed} objects freed inside captures)")


def traced_tests(mode: str) -> int:
    import pytest
    import triton

    import hyclora.cuda_graphs as cuda_graphs

    if mode == "plain":
        cuda_graphs.no_cyclic_gc = contextlib.nullcontext

    def on_collection(phase, info):
        if phase == "stop" and capturing():
            print(f"\n[collection inside a capture: generation {info['generation']}, "
                  f"collected {info['collected']}]", flush=True)

    def on_compile(*, repr, **_):
        if capturing():
            print(f"\n[Triton compile inside a capture: {repr[:160]}]", flush=True)
        return None  # compile as usual

    class OnTuning(logging.Handler):
        def emit(self, record):
            if capturing():
                print(f"\n[hyclora tuning inside a capture: {record.getMessage()[:160]}]", flush=True)

    gc.callbacks.append(on_collection)
    triton.knobs.runtime.jit_cache_hook = on_compile
    tuning = logging.getLogger("hyclora.kernels.tuning")
    tuning.setLevel(logging.INFO)
    tuning.addHandler(OnTuning())
    return pytest.main(["-v", "-s", "-x", "-p", "no:cacheprovider", "-m", "gpu", "tests/test_cuda_graphs.py"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="probe", required=True)
    sub.add_parser("collect").add_argument("kind", choices=("graph", "event"))
    sub.add_parser("tests").add_argument("mode", choices=("pause", "plain"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    if args.probe == "collect":
        collect_inside(args.kind)
        return 0
    return int(traced_tests(args.mode))


if __name__ == "__main__":
    sys.exit(main())
