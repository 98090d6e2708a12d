"""A differentiable attention op from two kernel launchers, the way our Triton kernels are called.

    call, forward_op = attention_op("band_attention", launch_forward, launch_backward, forward_fake,
                                    backward_fake, tensors=3)
    o = call(q, k, v, window)            # differentiable; under torch.compile through the custom ops

`launch_forward(*tensors, *consts) -> (o, aux)` runs the forward kernel (aux: what the backward needs
besides the inputs and o, e.g. the log-sum-exp); `launch_backward(grad_o, *tensors, o, aux, *consts)`
returns the inputs' gradients (a tuple, or one tensor for one input). Both need type annotations:
torch.library reads the ops' schemas from them. The fakes take the same arguments and return empty
tensors of the outputs' shapes.

Under torch.compile the call goes through two torch.library custom ops (`imagegen::<name>_fwd` and
`_bwd`; opaque to the compiler, with fake shapes and a registered backward the compiler traces). Eager
calls go through an autograd.Function that calls the launchers directly: going through the dispatcher
costs more host time than these kernels take on the GPU (`scripts/benchmark.py calls`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def attention_op(name: str, launch_forward: Callable, launch_backward: Callable, forward_fake: Callable,
                 backward_fake: Callable, tensors: int) -> tuple[Callable, object]:
    """-> (call, the forward custom op). The first `tensors` arguments are tensors (they get gradients),
    the rest constants (ints, bools)."""
    forward_op = torch.library.custom_op(f"imagegen::{name}_fwd", launch_forward, mutates_args=())
    forward_op.register_fake(forward_fake)
    backward_op = torch.library.custom_op(f"imagegen::{name}_bwd", launch_backward, mutates_args=())
    backward_op.register_fake(backward_fake)

    def grads(result, consts) -> tuple:
        return (*(result if isinstance(result, tuple) else (result,)), *(None for _ in consts))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:tensors], *output)
        ctx.consts = inputs[tensors:]

    def backward(ctx, grad_out, grad_aux):
        return grads(backward_op(grad_out, *ctx.saved_tensors, *ctx.consts), ctx.consts)

    forward_op.register_autograd(backward, setup_context=setup_context)

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            out, aux = launch_forward(*args)
            ctx.save_for_backward(*args[:tensors], out, aux)
            ctx.consts = args[tensors:]
            return out

        @staticmethod
        def backward(ctx, grad_out):
            return grads(launch_backward(grad_out, *ctx.saved_tensors, *ctx.consts), ctx.consts)

    Eager.__name__ = f"Eager_{name}"

    def call(*args):
        if torch.compiler.is_compiling():
            return forward_op(*args)[0]
        return Eager.apply(*args)

    return call, forward_op


def compile_options(warps: int, stages: int | None = None, registers: int = 0) -> dict:
    """A Triton launch's compile options: warps, pipeline stages (None: Triton's default) and, where set, a limit
    on registers per thread (maxnreg; 0: the compiler's choice)."""
    options = {"num_warps": warps}
    if stages is not None:
        options["num_stages"] = stages
    if registers:
        options["maxnreg"] = registers
    return options
