"""Tests for launch/slurm/ and the Hydra Slurm launcher; cluster tests need .ci/slurm/setup.sh."""
