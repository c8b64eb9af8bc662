"""Validation loss / perplexity of a trained model and of quantized model folders, in one table.

    python launch/evaluate.py checkpoint=runs/<id> quantized=[quantized/<id>-gptq_w4_g128,quantized/<id>-rtn_w8]

Writes evaluation.{json,md,png} under `output` (default quantized/evaluation). Options: conf/evaluate.yaml.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from fp8train.train.quantize_run import run_evaluate

    try:
        report = run_evaluate(OmegaConf.to_container(cfg, resolve=True))
    except (ValueError, FileNotFoundError) as error:
        print(f"fp8train evaluate: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(report.read_text())


if __name__ == "__main__":
    main()
