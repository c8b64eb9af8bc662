"""Reports: perplexity per method and sensitivity, as JSON + a Markdown table + a PNG chart."""

from __future__ import annotations

import json
from pathlib import Path


def relative_rows(rows: list[dict], baseline: str = "baseline") -> list[dict]:
    """Add 'delta_pct' (perplexity change vs the baseline row, in %) to every row."""
    base = next(r for r in rows if r["method"] == baseline)["ppl"]
    return [{**r, "delta_pct": 100.0 * (r["ppl"] / base - 1.0)} for r in rows]


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(value):
        return f"{value:.4g}" if isinstance(value, float) else str(value)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _bar_chart(path: Path, labels: list[str], values: list[float], ylabel: str, title: str,
               baseline: float | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(labels) + 2), 4))
    ax.bar(range(len(values)), values, color="tab:blue")
    if baseline is not None:
        ax.axhline(baseline, color="black", linestyle="--", linewidth=1, label="baseline")
        ax.legend()
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_perplexity_report(folder: str | Path, rows: list[dict], title: str, extra: dict | None = None,
                            stem: str = "report", notes: list[str] = ()) -> Path:
    """rows: {'method', 'loss', 'ppl', ...}; one must be 'baseline'. Writes stem.json/.md/.png;
    `notes` are lines printed under the Markdown table."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = relative_rows(rows)
    (folder / f"{stem}.json").write_text(json.dumps({"title": title, **(extra or {}), "rows": rows}, indent=1))
    columns = ["method"] + [c for c in ("avg_bits", "loss", "ppl", "delta_pct", "seconds") if c in rows[0] or c == "delta_pct"]
    (folder / f"{stem}.md").write_text(f"# {title}\n\n" + markdown_table(rows, columns)
                                       + "".join(f"\n{note}\n" for note in notes))
    base = rows[0]["ppl"] if rows[0]["method"] == "baseline" else None
    _bar_chart(folder / f"{stem}.png", [r["method"] for r in rows], [r["ppl"] for r in rows], "perplexity", title, base)
    return folder / f"{stem}.md"


def write_sensitivity_report(folder: str | Path, rows: list[dict], labels: list[str]) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sensitivity.json").write_text(json.dumps(rows, indent=1))
    ranked = sorted(rows, key=lambda r: r[f"delta_{labels[0]}"], reverse=True)
    columns = ["layer", "numel"] + [f"delta_{label}" for label in labels]
    (folder / "sensitivity.md").write_text("# Per-layer sensitivity (loss increase, nats/token)\n\n"
                                           + markdown_table(ranked, columns))
    _bar_chart(folder / "sensitivity.png", [r["layer"] for r in rows], [r[f"delta_{labels[0]}"] for r in rows],
               f"loss increase ({labels[0]})", "per-layer sensitivity")
    return folder / "sensitivity.md"
