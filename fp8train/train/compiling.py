"""torch.compile for training: the whole model, or each decoder block (regional, the default).

    trainer.compile: true
    trainer.compile_scope: blocks      blocks | model
    trainer.compile_mode: default      default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs

`blocks` compiles every decoder block in place (`block.compile()`). The blocks of a model run the
same code on same-shaped parameters, and Dynamo treats module parameters as graph inputs, so ONE
graph is compiled and reused by all n_layers blocks: warm-up drops by about the number of layers
(a whole 1B model took ~145 s to compile on the H100; one block is a sixteenth of it), and the
evaluation graph (no_grad) is again one block. The embedding, final norm, LM head and loss run
eagerly; they are a few kernels per step. `model` compiles the whole model as one graph
(`model.compile()`, as before): fusion across block boundaries, at n_layers times the compile time.

`compile_mode` is torch.compile's `mode`. `reduce-overhead` replays each compiled graph as a CUDA
graph (cudagraph trees; a graph per block, since each block's parameters live at their own
addresses), which takes the launch cost out of the step. Training under replay needs three things,
all done by the trainer: weight gradients kept out of the graphs' memory pool
(`grads_out_of_graph_memory`), a graph step marked per micro-batch and evaluation batch
(`mark_graph_step`), and the FP8 state at its final addresses before the first forward (the
delayed-scaling bank is built first). The amax histories and scales are module buffers updated in
place, so a replay reads the current ones. Measured on an H200 at 1B: the same losses as the plain
compiled trainer (tests/gpu/test_graphed_training.py), current 1.25x BF16 (graphed too) against
1.21x without graphs (benchmarks/results/h200_session12). On a CPU the mode compiles as `default`.

Compiling in place keeps parameter names (checkpoints, DeepSpeed) those of the eager model.
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import nn

from fp8train.quant.config_values import parse_choice


class CompileScope(str, Enum):
    BLOCKS = "blocks"
    MODEL = "model"


def compile_scope(name: str, where: str = "trainer.compile_scope") -> CompileScope:
    return parse_choice(CompileScope, name, where)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode_kwargs(mode: str, where: str = "trainer.compile_mode") -> dict:
    """torch.compile keyword arguments for `mode` (none for the default); a clear error otherwise."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"{where}={mode!r} is not a torch.compile mode; choose one of {list(COMPILE_MODES)}")
    return {} if mode == "default" else {"mode": mode}


def replays_cuda_graphs(mode: str) -> bool:
    """True for the modes whose compiled graphs replay as CUDA graphs (cudagraph trees)."""
    return mode in ("reduce-overhead", "max-autotune")


def mark_graph_step() -> None:
    """Tell cudagraph trees a new forward/backward pair starts (one per micro-batch, one per
    evaluation batch): outputs of the previous replay may then be overwritten. Without it the trees
    guess the boundary from pending backwards, which a gradient-accumulation loop can mislead."""
    torch.compiler.cudagraph_mark_step_begin()


def compiled_cast_route(route: str, mode: str) -> str:
    """The cast route for `trainer.compiled_casts` under `trainer.compile_mode`.

    `auto` means Inductor-generated tensorwise casts, except when the graphs replay as CUDA graphs:
    then the custom-operator casts (one amax+cast kernel per cast) win, because their extra
    launches cost nothing in a replay. 1B on an H200, graphed: the operator casts took 102 ms of
    GPU time per 3 steps (current) against Inductor's 198, and the step ran 1.25x BF16 instead of
    1.20x; not graphed, the same operators left the step host-bound (0.89x;
    benchmarks/results/h200_session11, h200_session12)."""
    if route == "auto" and replays_cuda_graphs(mode):
        return "operators"
    return route


def grads_out_of_graph_memory(model: nn.Module) -> int:
    """Keep every parameter's .grad out of the CUDA-graph memory pool; returns the hook count.

    A replayed backward writes each weight gradient into the graph's static pool. When .grad is
    None, autograd's AccumulateGrad steals that tensor as .grad, and the next replay (the next
    micro-batch) overwrites it: DeepSpeed then reads a dead tensor ("accessing tensor output of
    CUDAGraphs that has been overwritten", measured on an H200 with ZeRO-1). The hook copies the
    gradient out only when it would be stolen; once .grad exists, accumulation is an in-place add
    that reads the pool tensor before it can be overwritten, and the hook passes it through."""
    count = 0
    for param in model.parameters():
        if param.requires_grad:
            param.register_hook(lambda grad, param=param: grad.clone() if param.grad is None else grad)
            count += 1
    return count


def compile_model(model: nn.Module, scope: CompileScope, **compile_kwargs) -> str:
    """Compile in place as `scope` says; returns a line for the log."""
    blocks = getattr(model, "layers", None)
    if scope is CompileScope.BLOCKS and isinstance(blocks, nn.ModuleList) and len(blocks):
        for block in blocks:
            block.compile(**compile_kwargs)
        return f"torch.compile on each of the {len(blocks)} decoder blocks (one graph, reused by all)"
    model.compile(**compile_kwargs)
    return "torch.compile on the whole model"
