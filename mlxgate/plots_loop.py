"""PNG plots of a loop run, by round (round 0 = the base model), from the committed round records
(rounds/r<N>/done.json). Written atomically with :func:`mlxgate.io.save_figure`."""

from __future__ import annotations

import math
from pathlib import Path

from mlxgate.io import save_figure

PLOTS = ("trait_coherence.png", "kl.png", "kept_kappa.png", "entropy.png")


def _series(records: list[dict], get) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for rec in records:
        try:
            v = get(rec)
        except (KeyError, TypeError):
            v = None
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(rec["round"])
            ys.append(float(v))
    return xs, ys


def _figure(n_axes: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n_axes, figsize=(5.2 * n_axes, 3.6), squeeze=False)
    return plt, fig, list(axes[0])


def _finish(plt, fig, axes, path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.set_xlabel("round (0 = base)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_all(records: list[dict], out_dir: str | Path) -> list[str]:
    """Write the four plots into ``out_dir``; returns their file names."""
    out_dir = Path(out_dir)

    plt, fig, (a1, a2) = _figure(2)
    a1.plot(*_series(records, lambda r: r["eval"]["auth_nats"]), "o-", label="auth_nats (healed)")
    a1.plot(*_series(records, lambda r: r["eval_steered"]["auth_nats"]), "s--", color="tab:red", label="auth_nats (steered)")
    a1.plot(*_series(records, lambda r: r["eval"]["care_nats"]), "^:", color="tab:green", label="care_nats (healed)")
    a1.set_ylabel("ln mean p (nats)")
    a1.set_title("trait (tinymfv)")
    a2.plot(*_series(records, lambda r: r["eval"]["coherence"]), "o-", label="healed")
    a2.plot(*_series(records, lambda r: r["eval_steered"]["coherence"]), "s--", color="tab:red", label="steered")
    a2.set_ylabel("coherence (mean option mass)")
    a2.set_title("coherence (tinymfv)")
    _finish(plt, fig, [a1, a2], out_dir / PLOTS[0])

    plt, fig, (ax,) = _figure(1)
    for key, style in (("mean", "o-"), ("rmse", "s-"), ("p95", "^-"), ("max", "v-")):
        ax.plot(*_series(records, lambda r, k=key: r["kl"][k]), style, label=f"KL {key} vs ref")
        ax.plot(*_series(records, lambda r, k=key: r["kl_base"][k]), style.replace("-", ":"), alpha=0.6, label=f"KL {key} vs base")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_ylabel("nats per token")
    ax.set_title("KL of the healed model on its kept completions")
    _finish(plt, fig, [ax], out_dir / PLOTS[1])

    plt, fig, (a1, a2) = _figure(2)
    a1.plot(*_series(records, lambda r: r["kept_frac"]), "o-")
    a1.set_ylim(0, 1.05)
    a1.set_ylabel("kept / generated")
    a1.set_title("filter yield at the settled dose")
    a2.plot(*_series(records, lambda r: r["kappa"]), "o-", color="tab:purple")
    a2.set_ylabel("settled κ")
    a2.set_title("walk-C dose")
    _finish(plt, fig, [a1, a2], out_dir / PLOTS[2])

    plt, fig, (ax,) = _figure(1)
    ax.plot(*_series(records, lambda r: r["entropy_kept"]), "o-", label="steered, kept")
    ax.plot(*_series(records, lambda r: r["entropy_dropped"]), "x--", label="steered, dropped")
    ax.plot(*_series(records, lambda r: r["entropy_samples"]), "s-", label="greedy sample (unsteered)")
    ax.set_ylabel("mean H_t (nats)")
    ax.set_title("entropy of generations")
    _finish(plt, fig, [ax], out_dir / PLOTS[3])
    return list(PLOTS)
