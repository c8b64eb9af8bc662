"""Deterministic batches of fixed-length windows, identical for any split across ranks.

Windows. A split of N tokens is cut into n = (N - 1) // T non-overlapping windows of T + 1
tokens starting at multiples of T (T = seq_len); neighbours share one token so every token
except the first is a label exactly once per epoch. A window w gives
input_ids = w[:-1], labels = w[1:] (next-token prediction), both int64.

One global sample stream. Sample i (i = 0, 1, 2, ...) is window perm_e[i mod n] where
e = i // n is the epoch and perm_e a permutation drawn from numpy PCG64(seed + e). The stream
depends only on (dataset, seq_len, seed); ranks and micro-steps just take slices of it:

    G = micro_batch_size * grad_accum_steps * world_size           (global batch, samples)
    optimizer step s uses samples s*G .. s*G + G - 1
    rank r, micro-step a of step s takes b = micro_batch_size samples starting at
        s*G + (a*W + r)*b

So the samples of an optimizer step do not depend on how they are split: 1 process with 8
micro-steps sees exactly the samples that 4 ranks x 2 micro-steps see, and the averaged
gradient is the same up to float summation order. Resuming needs only (step, micro_step).

Validation (`ValBatches`) walks the val split's windows in order, no shuffling, each global
batch of batch_size * world_size windows split across ranks; every rank gets the same number
of batches so collective calls during evaluation stay matched.
"""

from __future__ import annotations

import numpy as np
import torch

from fp8train.data.token_file import TokenFile

_STREAM_FIELDS = ("seed", "seq_len", "num_windows", "global_batch_size")
_LAYOUT_FIELDS = ("micro_batch_size", "grad_accum_steps", "world_size")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_rank(rank: int, world_size: int) -> None:
    _check_positive(world_size=world_size)
    if not isinstance(rank, (int, np.integer)) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")


def _count_windows(token_file: TokenFile, seq_len: int, what: str) -> int:
    num_windows = (token_file.num_tokens - 1) // seq_len
    if num_windows < 1:
        raise ValueError(f"{token_file.path} has {token_file.num_tokens} tokens, too few for one "
                         f"{what} window of seq_len + 1 = {seq_len + 1}; use a smaller seq_len "
                         f"or more data")
    return num_windows


def _stack_windows(token_file: TokenFile, starts: np.ndarray, seq_len: int):
    windows = np.stack([token_file.read(int(start), seq_len + 1) for start in starts])  # [b, T+1]
    windows = torch.from_numpy(windows)
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()  # input_ids, labels: [b, T]


class TrainBatches:
    """Training micro-batches from the global sample stream; also an infinite iterator.

    `get(step, micro_step)` is random access. Iterating yields the micro-batch at the current
    (step, micro_step) and advances it; `state_dict()` / `load_state_dict()` save and restore
    that position for exact resumption.
    """

    def __init__(self, token_file: TokenFile, seq_len: int, micro_batch_size: int,
                 grad_accum_steps: int = 1, rank: int = 0, world_size: int = 1, seed: int = 0):
        _check_positive(seq_len=seq_len, micro_batch_size=micro_batch_size,
                        grad_accum_steps=grad_accum_steps)
        _check_rank(rank, world_size)
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.token_file = token_file
        self.seq_len = int(seq_len)
        self.micro_batch_size = int(micro_batch_size)
        self.grad_accum_steps = int(grad_accum_steps)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.num_windows = _count_windows(token_file, self.seq_len, "training")
        self.global_batch_size = self.micro_batch_size * self.grad_accum_steps * self.world_size
        self.step = 0
        self.micro_step = 0
        self._permutations: dict[int, np.ndarray] = {}

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:  # a batch spans at most two epochs at a time
                self._permutations.pop(min(self._permutations))
            generator = np.random.Generator(np.random.PCG64(self.seed + epoch))
            self._permutations[epoch] = generator.permutation(self.num_windows)
        return self._permutations[epoch]

    def window_starts(self, sample_indices: np.ndarray) -> np.ndarray:
        """Token offset of the window that each global sample index maps to."""
        epochs, positions = np.divmod(np.asarray(sample_indices, dtype=np.int64), self.num_windows)
        window_ids = np.array([self._permutation(int(e))[p] for e, p in zip(epochs, positions)],
                              dtype=np.int64)
        return window_ids * self.seq_len

    def sample_indices(self, step: int, micro_step: int) -> np.ndarray:
        """Global sample indices of this rank's micro-batch at (step, micro_step)."""
        if not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        if not 0 <= micro_step < self.grad_accum_steps:
            raise ValueError(f"micro_step must be in [0, grad_accum_steps="
                             f"{self.grad_accum_steps}), got {micro_step!r}")
        first = (step * self.global_batch_size
                 + (micro_step * self.world_size + self.rank) * self.micro_batch_size)
        return np.arange(first, first + self.micro_batch_size, dtype=np.int64)

    def get(self, step: int, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels), each int64 [micro_batch_size, seq_len]."""
        starts = self.window_starts(self.sample_indices(step, micro_step))
        return _stack_windows(self.token_file, starts, self.seq_len)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.get(self.step, self.micro_step)
        self.micro_step += 1
        if self.micro_step == self.grad_accum_steps:
            self.step, self.micro_step = self.step + 1, 0
        return batch

    def state_dict(self) -> dict:
        """Position of the next micro-batch plus everything that defines the stream."""
        return {"step": self.step, "micro_step": self.micro_step, "seed": self.seed,
                "seq_len": self.seq_len, "num_windows": self.num_windows,
                "global_batch_size": self.global_batch_size,
                "micro_batch_size": self.micro_batch_size,
                "grad_accum_steps": self.grad_accum_steps, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Resume at state's position; refuse states whose stream differs from this one.

        The layout (micro_batch_size, grad_accum_steps, world_size) may change between runs as
        long as the global batch size is the same and the state sits at a step boundary
        (micro_step 0): the samples of every later step are then unchanged.
        """
        missing = [key for key in ("step", "micro_step", *_STREAM_FIELDS) if key not in state]
        if missing:
            raise ValueError(f"data loader state is missing {missing}; it was not written by "
                             f"TrainBatches.state_dict()")
        current = self.state_dict()
        for field in _STREAM_FIELDS:
            if state[field] != current[field]:
                raise ValueError(f"cannot resume: {field} was {state[field]!r} in the saved "
                                 f"state but is {current[field]!r} now; the sample stream would "
                                 f"change. Use the saved {field}")
        if state["micro_step"] != 0:
            for field in _LAYOUT_FIELDS:
                if field in state and state[field] != current[field]:
                    raise ValueError(f"cannot resume mid-step (micro_step {state['micro_step']}) "
                                     f"with a different {field} ({state[field]!r} saved, "
                                     f"{current[field]!r} now); resume from a step boundary")
        if not 0 <= state["micro_step"] < self.grad_accum_steps or state["step"] < 0:
            raise ValueError(f"saved position step={state['step']}, micro_step="
                             f"{state['micro_step']} is invalid for grad_accum_steps="
                             f"{self.grad_accum_steps}")
        self.step, self.micro_step = int(state["step"]), int(state["micro_step"])


class ValBatches:
    """Sequential, non-overlapping val windows, sharded by rank; restarts on every iter()."""

    def __init__(self, token_file: TokenFile, seq_len: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, max_batches: int | None = None):
        _check_positive(seq_len=seq_len, batch_size=batch_size)
        _check_rank(rank, world_size)
        if max_batches is not None:
            _check_positive(max_batches=max_batches)
        self.token_file = token_file
        self.seq_len, self.batch_size = int(seq_len), int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        num_windows = _count_windows(token_file, self.seq_len, "validation")
        windows_per_batch = self.batch_size * self.world_size
        available = num_windows // windows_per_batch
        if available < 1:
            raise ValueError(f"{token_file.path} has {num_windows} windows of {seq_len + 1} "
                             f"tokens, fewer than one global val batch (batch_size {batch_size} x "
                             f"world_size {world_size}); lower the val batch size or seq_len, or "
                             f"prepare with a larger --val-fraction")
        self.num_batches = available if max_batches is None else min(available, max_batches)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        for batch_index in range(self.num_batches):
            first = (batch_index * self.world_size + self.rank) * self.batch_size
            starts = np.arange(first, first + self.batch_size, dtype=np.int64) * self.seq_len
            yield _stack_windows(self.token_file, starts, self.seq_len)
