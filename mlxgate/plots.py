"""PNG plots (matplotlib, Agg backend; written atomically)."""

from __future__ import annotations

from pathlib import Path

from mlxgate.analysis.zones import zone_bands
from mlxgate.io import save_figure

ZONE_COLORS = {
    "HYPER-LASER": "#7a0019",
    "LASER": "#d7301f",
    "CAGE": "#fc8d59",
    "TRANSITION": "#fdcc8a",
    "LANTERN": "#b3e2cd",
    "CHAOS": "#cbd5e8",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def entropy_per_token(report: dict, path: str | Path, zones: str = "iris", title: str | None = None) -> None:
    """H_t (nats) per generated token for each prompt of a measure report, over the zone bands."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 5))
    rows = report["prompts"]
    top = max([max(r["entropy"]) for r in rows if r["entropy"]] + [1.0])
    for name, lo, hi in zone_bands(zones):
        hi_plot = min(hi, top * 1.15 + 0.5)
        if lo < hi_plot:
            ax.axhspan(max(lo, 0.0), hi_plot, color=ZONE_COLORS.get(name, "#eeeeee"), alpha=0.35, lw=0)
            ax.text(0.995, (max(lo, 0.0) + hi_plot) / 2, name, transform=ax.get_yaxis_transform(), ha="right", va="center", fontsize=8, alpha=0.8)
    for i, r in enumerate(rows):
        label = (r["prompt"][:40] + "…") if len(r["prompt"]) > 40 else r["prompt"]
        ax.plot(range(1, len(r["entropy"]) + 1), r["entropy"], lw=1.2, label=f"{i}: {label}")
    ax.set_xlabel("generated token")
    ax.set_ylabel("H_t (nats)")
    ax.set_ylim(0, top * 1.15 + 0.5)
    ax.set_title(title or "per-token logit entropy")
    ax.legend(fontsize=7, loc="upper left")
    save_figure(fig, path)
    plt.close(fig)
