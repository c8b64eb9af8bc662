"""The training job: Hydra config -> FP8 model -> DeepSpeed engine -> train, evaluate, checkpoint.

Module map (read in this order): schema (typed config), run_id (one output folder per launch),
config (resolve the config into runtime objects; every user error surfaces there), distributed,
engine (DeepSpeed config, optimizer, LR schedule), trainer (build, train, close), evaluate,
checkpoint (atomic commit, resume), signals (preemption), logger (rank-0 only concerns), summary.
Entry point: launch/train.py.
"""
