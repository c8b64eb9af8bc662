"""Bad input fails before training, with a message naming the problem, and loses nothing."""

from __future__ import annotations

import pytest

from tests.train.helpers import launch, output


def _fails_before_training(result, run_dir, *expected: str) -> str:
    text = output(result)
    assert result.returncode != 0, text[-4000:]
    for fragment in expected:
        assert fragment in text, f"{fragment!r} not in:\n{text[-4000:]}"
    assert not (run_dir / "metrics.jsonl").exists(), "training started"
    assert not (run_dir / "checkpoints").exists(), "a checkpoint was written"
    return text


def test_unknown_recipe_lists_the_available_ones(tmp_path):
    result = launch(tmp_path, "+recipe=v9_fp8")
    text = _fails_before_training(result, tmp_path, "Could not find 'recipe/v9_fp8'",
                                  "Available options in 'recipe'")
    for preset in ("bf16", "v3_fp8", "hybrid", "blockwise"):
        assert preset in text


def test_unknown_config_key(tmp_path):
    result = launch(tmp_path, "trainer.max_stepz=3")
    _fails_before_training(result, tmp_path, "Key 'max_stepz' not in 'TrainerConfig'")


def test_wrong_type(tmp_path):
    result = launch(tmp_path, "trainer.max_steps=three")
    _fails_before_training(result, tmp_path, "trainer.max_steps",
                           "could not be converted to Integer")


def test_bad_recipe_field_is_named(tmp_path):
    result = launch(tmp_path, "+recipe=v3_fp8", "recipe.weight.format=e3m4")
    _fails_before_training(result, tmp_path, "recipe", "e3m4")


def test_missing_data_dir(tmp_path):
    missing = tmp_path / "no_such_dataset"
    result = launch(tmp_path / "run", "+recipe=bf16", f"data.path={missing}")
    _fails_before_training(result, tmp_path / "run", f"data.path={missing}", "does not exist",
                           "fp8train.data.prepare")


def test_truncated_data_file(tmp_path, prepared_dataset):
    (prepared_dataset / "train.bin").write_bytes((prepared_dataset / "train.bin").read_bytes()[:-7])
    result = launch(tmp_path / "run", "+recipe=bf16", f"data.path={prepared_dataset}")
    _fails_before_training(result, tmp_path / "run", "corrupt or truncated", "train.bin")


def test_seq_len_longer_than_a_split(tmp_path, prepared_dataset):
    """Issue 13 item 4: refused with the config, before the process group or DeepSpeed exist."""
    result = launch(tmp_path / "run", "+recipe=bf16", f"data.path={prepared_dataset}",
                    "data.seq_len=16098")
    text = _fails_before_training(result, tmp_path / "run", "data.seq_len=16098",
                                  "too few for one training window of seq_len + 1 = 16099",
                                  str(prepared_dataset / "train.bin"))
    assert result.returncode == 2 and "Traceback" not in text


def test_global_batch_not_divisible(tmp_path):
    result = launch(tmp_path, "+recipe=bf16", "trainer.global_batch_size=6")
    _fails_before_training(result, tmp_path, "trainer.global_batch_size=6",
                           "multiple of trainer.micro_batch_size")


def test_fp16_needs_a_gpu(tmp_path):
    result = launch(tmp_path, "+recipe=bf16", "deepspeed=fp16", "trainer.device=cpu")
    _fails_before_training(result, tmp_path, "deepspeed.precision=fp16 needs a CUDA GPU")


def _snapshot(folder) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _assert_nothing_lost(before: dict) -> None:
    """Every file is still there, unchanged; log files may only have grown."""
    for path, content in before.items():
        now = path.read_bytes()
        assert now[:len(content)] == content if path.suffix == ".log" else now == content, path


def test_checkpoint_of_another_model_shape(tmp_path, short_run):
    before = _snapshot(short_run)
    result = launch(short_run, "+recipe=bf16", "trainer.max_steps=4",
                    "+model.overrides.d_model=64")
    text = output(result)
    assert result.returncode != 0, text[-4000:]
    assert "different model shape" in text and "d_model=128" in text and "d_model=64" in text, text
    _assert_nothing_lost(before)


def test_checkpoint_of_another_recipe(tmp_path, short_run):
    result = launch(tmp_path / "other", "+recipe=v3_fp8", f"trainer.resume={short_run}/checkpoints")
    _fails_before_training(result, tmp_path / "other", "trained with recipe 'bf16'",
                           "this run uses 'v3_fp8'")


def test_starting_over_in_a_run_folder_with_checkpoints(tmp_path, short_run):
    before = _snapshot(short_run)
    result = launch(short_run, "+recipe=bf16", "trainer.resume=none")
    assert result.returncode != 0 and "already holds checkpoints" in output(result)
    _assert_nothing_lost(before)


def test_resume_path_without_checkpoint(tmp_path):
    result = launch(tmp_path / "run", "+recipe=bf16", f"trainer.resume={tmp_path}")
    _fails_before_training(result, tmp_path / "run", f"trainer.resume={tmp_path!s}",
                           "no fp8train checkpoint at")


@pytest.fixture
def prepared_dataset(tmp_path):
    from fp8train.data import prepare_dataset

    text = tmp_path / "text"
    text.mkdir()
    (text / "a.py").write_text("def f(x):\n    return x + 1\n" * 400)
    return prepare_dataset([text], tmp_path / "dataset", val_fraction=0.2, progress=False)



def test_te_backend_without_transformer_engine_says_how_to_install(tmp_path):
    pytest.importorskip("torch")
    try:
        import transformer_engine.pytorch  # noqa: F401
        pytest.skip("Transformer Engine is installed here: nothing to refuse")
    except ImportError:
        pass
    result = launch(tmp_path, "+recipe=hybrid", "recipe.backend=te")
    _fails_before_training(result, tmp_path, "backend=te is unavailable", "pip install -e .[te]")


@pytest.mark.parametrize("recipe", ["bf16", "v3_fp8"])  # FP8 off (checked here) and on (the backend policy)
def test_bad_te_fallback_names_the_allowed_values(recipe):
    from fp8train.numerics import load_recipe
    from fp8train.numerics.backend_policy import TE_FALLBACKS
    from fp8train.train.config import _check_te

    with pytest.raises(ValueError, match=r"te_fallback='nativ'; choose one of \['error', 'native'\]"):
        _check_te(load_recipe(recipe), "nativ")
    for value in TE_FALLBACKS:
        _check_te(load_recipe(recipe), value)


def test_bad_compile_mode_names_the_torch_compile_modes(tmp_path):
    result = launch(tmp_path, "trainer.compile=true", "trainer.compile_mode=reduce_overhead")
    _fails_before_training(result, tmp_path, "trainer.compile_mode='reduce_overhead' is not a torch.compile mode",
                           "'reduce-overhead'")


def test_compile_mode_reaches_torch_compile():
    from fp8train.train.compiling import COMPILE_MODES, compile_mode_kwargs

    assert compile_mode_kwargs("default") == {}, "the default mode passes nothing (torch's own default)"
    for mode in COMPILE_MODES[1:]:
        assert compile_mode_kwargs(mode) == {"mode": mode}
