"""Run launch/train.py, then write the FP32 master weights the engine holds to <run_dir>/master_fp32.pt.

    torchrun --standalone --nproc_per_node=2 tests/train/dump_master_weights.py <hydra overrides>

The ground truth for test_trained_model_zero.py: after Trainer.train returns (its last act is
the final checkpoint), every rank asks DeepSpeed for the full FP32 master copy of each
parameter with `deepspeed.utils.safe_get_full_fp32_param` (a collective: each rank contributes
its partition, under ZeRO-1/2, the BF16_Optimizer and ZeRO-3 alike), and rank 0 saves them by
parameter name. This reads the optimizer's live partitions, not the checkpoint files, so it is
independent of how trained_model.py reassembles those files.
"""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from fp8train.train import trainer as trainer_module  # noqa: E402

_train = trainer_module.Trainer.train


def _train_then_dump(self):
    from deepspeed.utils import safe_get_full_fp32_param

    summary = _train(self)
    master = {}
    for name, param in self.engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)  # every rank calls it: it gathers partitions
        assert full is not None, f"no FP32 master for {name}"
        master[name] = full.detach().clone().cpu()
    if self.dist.is_main:
        torch.save(master, self.spec.run_dir / "master_fp32.pt")
    return summary


trainer_module.Trainer.train = _train_then_dump
script = Path(__file__).resolve().parents[2] / "launch" / "train.py"
sys.argv = [str(script), *sys.argv[1:]]
runpy.run_path(str(script), run_name="__main__")
