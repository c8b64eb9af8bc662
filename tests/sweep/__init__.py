"""Tests for fp8train.sweep: the compare command and local (basic launcher) sweeps."""
