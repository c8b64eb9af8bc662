"""Run launch/train.py, but die like a killed process while writing one checkpoint file.

    KILL_DURING_SAVE_OF=step_0000004 python tests/train/kill_during_save.py <hydra overrides>

Every torch.save whose path contains the tag writes a torn file (a few bytes of what should
have been a full checkpoint) and then calls os._exit(9): no cleanup, no finally blocks, exactly
what SIGKILL or a node failure in the middle of a write leaves on disk.
"""

import os
import runpy
import sys
from pathlib import Path

import torch

TAG = os.environ["KILL_DURING_SAVE_OF"]
_real_save = torch.save


def _dying_save(obj, f, *args, **kwargs):
    if TAG in str(f):
        with open(f, "wb") as handle:
            handle.write(b"PK\x03\x04 torn checkpoint")
        os._exit(9)
    return _real_save(obj, f, *args, **kwargs)


torch.save = _dying_save
script = Path(__file__).resolve().parents[2] / "launch" / "train.py"
sys.argv = [str(script), *sys.argv[1:]]
runpy.run_path(str(script), run_name="__main__")
