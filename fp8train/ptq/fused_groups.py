"""Fused groups: linears that serving engines run as ONE matmul, so they must share one quantizer.

vLLM and SGLang (and TensorRT-LLM's Llama) load

    <prefix>.q_proj, k_proj, v_proj      as  <prefix>.qkv_proj       one GEMM on the same input
    <prefix>.gate_proj, up_proj          as  <prefix>.gate_up_proj   one GEMM on the same input

and quantize each fused layer with ONE scheme (format, granularity and group size, symmetry,
activation quantizer), and either all shards quantized or none. A compressed-tensors folder whose
shards differ is refused at load ("Found a different quantization schemes for ['q_proj', 'k_proj',
'v_proj'] in ...qkv_proj. vLLM requires all to use the same scheme."). llm-compressor never writes
one; `plan.greedy_plan` does not either unless asked (`plan_fuse_groups=false`).

fp8train's own decoder (fp8train.inference.plan.SplitLinear: one GEMM per shard) and HF transformers
(Llama keeps q/k/v and gate/up as separate modules) load split groups, so a split plan is a warning
at export (`FusedGroupSplitWarning`), not an error.

Grouping is by name: members share the prefix. In our models that covers dense attention and MLPs
and an MoE block's shared experts (`moe.shared_experts.{gate,up}_proj`, which DeepSeek-V2/V3 in vLLM
also fuse). Routed experts are GroupedLinear modules, not nn.Linear: PTQ leaves them high precision,
so they never appear in a plan. Every other linear (o_proj, down_proj) is a group of one.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Iterable

from fp8train.quant.spec import QuantSpec

FUSED_SUFFIXES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
FUSING_ENGINES = "vLLM and SGLang"


class FusedGroupSplitWarning(UserWarning):
    """A fused group's members have different quantizers: engines that fuse them cannot load it."""


def scheme_key(weight: QuantSpec, input: QuantSpec | None) -> tuple:
    """What an engine compares between shards: the weight's format, granularity, group size (only
    where grouped), symmetry, and the activation quantizer (with dynamic/static). Fields that do not
    change the scheme (a row quantizer's unused group_size, a weight's `dynamic`) are left out."""
    def key(spec: QuantSpec, activation: bool) -> tuple:
        return (spec.format, spec.granularity, spec.group_size if spec.grouped else None, spec.symmetric,
                spec.dynamic if activation else None)
    return key(weight, False), None if input is None else key(input, True)


def _group_key(name: str) -> tuple:
    prefix, _, leaf = name.rpartition(".")
    for index, suffixes in enumerate(FUSED_SUFFIXES):
        if leaf in suffixes:
            return (prefix, index)
    return (name,)


def fused_groups(names: Iterable[str]) -> list[tuple[str, ...]]:
    """Partition layer names into fused groups (in first-appearance order; members in name order
    as given). Names outside FUSED_SUFFIXES are groups of one."""
    groups: dict[tuple, list[str]] = {}
    for name in names:
        groups.setdefault(_group_key(name), []).append(name)
    return [tuple(members) for members in groups.values()]


def split_groups(schemes: dict[str, Hashable]) -> list[tuple[str, ...]]:
    """The fused groups whose members' schemes differ. schemes: layer name -> any comparable
    description of its quantizer (None: kept high precision, which differs from any quantizer)."""
    return [group for group in fused_groups(schemes) if len({schemes[name] for name in group}) > 1]


def split_groups_message(groups: list[tuple[str, ...]], describe: dict[str, str]) -> str:
    """What a split costs and how to fix it, naming the groups (describe: layer -> its quantizer)."""
    shown = "; ".join(", ".join(f"{name}: {describe[name]}" for name in group) for group in groups[:3])
    more = f" (and {len(groups) - 3} more groups)" if len(groups) > 3 else ""
    return (f"{len(groups)} fused group(s) mix quantizers: {shown}{more}. {FUSING_ENGINES} fuse q/k/v_proj "
            f"into qkv_proj and gate/up_proj into gate_up_proj and need ONE scheme per fused layer, so they "
            f"will refuse this folder; fp8train and HF transformers load it. To serve it there, give the "
            f"members of each group the same entry in plan.yaml, or rebuild the plan with "
            f"plan_fuse_groups=true.")


def warn_split_groups(schemes: dict[str, Hashable], describe: dict[str, str]) -> list[tuple[str, ...]]:
    """Warn (FusedGroupSplitWarning) when a fused group is split; returns the split groups."""
    groups = split_groups(schemes)
    if groups:
        warnings.warn(split_groups_message(groups, describe), FusedGroupSplitWarning, stacklevel=3)
    return groups
