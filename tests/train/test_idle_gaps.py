"""benchmarks/idle_gaps.py: GPU idle gaps from a trace and the host work they are filed under,
on synthetic traces with known answers; and the trainer's step really emits its phase ranges."""

import pytest

from benchmarks.idle_gaps import OUTSIDE, attribute, busy_union, idle_gaps, report


def test_busy_union_merges_overlapping_streams():
    assert busy_union([(5, 9), (0, 3), (2, 4), (9, 12)]) == [(0, 4), (5, 12)]


def test_gaps_between_kernels_and_inside_a_window():
    gpu = [(100, 200), (150, 260), (300, 400), (405, 500)]
    assert idle_gaps(gpu, min_gap_ns=10) == [(260, 300)]  # 400 -> 405 is shorter than 10
    # the window's edges are idle too; a kernel sticking out of the window is clipped
    assert idle_gaps(gpu + [(590, 700)], 10, window=(50, 650)) == [(50, 100), (260, 300), (500, 590)]


def test_gaps_go_to_the_innermost_phase_and_ops_get_their_overlap():
    gaps = [(100, 140), (300, 310), (900, 950)]
    cpu = [(0, 500, "fp8train.backward"), (90, 200, "fp8train.fp8 update"),  # nested: innermost wins
           (95, 130, "cudaStreamSynchronize"), (120, 145, "aten::item"),
           (295, 320, "cudaGraphLaunch")]
    result = attribute(gaps, cpu)
    assert result["idle_ns"] == 40 + 10 + 50
    assert result["by_phase"] == {"fp8train.fp8 update": [40, 1], "fp8train.backward": [10, 1], OUTSIDE: [50, 1]}
    assert result["by_op"] == {"cudaStreamSynchronize": 30, "aten::item": 20, "cudaGraphLaunch": 10}
    text = report(result, wall_ns=1000)
    assert "| fp8train.fp8 update | 0.00 | 4.0% | 1 |" in text and "GPU idle" in text


@pytest.mark.slow
def test_the_trainer_step_records_its_phases(tmp_path):
    """One real optimizer step on the CPU under the profiler: the ranges idle_gaps files gaps under."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.bench_e2e import compose
    from fp8train.train.config import resolve
    from fp8train.train.trainer import Trainer

    cfg = compose("tiny", "hybrid", 1, "off", ["data.seq_len=32", "trainer.micro_batch_size=4",
                                                "trainer.global_batch_size=8", "trainer.compile=false"])
    trainer = Trainer(resolve(cfg, tmp_path))
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            trainer._optimizer_step()
    finally:
        trainer.close()
    names = {e.name for e in prof.events()}
    for phase in ("forward", "backward", "optimizer", "step guard", "fp8 update"):
        assert f"fp8train.{phase}" in names, phase
