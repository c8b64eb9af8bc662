"""The main job: Hydra config -> FP8 model -> DeepSpeed engine -> train, evaluate, checkpoint.

    python launch/train.py                                       # embedded default, one process
    torchrun --nproc_per_node=2 launch/train.py +recipe=v3_fp8   # N processes, one run folder
    python launch/train.py +recipe=bf16 model.size=small trainer.max_steps=1000

Outputs go to runs/<run_id>/ (see fp8train/train/run_id.py). Config groups live in conf/,
FP8 recipe presets in recipes/ (the `recipe` group, registered below from those files).
"""

import sys
from pathlib import Path

# Runs from a plain checkout too (no `pip install -e .`), e.g. under torchrun on a GPU box.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from fp8train.numerics.recipe import RECIPES_DIR
from fp8train.train.run_id import register_run_id_resolver
from fp8train.train.schema import register_recipes, register_schema

register_schema()
register_recipes(RECIPES_DIR)
register_run_id_resolver()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from fp8train.train.config import StartupError  # heavy imports after Hydra's validation
    from fp8train.train.errors import TRAINING_ERROR_EXIT_CODE, TrainingError
    from fp8train.train.trainer import run

    try:
        run(cfg)
    except StartupError as error:  # bad input: say what and how to fix it, no traceback
        print(f"fp8train: error: {error}", file=sys.stderr)
        sys.exit(2)
    except TrainingError as error:  # divergence, changed data, a checkpoint that cannot be written
        print(f"fp8train: error: {error}", file=sys.stderr)
        if HydraConfig.get().mode != RunMode.MULTIRUN:  # a sweep goes on with its other jobs
            sys.exit(TRAINING_ERROR_EXIT_CODE)


if __name__ == "__main__":
    main()
