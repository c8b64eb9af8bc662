"""The two ways a run stops on a problem, each printed by launch/train.py as one line, no traceback.

    StartupError   (fp8train/train/config.py)  bad input found before any work: exit code 2
    TrainingError  (here)                       a problem found while training: exit code 3

A TrainingError's message names what happened (the step, the file, the layer) and what is intact
(the newest good checkpoint), so the next command is obvious.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator

from fp8train.train import distributed

TRAINING_ERROR_EXIT_CODE = 3


class TrainingError(Exception):
    """The run stopped during training: divergence, a dataset file changed, a checkpoint that
    could not be written. Nothing already saved was lost; the message says what to do next."""


@contextlib.contextmanager
def named_failures(run_dir: Path, step: Callable[[], int]) -> Iterator[None]:
    """Turn the failures of the world outside into TrainingErrors: an OSError (a full disk under
    metrics.jsonl, a vanished folder) and a collective that failed because another rank died."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and not distributed.peer_failure(error):
            raise
        what = ("a collective failed: another rank has probably died (the launcher's report names "
                "it)" if isinstance(error, RuntimeError) else f"run folder {run_dir}")
        raise TrainingError(f"{str(error).splitlines()[0]} ({what}; step {step()}). Every "
                            f"committed checkpoint is intact: fix the cause and continue with "
                            f"trainer.resume=auto") from error
