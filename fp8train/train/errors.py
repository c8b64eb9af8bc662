"""The two ways a run stops on a problem, each printed by launch/train.py as one line, no traceback.

    StartupError   (fp8train/train/config.py)  bad input found before any work: exit code 2
    TrainingError  (here)                       a problem found while training: exit code 3

A TrainingError's message names what happened (the step, the file, the layer) and what is intact
(the newest good checkpoint), so the next command is obvious.
"""

from __future__ import annotations

TRAINING_ERROR_EXIT_CODE = 3


class TrainingError(Exception):
    """The run stopped during training: divergence, a dataset file changed, a checkpoint that
    could not be written. Nothing already saved was lost; the message says what to do next."""
