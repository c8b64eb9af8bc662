import pytest

from tests.slurm.helpers import cluster_nodes


@pytest.fixture(scope="session")
def cluster() -> list[str]:
    """Names of the usable nodes of a running Slurm cluster; skips the test when there is none."""
    nodes, reason = cluster_nodes()
    if not nodes:
        pytest.skip(reason)
    return nodes


@pytest.fixture
def layout(cluster) -> tuple[int, int]:
    """(nodes, processes per node) for a 2-process CPU job: across 2 nodes when the cluster has
    them (the two-node CI cluster), else 2 processes on one node."""
    return (2, 1) if len(cluster) >= 2 else (1, 2)


@pytest.fixture(scope="session")
def submitit_plugin() -> None:
    """hydra/launcher=slurm needs the hydra-submitit-launcher plugin (the `slurm` extra)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                        reason="hydra-submitit-launcher missing: pip install -e '.[slurm]'")
