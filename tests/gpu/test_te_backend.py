"""Transformer Engine backend on an FP8 GPU: recipe translation, parity with the native path,
FP8 really on under a DeepSpeed engine, TE FP8 state in checkpoints."""

import pytest
import torch

from fp8train.numerics import FP8Linear, after_optimizer_step, convert_to_fp8, load_recipe
from fp8train.numerics.te_backend import TELinear, fp8_state_moved, te_available, te_recipe_for

ok, why = te_available()
pytestmark = [pytest.mark.gpu, pytest.mark.te, pytest.mark.skipif(not ok, reason=why)]


def test_recipe_table_translates_presets():
    from transformer_engine.common import recipe as te_recipe
    assert isinstance(te_recipe_for(load_recipe("hybrid")), te_recipe.DelayedScaling)
    assert isinstance(te_recipe_for(load_recipe("current")), te_recipe.Float8CurrentScaling)
    assert isinstance(te_recipe_for(load_recipe("blockwise")), te_recipe.Float8BlockScaling)


def _te_scales(te_linear):
    meta = te_linear.inner.fp8_meta
    return meta["scaling_fwd"].scale[:2].clone()  # [input, weight]


def test_delayed_hybrid_parity_with_native():
    torch.manual_seed(0)
    recipe = load_recipe("hybrid")
    base = torch.nn.Linear(1024, 768, bias=False, device="cuda", dtype=torch.bfloat16)
    native = FP8Linear.from_linear(base, recipe, backend="scaled_mm")
    te_layer = TELinear(base, te_recipe_for(recipe), recipe.name)
    for step in range(4):
        x = (torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16) * (1 + step))
        grad = torch.randn(512, 768, device="cuda", dtype=torch.bfloat16)
        y_native = native(x.clone().requires_grad_(True))
        y_native.backward(grad)
        after_optimizer_step(native)
        y_te = te_layer(x.clone().requires_grad_(True))
        y_te.backward(grad)
        torch.testing.assert_close(y_te.float(), y_native.float(), rtol=0.125, atol=0.0675)
        ours = torch.cat([native.input_caster.scale, native.weight_caster.scale])
        print(f"step {step}: native scales {ours.tolist()} te scales {_te_scales(te_layer).tolist()}")
        torch.testing.assert_close(_te_scales(te_layer), ours, rtol=0, atol=0)


def test_te_under_deepspeed_runs_fp8_and_checkpoints(tmp_path):
    deepspeed = pytest.importorskip("deepspeed")
    import os
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256)).cuda()
    report = convert_to_fp8(model, load_recipe("hybrid"), backend="te")
    assert len(report.converted) == 2 and all(isinstance(m, TELinear) for m in (model[0], model[2]))
    config = {"train_micro_batch_size_per_gpu": 8, "bf16": {"enabled": True},
              "zero_optimization": {"stage": 1}, "gradient_clipping": 1.0}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                      config=config)
    assert not fp8_state_moved(engine.module)
    for _ in range(3):
        x = torch.randn(8, 64, 256, device="cuda", dtype=torch.bfloat16)
        loss = engine(x).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
    assert fp8_state_moved(engine.module), "TE amax histories never moved: FP8 was off under DeepSpeed"
    engine.save_checkpoint(str(tmp_path), tag="t")
    saved = {k: v for k, v in engine.module.state_dict().items() if k.endswith("_extra_state")}
    assert saved, "TE FP8 state (_extra_state) missing from the module state_dict"
