"""launch/quantize.py end to end on a tiny run trained here, and its bad-input errors.

The run is trained with the blockwise FP8 recipe for a few steps (seconds), so the same run also
checks the lossless FP8 export: evaluated in BF16, the exported 128x128 E4M3 model must give exactly
the loss of the trained model under its own recipe."""

import hashlib
import json
import subprocess
import sys

import pytest
import torch

from fp8train.ptq import load_quantized
from fp8train.train.quantize_run import build_from_config, run_quantize
from fp8train.train.trained_model import load_trained_model
from tests.train.helpers import REPO, check_ok, clean_env, launch

pytestmark = pytest.mark.slow
FAST = ["calibration.samples=8", "calibration.seq_len=32", "calibration.batch_size=4", "eval.seq_len=32",
        "eval.windows=8", "progress=false"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("blockwise_run")
    check_ok(launch(run, "+recipe=blockwise", "trainer.max_steps=4"))
    return run


def _fingerprint(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _quantize(*args):
    return subprocess.run([sys.executable, str(REPO / "launch" / "quantize.py"), *args], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=900)


def test_quantize_command_end_to_end(run_dir, tmp_path):
    before = _fingerprint(run_dir)
    out = tmp_path / "q"
    result = _quantize(f"checkpoint={run_dir}", "+quant=gptq_w4_g64", "compare=[fp8_blockwise]", f"output={out}",
                       "eval.dtype=bfloat16", "eval.source_recipe=true", "plan_budget_bits=5", *FAST)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("model.safetensors", "config.json", "report.json", "report.md", "report.png", "plan.yaml",
                 "sensitivity.json", "sensitivity.png"):
        assert (out / name).is_file(), name
    rows = {r["method"]: r for r in json.loads((out / "report.json").read_text())["rows"]}
    assert rows["fp8_blockwise"]["loss"] == rows["trained (blockwise)"]["loss"]  # lossless: the same casts
    assert 4.0 < rows["gptq_w4_g64 + plan"]["avg_bits"] <= 5.0  # the greedy mixed-precision plan
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["format"] == "mixed-precision"
    assert config["fp8train"]["split_fused_groups"] == [] and "FusedGroupSplitWarning" not in result.stderr
    model = load_quantized(out, build_from_config)
    tokens = torch.randint(0, 257, (2, 32))
    assert torch.isfinite(model(tokens)).all()
    generated = subprocess.run([sys.executable, str(REPO / "launch" / "generate.py"), f"checkpoint={out}",
                                'prompt="def "', "max_new_tokens=5", "kv_cache=int8"], cwd=REPO, env=clean_env(),
                               capture_output=True, text=True, timeout=600)  # the quantized folder generates
    assert generated.returncode == 0 and generated.stdout.startswith("def "), generated.stdout + generated.stderr
    assert _fingerprint(run_dir) == before  # the source run is never touched


def _cfg(run_dir, tmp_path, **changes):
    cfg = {"checkpoint": str(run_dir), "output": str(tmp_path / "out"), "overwrite": False, "device": "cpu",
           "progress": False, "compare": [], "plan": None, "plan_budget_bits": None,
           "plan_high": {"format": "int8", "granularity": "row"}, "sensitivity_windows": 1,
           "calibration": {"dataset": "run", "samples": 4, "seq_len": 32, "batch_size": 4, "seed": 0},
           "eval": {"windows": 2, "seq_len": 32, "batch_size": 2, "dtype": "float32", "source_recipe": False},
           "quant": {"name": "rtn_w8", "method": "rtn", "weight": {"format": "int8", "granularity": "row"}}}
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            cfg[section] = {**cfg[section], field: value}
        else:
            cfg[section] = value
    return cfg


def test_bad_input_is_named(run_dir, tmp_path):
    before = _fingerprint(run_dir)
    bad = [({"checkpoint": str(tmp_path / "nope")}, "does not exist"),
           ({"checkpoint": str(tmp_path)}, "no fp8train checkpoint"),
           ({"quant": {"method": "gptq", "weight": {"format": "uint4", "granularity": "tile", "group_size": 96,
                                                     "symmetric": False}}}, "group_size=96 does not divide"),
           ({"calibration__samples": 10 ** 7}, "too little calibration data"),
           ({"output": str(run_dir / "q")}, "inside the source run"),
           ({"compare": ["no_such_preset"]}, "unknown quant preset 'no_such_preset'"),
           ({"plan_fuse_groups": "yes"}, "plan_fuse_groups='yes'; give true"),
           ({"quant": None}, "add \\+quant=NAME")]
    for changes, message in bad:
        with pytest.raises(ValueError, match=message):
            run_quantize(_cfg(run_dir, tmp_path, **changes))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists"):
        run_quantize(_cfg(run_dir, tmp_path))
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert _fingerprint(run_dir) == before


def test_deadline_skips_compare_presets(run_dir, tmp_path, capsys):
    """deadline_s=0: the main preset still runs (it is exported); every compare preset is skipped and named."""
    report = run_quantize(_cfg(run_dir, tmp_path, compare=["rtn_w4_g128", "fp8_w8a8"], deadline_s=0))
    data = json.loads(report.with_suffix(".json").read_text())
    assert [r["method"] for r in data["rows"]] == ["baseline", "rtn_w8"]
    assert data["skipped"] == ["rtn_w4_g128", "fp8_w8a8"]
    assert "Not run (deadline_s=0 passed): rtn_w4_g128, fp8_w8a8" in report.read_text()
    assert "rtn_w8: ppl " in capsys.readouterr().out  # one console line per finished preset
    with pytest.raises(ValueError, match="deadline_s=-1; give seconds >= 0"):
        run_quantize(_cfg(run_dir, tmp_path / "bad", deadline_s=-1))


def test_missing_export_package_is_named_before_any_work(run_dir, tmp_path, monkeypatch):
    """Without compressed-tensors the job stops before calibrating (naming the package and
    export=false), an existing output folder survives even with overwrite=true, and export=false
    still quantizes, evaluates and reports without writing a model folder."""
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)  # import raises ImportError
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="needs the compressed-tensors package.*export=false"):
        run_quantize(_cfg(run_dir, tmp_path, overwrite=True))
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    report = run_quantize(_cfg(run_dir, tmp_path / "noexport", export=False))
    assert [r["method"] for r in json.loads(report.with_suffix(".json").read_text())["rows"]] == ["baseline", "rtn_w8"]
    assert not list(report.parent.glob("*.safetensors"))


def test_unknown_preset_on_the_command_line(run_dir):
    result = _quantize(f"checkpoint={run_dir}", "+quant=not_a_preset")
    assert result.returncode != 0 and "not_a_preset" in result.stderr


def test_loader_reads_fp32_master_weights(run_dir):
    trained = load_trained_model(run_dir)
    assert trained.recipe == "blockwise" and trained.model.layers[0].attn.q_proj.weight.dtype == torch.float32
    states = torch.load(next((trained.checkpoint.path).glob("mp_rank_00_model_states.pt")), weights_only=False)
    bf16 = states["module"]["layers.0.attn.q_proj.weight"]
    master = trained.model.layers[0].attn.q_proj.weight.detach()
    assert torch.equal(master.to(torch.bfloat16), bf16)  # the engine's BF16 copy is the master, rounded
    assert not torch.equal(master, bf16.float())         # ... but the master has more bits


def test_evaluate_command_puts_the_run_and_its_quantized_folders_in_one_table(run_dir, tmp_path):
    """launch/evaluate.py: the trained model and a quantized folder on the same windows; the folder's
    row reproduces the loss launch/quantize.py reported for it (same windows, dtype and batch)."""
    out = tmp_path / "rtn_w8"
    result = _quantize(f"checkpoint={run_dir}", "+quant=rtn_w8", f"output={out}", *FAST)
    assert result.returncode == 0, result.stdout + result.stderr
    reported = {r["method"]: r for r in json.loads((out / "report.json").read_text())["rows"]}
    table = tmp_path / "evaluation"
    evaluate = [sys.executable, str(REPO / "launch" / "evaluate.py")]
    result = subprocess.run([*evaluate, f"checkpoint={run_dir}", f"quantized=[{out}]", f"output={table}",
                             "eval.seq_len=32", "eval.windows=8"], cwd=REPO, env=clean_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {r["method"]: r for r in json.loads((table / "evaluation.json").read_text())["rows"]}
    assert set(rows) == {"baseline", "rtn_w8"} and (table / "evaluation.png").is_file()
    assert rows["baseline"]["loss"] == pytest.approx(reported["baseline"]["loss"], rel=1e-6)
    assert rows["rtn_w8"]["loss"] == pytest.approx(reported["rtn_w8"]["loss"], rel=1e-6)
    assert "rtn_w8" in result.stdout  # the Markdown table is printed
    nothing = subprocess.run(evaluate, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert nothing.returncode == 2 and "nothing to evaluate" in nothing.stderr and "Traceback" not in nothing.stderr


@pytest.mark.parametrize("fuse", [True, False])
def test_plan_fuse_groups_reaches_the_greedy_plan(run_dir, tmp_path, monkeypatch, fuse):
    """plan_fuse_groups is passed to greedy_plan, and the plan written is what it returned."""
    import fp8train.train.quantize_run as quantize_run
    from fp8train.ptq.plan import QuantPlan, greedy_plan

    seen = []
    monkeypatch.setattr(quantize_run, "greedy_plan", lambda *a, **k: seen.append(k) or greedy_plan(*a, **k))
    cfg = _cfg(run_dir, tmp_path, plan_budget_bits=5, plan_fuse_groups=fuse, export=False,
               quant={"name": "rtn_w4", "method": "rtn", "weight": {"format": "uint4", "granularity": "tile",
                                                                  "group_size": 32, "symmetric": False}})
    run_quantize(cfg)
    assert seen == [{"fuse_groups": fuse}]
    plan = QuantPlan.load(tmp_path / "out" / "plan.yaml")
    names = [row["layer"] for row in json.loads((tmp_path / "out" / "sensitivity.json").read_text())]
    assert len(names) > 7 and plan.layers  # some layers promoted
    if fuse:
        assert plan.split_groups(names) == []
