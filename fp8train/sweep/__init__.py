"""Sweeps: running many configurations and comparing them.

    compare        `python -m fp8train.sweep.compare multirun/<id>`: table + loss/gap plots vs bf16
    quality        `python -m fp8train.sweep.quality`: recipes x seeds loss-gap study (run_pool runs the
                   trainer one run per GPU; gap_stats: paired t-intervals; gap_plot: loss_gap.png)
    fp8_probe      per-layer SQNR / saturation / underflow of finished runs
    recipe_error   the loss gap and gradient SQNR one FP8 recipe injects into a trained model's step
    qat_recovery   base / QAT fine-tune / plain fine-tune, perplexity before and after the RTN export
    run_model      a finished run's model and validation loss back in memory
    runs           reads a run directory back (metrics.jsonl, summary.json, .hydra record)
    submitit_env   Hydra callback giving each task of a submitit (Slurm launcher) job its
                   torch.distributed rank/world variables; used by conf/hydra/launcher/slurm.yaml

Sweeps themselves are Hydra multiruns of launch/train.py: the basic launcher runs them one after
another on this machine, `hydra/launcher=slurm` submits them as a Slurm job array.
"""
