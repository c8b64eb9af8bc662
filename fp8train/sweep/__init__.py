"""Sweeps: running many configurations and comparing them.

    compare        `python -m fp8train.sweep.compare multirun/<id>`: table + loss/gap plots vs bf16
    runs           reads a run directory back (metrics.jsonl, summary.json, .hydra record)
    submitit_env   Hydra callback giving each task of a submitit (Slurm launcher) job its
                   torch.distributed rank/world variables; used by conf/hydra/launcher/slurm.yaml

Sweeps themselves are Hydra multiruns of launch/train.py: the basic launcher runs them one after
another on this machine, `hydra/launcher=slurm` submits them as a Slurm job array.
"""
