import pytest

from tests.train.helpers import check_ok, launch


@pytest.fixture(scope="session")
def short_run(tmp_path_factory):
    """A finished 2-step bf16 run (checkpoint at step 2) shared by tests that need a checkpoint."""
    run_dir = tmp_path_factory.mktemp("short_run")
    check_ok(launch(run_dir, "+recipe=bf16", "trainer.max_steps=2"))
    return run_dir
