"""Issue 18: load_trained_model reads back exactly the FP32 master weights a multi-rank ZeRO run held.

fp8train/train/trained_model.py reassembles the optimizer's FP32 master copy from whatever
DeepSpeed saved (ZeRO-1 + bf16: the BF16_Optimizer's flat partitions; ZeRO-2/3:
deepspeed.utils.zero_to_fp32). Here each stage trains the tiny model with hybrid FP8 layers
on 2 gloo ranks for 2 steps, through tests/train/dump_master_weights.py: launch/train.py, then
every rank gathers the live FP32 masters with DeepSpeed's safe_get_full_fp32_param and rank 0
saves them. The loaded model must hold those, bit for bit.

Found by this test (fixed): under ZeRO-2/3 zero_to_fp32 also returns the module's buffers, so
the FP8 layers' amax histories and scales failed the loader's strict check; a tied lm_head
crashed training itself (the step guard took `lm_head.weight` for a buffer); MoE expert_bias
(it steers routing) and expert_load were never loaded, at any stage; a checkpoint missing one
rank's shard failed inside DeepSpeed (ZeRO-2/3) or reshaping partial weights (ZeRO-1).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fp8train.train.trained_model import load_trained_model
from tests.train.helpers import REPO, check_ok, launch

WORKER = REPO / "tests" / "train" / "dump_master_weights.py"
RUN = ("+recipe=hybrid", "trainer.micro_batch_size=2", "trainer.global_batch_size=4", "trainer.max_steps=2",
       "optim.warmup_steps=1", "trainer.eval_every=100", "data.val_batches=1")
# ZeRO stage -> model: a tied lm_head under ZeRO-1 and ZeRO-3, MoE (expert_bias buffers) under ZeRO-2
STAGES = {1: ("+model.overrides.tie_embeddings=true",), 2: ("model.size=moe_tiny",),
          3: ("+model.overrides.tie_embeddings=true",)}

pytestmark = pytest.mark.slow  # one 2-rank launch per stage: ~10 s each on 2 CPU cores


@pytest.fixture(scope="module", params=sorted(STAGES), ids=lambda s: f"zero{s}")
def run_dir(request, tmp_path_factory):
    stage = request.param
    run = tmp_path_factory.mktemp(f"zero{stage}")
    check_ok(launch(run, *RUN, f"deepspeed.zero_stage={stage}", *STAGES[stage], nproc=2, script=WORKER))
    return run


def _tag(run_dir):
    return run_dir / "checkpoints" / "step_0000002"


def test_loader_returns_the_fp32_masters_the_engine_held(run_dir):
    trained = load_trained_model(run_dir)
    held = torch.load(run_dir / "master_fp32.pt")
    loaded = trained.model.state_dict()
    stage = trained.run_config["deepspeed"]["zero_stage"]
    assert trained.model_config.tie_embeddings == (stage != 2) and (trained.model_config.moe is not None) == (stage == 2)
    assert trained.recipe == "hybrid" and trained.checkpoint.meta["world_size"] == 2
    assert sorted(held) == sorted(n for n, _ in trained.model.named_parameters())
    for name, master in held.items():
        assert loaded[name].dtype == torch.float32 and loaded[name].shape == master.shape, name
        assert torch.equal(loaded[name], master), name
    if trained.model_config.tie_embeddings:  # one tensor, as trained
        assert trained.model.lm_head.weight is trained.model.embed.weight
    trained_buffers = torch.load(next(_tag(run_dir).glob("*mp_rank_00_model_states.pt")), weights_only=False)["module"]
    buffers = {n: loaded[n] for n in loaded if n not in held and n != "lm_head.weight"}  # persistent ones
    assert bool(buffers) == (stage == 2)  # MoE expert_bias (it steers routing) and expert_load
    for name, buffer in buffers.items():
        assert torch.equal(buffer, trained_buffers[name]), name
    assert all(b.any() for n, b in buffers.items() if n.endswith("expert_bias"))  # trained, not zeros
    tokens = torch.randint(0, trained.model_config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = trained.model(tokens)
    assert logits.shape == (2, 32, trained.model_config.vocab_size) and torch.isfinite(logits).all()


def test_checkpoint_carries_fp8_buffers(run_dir):
    """The strict load above had FP8 amax histories and scales in the checkpoint to get past."""
    model_file = next(_tag(run_dir).glob("*mp_rank_00_model_states.pt"))
    module = torch.load(model_file, map_location="cpu", weights_only=False)["module"]
    assert any(name.endswith("weight_caster.amax_history") for name in module)
    assert any(name.endswith("input_caster.scale") for name in module)


@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "no_manifest"])
def test_missing_rank_shard_is_named(run_dir, tmp_path, manifest):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    tag = _tag(copy)
    lost = next(tag.glob("*zero_pp_rank_1_*optim_states.pt"))
    lost.unlink()
    if not manifest:  # a checkpoint written before manifests existed: the rank count still tells
        meta = json.loads((tag / "fp8train_meta.json").read_text())
        del meta["files"]
        (tag / "fp8train_meta.json").write_text(json.dumps(meta))
    expected = lost.name if manifest else "optim_states file of rank 1 is missing"
    with pytest.raises(ValueError, match=rf"checkpoint {tag} is incomplete: .*{expected}") as error:
        load_trained_model(copy)
    assert "\n" not in str(error.value) and "older complete tag" in str(error.value)
