"""The training job: Hydra config -> FP8 model -> DeepSpeed engine -> train, evaluate, checkpoint.

Module map (read in this order): schema (typed config), run_id (one output folder per launch),
config (resolve the config into runtime objects; every user error surfaces there), distributed,
engine (DeepSpeed config, optimizer, LR schedule), trainer (build, train, close), evaluate,
checkpoint (atomic commit, resume), signals (preemption), logger (rank-0 only concerns), summary.
Reliability: step_guard (a non-finite step is never applied), divergence (stop | skip | rollback),
integrity (sha256 manifests), branching (resuming from an older checkpoint), data_watch, errors.
Entry point: launch/train.py.
"""
