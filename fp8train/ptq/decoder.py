"""The decoder protocol PTQ works through: duck typing, so fp8train.ptq never imports a model class.

A decoder is an nn.Module with

    embed       tokens [B, T] -> hidden [B, T, D]
    rope        rope(T) -> (cos, sin): the position tables every block receives
    layers      nn.ModuleList of blocks; block(x, cos, sin) -> x or (x, aux)
    norm        the final norm;  lm_head: hidden -> logits
    forward     model(input_ids) -> logits [B, T, V]

(fp8train.models.Transformer is one; fp8train.models.pretrained builds SmolLM2 as one.)

Inside a block the quantizable layers are its nn.Linear submodules, named by their path in the block
(`attn.q_proj`, `mlp.down_proj`); an MoE `router` is skipped. Full names are `layers.{i}.{path}`.
`embed`, `norm` and `lm_head` stay high precision (as DeepSeek-V3 and most PTQ recipes keep them).

Scale groups (AWQ, SmoothQuant): an op whose output feeds some linears and can absorb a per-channel
factor, so that `prev.out / s` and `linear.weight * s` compute the same function:

    prev            linears                          inspect (whose output AWQ's search compares)
    attn_norm       attn.q_proj, k_proj, v_proj      attn   (called as attn(x, cos, sin))
    attn.v_proj     attn.o_proj                      attn.o_proj   (only when v's outputs = o's inputs,
                                                                    i.e. no grouped-query attention)
    ffn_norm        mlp.gate_proj, mlp.up_proj       mlp
    mlp.up_proj     mlp.down_proj                    mlp.down_proj  (silu(gate) * up is linear in up)

A block may define `ptq_scale_groups` (a list of ScaleGroup) to replace this table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

SKIPPED_LINEARS = ("router",)
REQUIRED = ("embed", "rope", "layers", "norm", "lm_head")


@dataclass(frozen=True)
class ScaleGroup:
    prev: str
    linears: tuple[str, ...]
    inspect: str
    inspect_takes_rope: bool = False


LLAMA_SCALE_GROUPS = (
    ScaleGroup("attn_norm", ("attn.q_proj", "attn.k_proj", "attn.v_proj"), "attn", True),
    ScaleGroup("attn.v_proj", ("attn.o_proj",), "attn.o_proj"),
    ScaleGroup("ffn_norm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)


def check_decoder(model: nn.Module) -> None:
    missing = [name for name in REQUIRED if not hasattr(model, name)]
    if missing:
        raise ValueError(f"{type(model).__name__} is not a decoder PTQ can walk: it lacks {missing} "
                         f"(needs {list(REQUIRED)}; see fp8train/ptq/decoder.py)")


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The quantizable linears of one block, by path inside the block, in module order."""
    return {name: module for name, module in block.named_modules()
            if isinstance(module, nn.Linear) and name.rpartition(".")[2] not in SKIPPED_LINEARS}


def scale_groups(block: nn.Module) -> list[ScaleGroup]:
    """The groups that exist in this block and whose shapes allow folding a factor into `prev`."""
    table = getattr(block, "ptq_scale_groups", LLAMA_SCALE_GROUPS)
    modules = dict(block.named_modules())
    groups = []
    for group in table:
        if group.prev not in modules or not all(name in modules for name in group.linears):
            continue
        width = modules[group.prev].weight.shape[0]
        if all(modules[name].in_features == width for name in group.linears):
            groups.append(group)
    return groups


def run_block(block: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    out = block(x, cos, sin)
    return out[0] if isinstance(out, tuple) else out


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


@torch.no_grad()
def fold_scale(prev: nn.Module, scale: torch.Tensor, linears: list[nn.Linear]) -> None:
    """prev's output channels / scale, each linear's input columns * scale (same function in float).

    `prev` is a norm (a `weight` vector, optional `bias`) or an nn.Linear (output rows)."""
    scale = scale.to(torch.float32)
    weight = prev.weight
    if weight.dim() == 1:
        weight.data = (weight.data.float() / scale).to(weight.dtype)
    else:
        weight.data = (weight.data.float() / scale[:, None]).to(weight.dtype)
    if getattr(prev, "bias", None) is not None:
        prev.bias.data = (prev.bias.data.float() / scale).to(prev.bias.dtype)
    for linear in linears:
        linear.weight.data = (linear.weight.data.float() * scale[None, :]).to(linear.weight.dtype)
