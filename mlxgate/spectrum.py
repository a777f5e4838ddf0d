"""Per-layer hidden-state spectra and LoRA update spectra (SPEC §3.5): library for ``mlxgate spectrum``.

Hidden states: the output of every decoder block over a fixed probe set (``measure.PROBE_PROMPTS``,
chat-templated), each probe run alone (batch 1, so there is no padding to exclude); the
[tokens × d] rows of all probes are stacked per layer and handed to
``mlxgate.analysis.spectral.hidden_spectrum``.

Adapter: read directly from mlx-lm's format (``adapter_config.json`` + ``adapters.safetensors``
with ``<module>.lora_a`` [in, r] and ``<module>.lora_b`` [r, out]); for each module
ΔW = scale · (lora_a @ lora_b).T, its σ_max and spectral entropy
(``analysis.spectral.lora_delta_spectrum``).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from mlxgate import backend
from mlxgate.analysis.spectral import SpectralThresholds, hidden_spectrum, lora_delta_spectrum
from mlxgate.errors import UserError
from mlxgate.hooks import hidden_states
from mlxgate.prompts import prompt_ids

import mlx.core as mx  # noqa: E402

STATUSES = ("HEALTHY", "DRIFTING", "WARNING")
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def probe_hidden_rows(model, tokenizer, prompts: list[str], raw: bool = False, layer_ids: list[int] | None = None) -> dict[int, np.ndarray]:
    """{layer: [tokens, d] float32}: block outputs at every token of every probe, stacked.

    Each probe is one forward of batch 1 (no padding rows exist); tokens = Σ prompt lengths.
    """
    if not prompts:
        raise UserError("no probe prompts given")
    rows: dict[int, list[np.ndarray]] = {}
    for p in prompts:
        if not p.strip():
            raise UserError("empty probe prompt; every prompt needs some text")
        ids = mx.array(prompt_ids(tokenizer, p, raw=raw), dtype=mx.int32)[None]
        for layer, h in hidden_states(model, ids, layer_ids).items():
            rows.setdefault(layer, []).append(np.array(h[0].astype(mx.float32)))
    return {layer: np.concatenate(chunks, axis=0) for layer, chunks in sorted(rows.items())}


def layer_spectra(rows: dict[int, np.ndarray], thresholds: SpectralThresholds = SpectralThresholds()) -> list[dict]:
    """One dict per layer: ``layer`` plus the fields of ``SpectrumMetrics``."""
    return [{"layer": layer, **asdict(hidden_spectrum(h, thresholds))} for layer, h in sorted(rows.items())]


def read_adapter(adapter_dir: str | Path) -> dict:
    """Config and LoRA factors of an mlx-lm adapter directory.

    Returns dict(path, config, fine_tune_type, scale, rank, factors={module: (lora_a, lora_b)}) with
    the factors as float32 numpy. Any missing/unreadable file or malformed content is a UserError.
    """
    d = Path(adapter_dir)
    if not d.is_dir():
        raise UserError(f"adapter directory not found: {d}")
    cfg_path, w_path = d / "adapter_config.json", d / "adapters.safetensors"
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise UserError(f"{d} is not an mlx-lm adapter: {p.name} is missing")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {cfg_path}: {err}") from None
    if not isinstance(config, dict):
        raise UserError(f"{cfg_path}: expected a JSON object")
    fine_tune_type = config.get("fine_tune_type", "lora")
    params = config.get("lora_parameters") or {}
    if fine_tune_type != "full" and "scale" not in params:
        raise UserError(f"{cfg_path}: lora_parameters.scale is missing (mlx-lm's LoRA scale multiplies B·A)")
    try:
        weights = mx.load(str(w_path))
    except Exception as err:  # mlx raises RuntimeError/ValueError for a corrupt file
        raise UserError(f"cannot read {w_path}: {err}") from None
    factors: dict[str, list] = {}
    for name, w in weights.items():
        module, _, leaf = name.rpartition(".")
        if leaf in ("lora_a", "lora_b"):
            factors.setdefault(module, [None, None])[0 if leaf == "lora_a" else 1] = np.array(w.astype(mx.float32))
    for module, (a, b) in factors.items():
        if a is None or b is None:
            raise UserError(f"{w_path}: {module} has {'lora_a' if a is not None else 'lora_b'} but not its partner")
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise UserError(f"{w_path}: {module}: lora_a {a.shape} and lora_b {b.shape} are not [in, r] and [r, out]")
    if fine_tune_type != "full" and not factors:
        raise UserError(f"{w_path} holds no LoRA factors (no *.lora_a / *.lora_b tensors)")
    return {
        "path": str(d),
        "config": config,
        "fine_tune_type": fine_tune_type,
        "scale": float(params["scale"]) if "scale" in params else None,
        "rank": params.get("rank"),
        "factors": {m: (a, b) for m, (a, b) in sorted(factors.items(), key=lambda kv: _module_key(kv[0]))},
    }


def _module_layer(module: str) -> int | None:
    m = _LAYER_RE.search(module + ".")
    return int(m.group(1)) if m else None


def _module_key(module: str) -> tuple:
    layer = _module_layer(module)
    return (layer if layer is not None else -1, module)


def adapter_spectra(adapter: dict) -> dict:
    """σ_max, spectral entropy, effective rank and top singular values of every module's ΔW."""
    scale = adapter["scale"]
    modules = []
    for module, (a, b) in adapter["factors"].items():
        s = lora_delta_spectrum(a, b, scale)
        modules.append({"name": module, "layer": _module_layer(module), "in": int(a.shape[0]), "out": int(b.shape[1]), "lora_rank": int(a.shape[1]), **s})
    note = None
    if adapter["fine_tune_type"] == "dora":
        note = "DoRA: the magnitude vector m is not part of scale·B·A; spectra are of scale·B·A only"
    return {
        "path": adapter["path"],
        "fine_tune_type": adapter["fine_tune_type"],
        "scale": scale,
        "rank": adapter["rank"],
        "num_layers": adapter["config"].get("num_layers"),
        "note": note,
        "modules": modules,
    }


def summarize(layers: list[dict]) -> dict:
    """Status counts and the extreme layers (lowest spectral entropy, highest dominant ratio)."""
    if not layers:
        return {"status_counts": {s: 0 for s in STATUSES}}
    lo = min(layers, key=lambda r: r["spectral_entropy"])
    hi = max(layers, key=lambda r: r["dominant_ratio"])
    return {
        "status_counts": {s: sum(r["status"] == s for r in layers) for s in STATUSES},
        "min_entropy": {"layer": lo["layer"], "value": lo["spectral_entropy"]},
        "max_dominant_ratio": {"layer": hi["layer"], "value": hi["dominant_ratio"]},
    }


def spectrum_report(model, tokenizer, prompts: list[str], raw: bool = False, adapter_dir: str | None = None, thresholds: SpectralThresholds = SpectralThresholds()) -> dict:
    """Everything ``mlxgate spectrum`` reports (JSON-serialisable)."""
    rows = probe_hidden_rows(model, tokenizer, prompts, raw=raw)
    layers = layer_spectra(rows, thresholds)
    report = {
        "probes": {"n": len(prompts), "tokens": int(next(iter(rows.values())).shape[0]) if rows else 0, "raw": raw, "prompts": list(prompts)},
        "layers": layers,
        "summary": summarize(layers),
        "thresholds": asdict(thresholds),
        "adapter": None,
        "settings": {"backend": backend.backend_label(), "hidden": "block outputs (residual stream after each layer)"},
    }
    if adapter_dir:
        adapter = read_adapter(adapter_dir)
        report["adapter"] = adapter_spectra(adapter) if adapter["fine_tune_type"] != "full" else {
            "path": adapter["path"], "fine_tune_type": "full", "scale": None, "rank": None, "num_layers": None,
            "note": "full fine-tune: no LoRA factors", "modules": []}
    return report


_STATUS_STYLE = {"HEALTHY": "green", "DRIFTING": "yellow", "WARNING": "red"}


def format_table(report: dict, width: int = 120) -> str:
    from rich.console import Console
    from rich.table import Table

    console = Console(record=True, width=width, file=open("/dev/null", "w") if sys.platform != "win32" else None)
    name = report.get("model", {}).get("name", "?")
    p = report["probes"]
    table = Table(title=f"hidden-state spectrum by layer: {name} ({p['n']} probes, {p['tokens']} tokens)")
    for col in ("layer", "Hs", "eff. rank", "dominant", "φ-prox", "rank", "status"):
        table.add_column(col, justify="left" if col == "status" else "right")
    for r in report["layers"]:
        table.add_row(
            str(r["layer"]), f"{r['spectral_entropy']:.3f}", f"{r['effective_rank']:.2f}", f"{r['dominant_ratio']:.3f}",
            f"{r['phi_proximity']:.3f}", f"{r['rank']}/{r['dim']}", f"[{_STATUS_STYLE[r['status']]}]{r['status']}[/]",
        )
    console.print(table)
    s = report["summary"]
    if "min_entropy" in s:
        counts = ", ".join(f"{k} {v}" for k, v in s["status_counts"].items())
        console.print(
            f"{counts}; lowest Hs {s['min_entropy']['value']:.3f} at layer {s['min_entropy']['layer']}; "
            f"highest dominant ratio {s['max_dominant_ratio']['value']:.3f} at layer {s['max_dominant_ratio']['layer']}"
        )
    a = report.get("adapter")
    if a:
        if a["modules"]:
            t2 = Table(title=f"LoRA ΔW = scale·B·A per layer: {a['path']} (scale {a['scale']:g}, {len(a['modules'])} modules)")
            for col in ("layer", "modules", "max σ_max", "module with max σ", "mean Hs(σ)"):
                t2.add_column(col, justify="left" if col.startswith("module ") else "right")
            by_layer: dict = {}
            for m in a["modules"]:
                by_layer.setdefault(m["layer"], []).append(m)
            for layer, mods in by_layer.items():
                top = max(mods, key=lambda m: m["sigma_max"])
                short = top["name"].split(f"layers.{layer}.", 1)[-1] if layer is not None else top["name"]
                t2.add_row("-" if layer is None else str(layer), str(len(mods)), f"{top['sigma_max']:.4g}", short, f"{np.mean([m['spectral_entropy'] for m in mods]):.3f}")
            console.print(t2)
        if a.get("note"):
            console.print(f"note: {a['note']}")
    return console.export_text()


def load_adapted(name: str, adapter_dir: str, dtype: str | None = None):
    """``models.load(name, adapter_path=adapter_dir)`` with every adapter problem as a UserError.

    The directory is checked first (files present, readable, LoRA factors paired); then mlx-lm's
    loader checks every tensor against the model (names and shapes).
    """
    from mlxgate.models import load

    read_adapter(adapter_dir)
    try:
        return load(name, dtype=dtype, adapter_path=adapter_dir)
    except UserError:
        raise
    except (ValueError, KeyError, FileNotFoundError, OSError, TypeError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = "; ".join(lines[1:4]) if len(lines) > 1 else (lines[0] if lines else type(err).__name__)
        more = f" (+{len(lines) - 4} more)" if len(lines) > 4 else ""
        raise UserError(f"adapter {adapter_dir} does not match model {name}: {detail}{more}") from None
