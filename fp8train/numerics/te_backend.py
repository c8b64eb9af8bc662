"""Transformer Engine backend: the model's GEMMs through TE modules inside TE's autocast.

With backend `te`, the module swap replaces nn.Linear by te.Linear and the MoE GroupedLinear by
te.GroupedLinear (weights copied), each wrapped so that its forward runs inside
`te.autocast(recipe=...)` (older TE: `fp8_autocast(fp8_recipe=...)`): FP8 is on wherever the
module runs, also under a DeepSpeed engine, not only where a caller remembered a context.

Our recipe translates to TE's through ONE explicit table (`TE_RECIPE_TABLE`):

    delayed, HYBRID formats (E4M3 fwd, E5M2 bwd)  -> DelayedScaling(Format.HYBRID, history, algo, margin)
    delayed, E4M3 everywhere                      -> DelayedScaling(Format.E4M3, ...)
    current, HYBRID / E4M3                        -> Float8CurrentScaling(fp8_format=...)
    blockwise, E4M3                               -> Float8BlockScaling()

Anything else (v3_fp8's E5M2 forward, rowwise) TE cannot express: `te_recipe_for` raises
TEUnsupported with the reason; `convert_to_te(..., fallback="native")` instead keeps our native
FP8 path for the model and reports why. TE keeps its FP8 state (amax histories, scales) in each
module's `_extra_state`, which state_dict and DeepSpeed checkpoints carry.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
from torch import nn

from fp8train.numerics.recipe import Recipe
from fp8train.quant.formats import E4M3, E5M2
from fp8train.quant.schemes import RecipeScaling


class TEUnsupported(ValueError):
    """The recipe has no Transformer Engine equivalent (or TE is unavailable)."""


def te_available() -> tuple[bool, str]:
    """Can the TE backend run here? (ok, reason naming what is missing and how to fix it)"""
    try:
        import transformer_engine.pytorch  # noqa: F401, PLC0415
    except Exception as exc:  # ImportError, or a broken build raising OSError/RuntimeError
        return False, (f"Transformer Engine is not importable ({type(exc).__name__}: {exc}); install it "
                       "with `pip install -e .[te]` (transformer-engine[pytorch]==2.20.2) on a CUDA machine")
    if not torch.cuda.is_available():
        return False, "Transformer Engine needs a CUDA GPU; none is visible"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        return False, f"{torch.cuda.get_device_name()} has compute capability {major}.{minor}; TE FP8 needs >= 8.9"
    return True, f"Transformer Engine on {torch.cuda.get_device_name()}"


_ROLES = ("input", "weight", "grad_output")

# (scaling of every role, (input, weight, grad_output) formats) -> TE recipe class name, TE Format name
TE_RECIPE_TABLE: dict[tuple[RecipeScaling, tuple], tuple[str, str]] = {
    (RecipeScaling.DELAYED, (E4M3, E4M3, E5M2)): ("DelayedScaling", "HYBRID"),
    (RecipeScaling.DELAYED, (E4M3, E4M3, E4M3)): ("DelayedScaling", "E4M3"),
    (RecipeScaling.CURRENT, (E4M3, E4M3, E5M2)): ("Float8CurrentScaling", "HYBRID"),
    (RecipeScaling.CURRENT, (E4M3, E4M3, E4M3)): ("Float8CurrentScaling", "E4M3"),
    (RecipeScaling.BLOCKWISE, (E4M3, E4M3, E4M3)): ("Float8BlockScaling", "E4M3"),
}


def te_recipe_for(recipe: Recipe):
    """Translate our recipe to a Transformer Engine recipe object, or raise TEUnsupported."""
    scalings = {recipe.role(r).recipe_scaling for r in _ROLES}
    formats = tuple(recipe.role(r).fp8 for r in _ROLES)
    key = (scalings.pop() if len(scalings) == 1 else None, formats)
    if key not in TE_RECIPE_TABLE:
        scaling = key[0].value if key[0] is not None else "mixed"
        supported = sorted(f"{s.value} {'/'.join(f.name for f in fmts)}" for s, fmts in TE_RECIPE_TABLE)
        raise TEUnsupported(f"recipe {recipe.name!r} (scaling {scaling}, formats input/weight/grad_output="
                            f"{'/'.join(f.name for f in formats)}) has no Transformer Engine equivalent; "
                            f"TE supports {supported}")
    from transformer_engine.common import recipe as te_recipe  # noqa: PLC0415
    class_name, format_name = TE_RECIPE_TABLE[key]
    fmt = getattr(te_recipe.Format, format_name)
    if class_name == "DelayedScaling":
        histories = {recipe.role(r).history_len for r in _ROLES}
        role = recipe.input
        return te_recipe.DelayedScaling(fp8_format=fmt, amax_history_len=max(histories),
                                        amax_compute_algo=role.amax_compute_algo, margin=int(role.margin))
    if class_name == "Float8CurrentScaling":
        return te_recipe.Float8CurrentScaling(fp8_format=fmt)
    return te_recipe.Float8BlockScaling(fp8_format=fmt)


@contextmanager
def te_autocast(te_recipe, group=None):
    """te.autocast(recipe=...) on new TE, te.fp8_autocast(fp8_recipe=...) on older releases."""
    import transformer_engine.pytorch as te  # noqa: PLC0415
    autocast = getattr(te, "autocast", None) or te.fp8_autocast
    params = inspect.signature(autocast).parameters
    kwargs = {"enabled": True}
    kwargs["recipe" if "recipe" in params else "fp8_recipe"] = te_recipe
    if group is not None:
        kwargs["amax_reduction_group" if "amax_reduction_group" in params else "fp8_group"] = group
    with autocast(**kwargs):
        yield


def _default_group():
    dist = torch.distributed
    return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None


class TELinear(nn.Module):
    """te.Linear run inside TE's autocast with the translated recipe."""

    def __init__(self, linear: nn.Linear, te_recipe, recipe_name: str):
        super().__init__()
        import transformer_engine.pytorch as te  # noqa: PLC0415
        self.inner = te.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                               params_dtype=linear.weight.dtype, device=linear.weight.device)
        with torch.no_grad():
            self.inner.weight.copy_(linear.weight)
            if linear.bias is not None:
                self.inner.bias.copy_(linear.bias)
        self.te_recipe, self.backend_reason = te_recipe, f"te: Transformer Engine ({recipe_name})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with te_autocast(self.te_recipe, _default_group()):
            return self.inner(x)


class TEGroupedLinear(nn.Module):
    """te.GroupedLinear behind the GroupedLinear signature forward(x_sorted, group_sizes)."""

    def __init__(self, grouped: nn.Module, te_recipe, recipe_name: str):
        super().__init__()
        import transformer_engine.pytorch as te  # noqa: PLC0415
        num_experts, out_features, in_features = grouped.weight.shape
        self.num_experts = num_experts
        self.inner = te.GroupedLinear(num_experts, in_features, out_features, bias=False,
                                      params_dtype=grouped.weight.dtype, device=grouped.weight.device)
        with torch.no_grad():
            for e in range(num_experts):
                getattr(self.inner, f"weight{e}").copy_(grouped.weight[e])
        self.te_recipe, self.backend_reason = te_recipe, f"te: Transformer Engine GroupedLinear ({recipe_name})"

    def forward(self, x: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
        sizes = [int(s) for s in group_sizes.tolist()]
        x_padded, padded_sizes, rows = pad_groups(x, sizes, TE_FP8_GROUP_MULTIPLE)
        with te_autocast(self.te_recipe, _default_group()):
            y_padded = self.inner(x_padded, padded_sizes)
        return y_padded.index_select(0, rows)


TE_FP8_GROUP_MULTIPLE = 16  # TE's FP8 grouped GEMM needs every split to be a multiple of 16 rows


def pad_groups(x: torch.Tensor, sizes: list[int], multiple: int):
    """Zero-pad every contiguous row group of x up to a multiple of `multiple` rows.

    Returns (x_padded, padded_sizes, rows) where x_padded[rows] == x; both directions are
    differentiable (index_copy / index_select), and zero rows contribute nothing to any GEMM.
    """
    padded_sizes = [-(-s // multiple) * multiple for s in sizes]
    starts = torch.tensor([0] + padded_sizes[:-1], device=x.device).cumsum(0)
    rows = torch.cat([torch.arange(s, device=x.device) + start for s, start in zip(sizes, starts)]) \
        if sizes else torch.zeros(0, dtype=torch.long, device=x.device)
    x_padded = x.new_zeros(sum(padded_sizes), x.shape[1]).index_copy(0, rows, x)
    return x_padded, padded_sizes, rows


def fp8_state_moved(model: nn.Module) -> bool:
    """True if any TE module's FP8 amax history holds a nonzero value (FP8 really ran)."""
    for module in model.modules():
        meta = getattr(module, "fp8_meta", None)
        if not meta:
            continue
        for key in ("scaling_fwd", "scaling_bwd"):
            history = getattr(meta.get(key), "amax_history", None)
            if history is not None and bool((history != 0).any()):
                return True
    return False
