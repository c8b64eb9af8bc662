"""Post-training quantization of a trained run: quantize, evaluate, export (compressed-tensors).

    python launch/quantize.py checkpoint=runs/<id> +quant=gptq_w4_g128
    python launch/quantize.py checkpoint=runs/<id> +quant=rtn_w4_g128 compare=[gptq_w4_g128,awq_w4_g128]
    python launch/quantize.py checkpoint=runs/<id> +quant=gptq_w4_g128 plan_budget_bits=5   # mixed precision
    python launch/quantize.py checkpoint=runs/<id> +quant=gptq_w4_g128 plan=quantized/x/plan.yaml

Presets live in conf/quant/*.yaml (a new one needs no code); the options in conf/quantize.yaml.
See docs/QUANTIZATION.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402


@hydra.main(config_path="../conf", config_name="quantize", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from fp8train.train.quantize_run import run_quantize

    try:
        report = run_quantize(OmegaConf.to_container(cfg, resolve=True))
    except (ValueError, FileNotFoundError) as error:  # bad input: what and how to fix it, no traceback
        print(f"fp8train quantize: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(report.read_text())
    print(f"quantized model and report in {report.parent}")


if __name__ == "__main__":
    main()
