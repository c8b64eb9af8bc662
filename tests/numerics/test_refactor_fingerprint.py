"""Guard for behaviour-preserving refactors of the quantization core and the FP8 layer.

A fixed-seed CPU run of every FP8 recipe (a tiny dense model and a tiny MoE model, three optimizer
steps of two micro-batches each, plain AdamW, `after_optimizer_step` after every step) must give
bit-identical losses and a bit-identical final state (parameters, amax histories, scales) to the
stored fingerprint, which was recorded before the core was reshaped (issue #14).

CPU BLAS may sum in another order on another processor: the fingerprint also stores a probe
(the hash of one FP32 matmul). Where the probe differs, bit-identity cannot be expected, and the
test compares the losses to within 1e-5 relative instead, saying so. The intra-op thread count
changes how some CPU kernels split their sums (the probe does not see it), so recording and test
both pin RECORDED_THREADS, the count the fingerprint was recorded with (the default on 2 cores).

    python tests/numerics/test_refactor_fingerprint.py --write   # re-record (after a deliberate change)
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from fp8train import models
from fp8train.numerics import after_optimizer_step, convert_to_fp8, load_recipe

FINGERPRINT = Path(__file__).with_name("refactor_fingerprint.json")
RECIPES = ("v3_fp8", "hybrid", "current", "rowwise", "blockwise")
MODELS = ("tiny", "moe_tiny")
VOCAB, SEQ, MICRO, ACCUM, STEPS = 256, 64, 2, 2, 3
RECORDED_THREADS = 2


@pytest.fixture(autouse=True)
def recorded_threads():
    """The fingerprint's thread count for this test (tests/conftest.py runs the others on one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(RECORDED_THREADS)
    yield
    torch.set_num_threads(before)


def _state_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def blas_probe() -> str:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(96, 200, generator=gen), torch.randn(200, 72, generator=gen)
    return hashlib.sha256((a @ b).numpy().tobytes()).hexdigest()


def run(recipe_name: str, size: str) -> dict:
    """Losses (float.hex) and final state hash of one tiny fixed-seed run."""
    torch.manual_seed(0)
    model = models.build_model(models.model_config(size, VOCAB, SEQ))
    recipe = load_recipe(recipe_name)
    convert_to_fp8(model, recipe, backend="emulated")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(STEPS):
        for _ in range(ACCUM):
            ids = torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=gen)
            loss = model(ids[:, :-1], ids[:, 1:])
            (loss / ACCUM).backward()
            losses.append(float(loss.detach()).hex())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        after_optimizer_step(model)
    return {"losses": losses, "state": _state_hash(model)}


def record() -> dict:
    return {"probe": blas_probe(),
            "runs": {f"{r}/{m}": run(r, m) for r in RECIPES for m in MODELS}}


@pytest.mark.parametrize("size", MODELS)
@pytest.mark.parametrize("recipe_name", RECIPES)
def test_fixed_seed_run_matches_fingerprint(recipe_name, size):
    stored = json.loads(FINGERPRINT.read_text())
    expected, actual = stored["runs"][f"{recipe_name}/{size}"], run(recipe_name, size)
    if stored["probe"] == blas_probe():
        assert actual["losses"] == expected["losses"]
        assert actual["state"] == expected["state"], "final parameters / FP8 state changed bit-wise"
    else:  # another CPU: the same math, summed in another order
        for got, want in zip(actual["losses"], expected["losses"]):
            assert math.isclose(float.fromhex(got), float.fromhex(want), rel_tol=1e-5)


if __name__ == "__main__" and "--write" in sys.argv:
    torch.set_num_threads(RECORDED_THREADS)
    FINGERPRINT.write_text(json.dumps(record(), indent=1) + "\n")
    print(f"wrote {FINGERPRINT}")
