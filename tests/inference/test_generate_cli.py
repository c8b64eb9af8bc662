"""launch/generate.py: settings checked up front, a run folder's weights loaded, text streamed."""

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


def _fake_run(tmp_path: Path):
    """The files load_run reads from a run folder: checkpoints/latest, meta, module state."""
    config = model_config("tiny", vocab_size=257, max_seq_len=64)
    model = build_model(config)
    tag = tmp_path / "checkpoints" / "step_0000010"
    tag.mkdir(parents=True)
    fields = {k: getattr(config, k) for k in config.__dataclass_fields__}
    meta = {"step": 10, "fingerprint": {"model": fields, "recipe": "bf16"}}
    (tag / "fp8train_meta.json").write_text(json.dumps(meta))
    torch.save({"module": {k: v.bfloat16() for k, v in model.state_dict().items()}}, tag / "mp_rank_00_model_states.pt")
    (tmp_path / "checkpoints" / "latest").write_text("step_0000010")
    return model


def test_run_folder_weights_are_loaded(tmp_path):
    cli = _cli()
    original = _fake_run(tmp_path)
    loaded = cli.load_run(tmp_path)
    for name, tensor in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.bfloat16().float()), name


def test_generation_streams_the_completion(tmp_path, capsys):
    cli = _cli()
    _fake_run(tmp_path)
    cli.main([f"checkpoint={tmp_path}", "prompt=\"def \"", "max_new_tokens=6", "kv_cache=int4", "weights=w4a16"])
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
    with pytest.raises(ValueError, match="no fp8train checkpoint"):
        _cli().load_run(tmp_path)


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
