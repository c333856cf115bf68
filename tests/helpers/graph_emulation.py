"""CPU emulations of CUDA graph capture, for the dispatcher of ``hyclora.cuda_graphs``.

:func:`emulated_grapher` stands in for ``torch.cuda.make_graphed_callables`` (same call surface and
the same static-buffer semantics: one static input per sample arg, copied into unless it is the
same storage; one saved forward per callable, replaced by the next forward; a static output
buffer returned detached; the gradients copied out of static buffers, as ``graph_layer_chain``
returns them); :class:`EmulatedCapture` for ``CudaGraphCapture``, so that
:func:`chain_grapher` runs ``graph_layer_chain`` on the CPU. Everything except the CUDA capture
itself is exercised.
"""

from __future__ import annotations

import torch

from hyclora.cuda_graphs import graph_layer_chain


def emulated_grapher(callables, sample_args, num_warmup_iters=3, allow_unused_input=False, pool=None,
                     shared_hidden=None, warm_up=None):  # outputs of their own: what make_graphed_callables returns
    # warm-ups and capture launch the fused LoRA kernels at any token count (free at replay):
    # the dispatcher runs the grapher inside hyclora.models.kernels_for_graph_capture
    assert all(c.layer._hyclora_patch.under_graph_capture for c in callables if hasattr(c, "layer"))
    calls = []
    for i, (c, args) in enumerate(zip(callables, sample_args)):
        params = tuple(c.parameters())
        surface = tuple(args) + params
        warmed = warm_up is None or i in warm_up
        for _ in range(num_warmup_iters if warmed else 0):  # like the real one: forward + grad on the samples
            y = c(*args)
            torch.autograd.grad(y, [t for t in surface if t.requires_grad], torch.ones_like(y),
                                allow_unused=allow_unused_input)
        if hasattr(c, "layer") and warmed:  # the warm-ups ran with the capture policy
            assert c.layer._hyclora_patch.setup[1][2].lora_kernels_min_tokens == 0
        calls.append(_emulated(c, tuple(args), params))
    emulated_grapher.captures += 1
    return tuple(calls)


emulated_grapher.captures = 0


def _emulated(c, static_args, params):
    n = len(static_args)
    surface = static_args + params
    held = {}

    class Emulated(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            for s, x in zip(static_args, inputs[:n]):
                if s.data_ptr() != x.data_ptr():
                    s.data.copy_(x)  # a graph replay checks no version counters either
            with torch.enable_grad():
                y = c(*static_args)
            held["y"] = y  # the graph's saved activations: one set per callable
            if "out" not in held:
                held["out"] = torch.empty_like(y)
            held["out"].copy_(y.detach())
            return held["out"].detach()

        @staticmethod
        def backward(ctx, g):
            need = [t for t in surface if t.requires_grad]
            grads = torch.autograd.grad(held["y"], need, g)
            if "grads" not in held:
                held["grads"] = [torch.empty_like(t) for t in grads]
            for buf, t in zip(held["grads"], grads):
                buf.copy_(t)
            it = iter(held["grads"])  # copies out of the static buffers, as graph_layer_chain hands out
            return tuple(next(it).clone() if t.requires_grad else None for t in surface)

    def run(*user_args):
        return Emulated.apply(*(tuple(user_args) + params))

    return run


class EmulatedCapture:
    """CPU stand-in for ``hyclora.cuda_graphs.CudaGraphCapture``: a "graph" keeps its function and
    the tensors it returned at capture; ``replay()`` runs the function again (with grad, as the
    captured kernels would compute) and copies the new values into those tensors, what a CUDA
    graph replay does to its static memory. So ``graph_layer_chain``'s buffer sharing (one
    incoming- and one input-gradient buffer for all layers) runs on the CPU."""

    def warm_up(self, fn):
        fn()

    def capture(self, fn):
        result = fn()
        return _EmulatedGraph(fn, result), result


class _EmulatedGraph:
    def __init__(self, fn, result):
        self.fn, self.result = fn, result

    def replay(self):
        with torch.enable_grad():
            new = self.fn()
        static = self.result if isinstance(self.result, tuple) else (self.result,)
        new = new if isinstance(new, tuple) else (new,)
        with torch.no_grad():
            for buf, value in zip(static, new):
                if buf is not None:
                    buf.copy_(value)


def chain_grapher(callables, sample_args, num_warmup_iters=3, allow_unused_input=False, shared_hidden=None,
                  warm_up=None):
    return graph_layer_chain(callables, sample_args, num_warmup_iters, allow_unused_input,
                             shared_hidden=shared_hidden, warm_up=warm_up, _capture=EmulatedCapture())
