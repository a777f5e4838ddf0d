"""PNG plots of the analysis commands: KL per position (compare) and spectra by layer (spectrum)."""

from __future__ import annotations

from pathlib import Path

from mlxgate.io import save_figure
from mlxgate.plots import _pyplot

STATUS_COLORS = {"HEALTHY": "#1a9850", "DRIFTING": "#fdae61", "WARNING": "#d73027"}


def kl_per_position(report: dict, path: str | Path, title: str | None = None) -> None:
    """KL(A‖B)_t (nats) per position for each prompt of a compare report, with the pooled
    mean and rmse as horizontal lines (and τ, if the report has a threshold)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 5))
    for i, r in enumerate(report["prompts"]):
        label = (r["prompt"][:40] + "…") if len(r["prompt"]) > 40 else r["prompt"]
        ax.plot(range(1, len(r["kl"]) + 1), r["kl"], lw=1.1, label=f"{i}: {label}")
    agg = report["pooled"]["aggregates"]
    ax.axhline(agg["mean"], color="black", ls="--", lw=0.9, label=f"pooled mean {agg['mean']:.3g}")
    ax.axhline(agg["rmse"], color="black", ls=":", lw=0.9, label=f"pooled rmse {agg['rmse']:.3g}")
    thr = report["settings"].get("threshold")
    if thr is not None:
        ax.axhline(thr, color="#d73027", lw=1.0, label=f"τ = {thr:g}")
    ax.set_xlabel("generated token" if report["mode"] == "generate" else "position")
    ax.set_ylabel("KL(A‖B) (nats)")
    top = max([max(r["kl"]) for r in report["prompts"] if r["kl"]] + [agg["rmse"], thr or 0.0, 1e-6])
    ax.set_ylim(0, top * 1.12)
    ax.set_title(title or "KL per position")
    ax.legend(fontsize=7, loc="upper left")
    save_figure(fig, path)
    plt.close(fig)


def spectrum_by_layer(report: dict, path: str | Path, title: str | None = None) -> None:
    """Hidden-state spectral metrics by layer (spectral entropy, dominant ratio, φ-proximity,
    effective rank / d), status as marker colour; with an adapter, σ_max of ΔW by layer below."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    layers = report["layers"]
    adapter = report.get("adapter")
    nrows = 2 if adapter and adapter["modules"] else 1
    fig, axes = plt.subplots(nrows, 1, figsize=(10, 4.2 * nrows), squeeze=False)
    ax = axes[0][0]
    xs = [row["layer"] for row in layers]
    for key, label, style in (
        ("spectral_entropy", "spectral entropy Hs", "-"),
        ("dominant_ratio", "dominant ratio λ1/Σλ", "--"),
        ("phi_proximity", "φ-proximity", ":"),
    ):
        ax.plot(xs, [row[key] for row in layers], style, lw=1.3, label=label)
    ax.plot(xs, [row["effective_rank"] / max(row["dim"], 1) for row in layers], "-.", lw=1.0, label="effective rank / d")
    ax.scatter(xs, [row["spectral_entropy"] for row in layers], c=[STATUS_COLORS[row["status"]] for row in layers], zorder=3, s=22)
    ax.set_ylim(0, 1.02)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer (block output)")
    ax.set_title(title or "hidden-state spectrum by layer (marker colour = status)")
    ax.legend(fontsize=8, loc="best")
    if nrows == 2:
        ax2 = axes[1][0]
        by_layer: dict[int, float] = {}
        for m in adapter["modules"]:
            if m["layer"] is not None:
                by_layer[m["layer"]] = max(by_layer.get(m["layer"], 0.0), m["sigma_max"])
        lx = sorted(by_layer)
        ax2.bar(lx, [by_layer[k] for k in lx], color="#4575b4")
        ax2.set_xlim(ax.get_xlim())
        ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax2.set_xlabel("layer")
        ax2.set_ylabel("max σ_max(ΔW) over modules")
        ax2.set_title("LoRA update ΔW = scale·B·A")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
