"""Run launch/train.py with a fault injected (the reliability tests and scripts/fault_injection.py).

    FP8TRAIN_TEST_NAN_STEPS=5,6,7 python tests/train/inject_faults.py <hydra overrides>
        the training loss of every micro-batch of those steps (step s reads the s-th global
        batch of the data stream) is multiplied by NaN: a step that diverges, on every rank
    FP8TRAIN_TEST_RESUME_AT_STEP=7 python tests/train/inject_faults.py trainer.resume=PATH ...
        after loading the checkpoint, the run continues at step 7 (step counter and data
        position): a rollback made by hand, the reference for the automatic one

The variables are read by this test wrapper only, never by the package.
"""

import os
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fp8train.data.sampler import TrainBatches  # noqa: E402
from fp8train.models.llama import Transformer  # noqa: E402
from fp8train.train.checkpoint import Checkpointer  # noqa: E402

NAN_STEPS = {int(s) for s in os.environ.get("FP8TRAIN_TEST_NAN_STEPS", "").split(",") if s}
RESUME_AT = os.environ.get("FP8TRAIN_TEST_RESUME_AT_STEP")
_reading = {"step": 0}
_next, _forward, _load = TrainBatches.__next__, Transformer.forward, Checkpointer.load


def _next_recording_step(self):
    _reading["step"] = self.step + 1
    return _next(self)


def _forward_with_nan(self, input_ids, labels=None):
    loss = _forward(self, input_ids, labels)
    if labels is not None and self.training and _reading["step"] in NAN_STEPS:
        return loss * float("nan")
    return loss


def _load_then_move(self, engine, ref):
    client_state = _load(self, engine, ref)
    client_state["step"] = client_state["data"]["step"] = int(RESUME_AT)
    return client_state


TrainBatches.__next__ = _next_recording_step
Transformer.forward = _forward_with_nan
if RESUME_AT:
    Checkpointer.load = _load_then_move
script = Path(__file__).resolve().parents[2] / "launch" / "train.py"
sys.argv = [str(script), *sys.argv[1:]]
runpy.run_path(str(script), run_name="__main__")
