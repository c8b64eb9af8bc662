"""Gradients under CUDA-graph replay (trainer.compile_mode=reduce-overhead): what the trainer does
so that a replayed backward never hands autograd a .grad that the next replay overwrites.

The CUDA-graph pool itself exists only on a GPU; here the pool is stood in for by one buffer that
a fake "replay" overwrites, which is exactly the hazard: AccumulateGrad steals the backward's output
as .grad when .grad is None."""

import torch
from torch import nn

from fp8train.train.compiling import grads_out_of_graph_memory, replays_cuda_graphs


class PoolGrad(torch.autograd.Function):
    """y = x * w whose weight gradient is written into a shared `pool` tensor, as a graph replay writes
    into its static output."""

    pool = torch.zeros(4)

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x)
        return x * w

    @staticmethod
    def backward(ctx, grad_y):
        (x,) = ctx.saved_tensors
        PoolGrad.pool.copy_((grad_y * x).sum(0))
        return grad_y * 0, PoolGrad.pool.view(-1)  # a new tensor on the pool storage, as a replay returns


def _two_micro_batches(model: nn.Module) -> torch.Tensor:
    x1, x2 = torch.ones(3, 4), 2 * torch.ones(3, 4)
    PoolGrad.apply(x1, model.w).sum().backward()
    PoolGrad.apply(x2, model.w).sum().backward()  # the "replay" rewrites the pool
    return model.w.grad


def test_stolen_grad_is_overwritten_without_the_hook():
    model = nn.Module()
    model.w = nn.Parameter(torch.ones(4))
    grad = _two_micro_batches(model)
    assert grad.data_ptr() == PoolGrad.pool.data_ptr(), "the first backward's pool tensor became .grad"
    assert torch.equal(grad, torch.full((4,), 12.0)), "3 + 6 expected, the shared pool gives 6 + 6"


def test_hook_keeps_grads_out_of_the_pool_and_accumulates_exactly():
    model = nn.Module()
    model.w = nn.Parameter(torch.ones(4))
    model.frozen = nn.Parameter(torch.ones(4), requires_grad=False)
    assert grads_out_of_graph_memory(model) == 1
    grad = _two_micro_batches(model)
    assert grad.data_ptr() != PoolGrad.pool.data_ptr()
    assert torch.equal(grad, torch.full((4,), 9.0)), "3 from the first micro-batch + 6 from the second"


def test_modes_that_replay_graphs():
    assert replays_cuda_graphs("reduce-overhead") and replays_cuda_graphs("max-autotune")
    assert not replays_cuda_graphs("default") and not replays_cuda_graphs("max-autotune-no-cudagraphs")


def test_auto_cast_route_takes_the_operators_only_under_graph_replay():
    from fp8train.train.compiling import compiled_cast_route

    assert compiled_cast_route("auto", "reduce-overhead") == "operators"
    assert compiled_cast_route("auto", "default") == "auto"
    assert compiled_cast_route("inductor", "reduce-overhead") == "inductor", "an explicit choice stands"
