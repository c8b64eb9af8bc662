"""launch/generate.py: settings checked up front, a trained run's master weights loaded, text streamed."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from fp8train.models import build_model, model_config

ROOT = Path(__file__).resolve().parents[2]


def _cli():
    spec = importlib.util.spec_from_file_location("generate_cli", ROOT / "launch" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny run trained through the real trainer (a few steps): what load_trained_model reads."""
    from tests.train.helpers import check_ok, launch

    run = tmp_path_factory.mktemp("generate_run")
    check_ok(launch(run, "+recipe=bf16", "trainer.max_steps=2"))
    return run


@pytest.mark.slow
def test_run_folder_loads_the_master_weights(trained_run):
    from fp8train.train.trained_model import load_trained_model

    model, _ = _cli().load(_cli().parse([f"checkpoint={trained_run}", "prompt=x"]), torch.device("cpu"))
    expected = load_trained_model(trained_run).model
    for name, tensor in expected.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


@pytest.mark.slow
def test_generation_streams_the_completion(trained_run, capsys):
    _cli().main([f"checkpoint={trained_run}", "prompt=\"def \"", "max_new_tokens=6", "kv_cache=int4",
                 "weights=w4a16"])
    out = capsys.readouterr()
    assert out.out.startswith("def ") and "6 steps, kv_cache=int4, weights=w4a16" in out.err


@pytest.mark.parametrize("argv, message", [
    (["checkpoint=random", "prompt=x", "kv_cach=int8"], "Key 'kv_cach' not in 'GenerateSettings'"),
    (["checkpoint=random", "prompt=x", "weights=w2"], "weights='w2'"),
    (["checkpoint=random"], "give prompt"),
])
def test_bad_settings_are_refused(argv, message):
    with pytest.raises(ValueError, match=message):
        _cli().parse(argv)


def test_not_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path)):
        _cli().load(_cli().parse([f"checkpoint={tmp_path}", "prompt=x"]), torch.device("cpu"))


def test_quantized_modules_decode_through_the_plan(monkeypatch, capsys):
    """A model with quantized linears (ptq's interface) generates through the DecodePlan."""
    from fp8train.quant.spec import QuantSpec
    from tests.inference.helpers import quantize_linears

    cli = _cli()
    model = quantize_linears(build_model(model_config("tiny", vocab_size=257, max_seq_len=64)),
                             QuantSpec("uint4", "tile", 64, symmetric=False))
    from fp8train.data import ByteTokenizer

    monkeypatch.setattr(cli, "load", lambda settings, device: (model, ByteTokenizer()))
    built = []
    real_plan = __import__("fp8train.inference.plan", fromlist=["DecodePlan"]).DecodePlan
    monkeypatch.setattr("fp8train.inference.plan.DecodePlan", lambda *a, **k: built.append(1) or real_plan(*a, **k))
    cli.main(["checkpoint=random", "prompt=ab", "max_new_tokens=4"])
    assert built and "4 steps" in capsys.readouterr().err
