"""Rendering of the dashboard's frames (rich renderables), separate from the loops that feed them.

Every panel body is a ``Fit``: a function of the width and height rich gives it, so the same
frame works at 80×24 and grows with the terminal. Nothing here touches a model or a file.
"""

from __future__ import annotations

import math
import os
import time
import unicodedata
from typing import Callable

import numpy as np
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.layout import Layout
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from mlxgate.analysis.loops import classify_basin, detect_loop
from mlxgate.analysis.zones import zone_counts, zone_of

SPARK = "▁▂▃▄▅▆▇█"
ZONE_STYLE = {
    "HYPER-LASER": "bold red",
    "LASER": "red",
    "CAGE": "dark_orange",
    "TRANSITION": "yellow",
    "LANTERN": "green",
    "CHAOS": "magenta",
}
STATUS_STYLE = {"HEALTHY": "green", "DRIFTING": "yellow", "WARNING": "red"}
BASIN_STYLE = {"TOKEN_COLLAPSE": "bold red", "SEMANTIC_LOOP": "yellow", "CREATIVE": "green", "UNKNOWN": "cyan"}
SIDE_WIDTH = 38  # the right-hand column (entropy, loop/basin, history) at any terminal width
ROLLING = 16  # tokens in the rolling mean of H_t


# ----------------------------------------------------------------------------- small pieces


def sparkline(values, width: int, lo: float | None = None, hi: float | None = None) -> str:
    """The last ``width`` values as block characters ▁…█ scaled to [lo, hi] (default: their range).
    None/NaN values are blanks."""
    vals = [v for v in list(values)[-max(width, 0) :]] if width > 0 else []
    finite = [v for v in vals if v is not None and not math.isnan(v)]
    if not finite:
        return " " * len(vals)
    lo = min(finite) if lo is None else lo
    hi = max(finite) if hi is None else hi
    span = hi - lo
    out = []
    for v in vals:
        if v is None or math.isnan(v):
            out.append(" ")
            continue
        f = 0.5 if span <= 0 else (v - lo) / span
        out.append(SPARK[min(len(SPARK) - 1, max(0, int(round(f * (len(SPARK) - 1)))))])
    return "".join(out)


def bar(frac: float, width: int) -> str:
    """A horizontal bar of ``width`` cells filled to ``frac`` (clipped to [0, 1])."""
    width = max(width, 0)
    full = int(round(min(max(frac, 0.0), 1.0) * width))
    return "█" * full + "░" * (width - full)


def clean(s: str, newlines: bool = False) -> str:
    """Text safe to draw: control and format characters (a random model can emit ESC) become '·',
    tabs a space; newlines stay (shown as '↵' first with ``newlines``, so blank runs are visible)."""
    s = s.replace("\t", " ").replace("\r", "")
    if newlines:
        s = s.replace("\n", "↵\n")
    return "".join(ch if ch == "\n" or not unicodedata.category(ch).startswith("C") else "·" for ch in s)


def gib(n) -> str:
    return "?" if n is None else f"{n / 2**30:.2f}"


def size(n) -> str:
    """Bytes, compact: 513M below 1 GiB, else 1.25G (binary units)."""
    if n is None:
        return "?"
    return f"{n / 2**20:.0f}M" if n < 2**30 else f"{n / 2**30:.2f}G"


def header(left: Text) -> Table:
    """One line: ``left`` (cut with … when narrow) and the key hint, always visible, on the right."""
    grid = Table.grid(expand=True)
    grid.add_column(ratio=1, no_wrap=True, overflow="ellipsis")
    grid.add_column(justify="right", no_wrap=True)
    grid.add_row(left, Text(" q quits", style="dim"))
    return grid


def fmt_num(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.4g}"
    return clean(str(v))


class Fit:
    """A renderable made at render time from the space it gets: ``fn(width, height) -> renderable``."""

    def __init__(self, fn: Callable[[int, int | None], object]):
        self.fn = fn

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.fn(options.max_width, options.height)


class TailText:
    """The last lines of a Text that fit the region (newest text stays in view)."""

    def __init__(self, text: Text):
        self.text = text

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines = self.text.wrap(console, max(options.max_width, 1), overflow="fold")
        if options.height is not None:
            lines = lines[-options.height :] if options.height > 0 else []
        yield from lines


def memory_line(mem: dict) -> Text:
    used = None
    if mem.get("system_total_bytes") and mem.get("system_available_bytes") is not None:
        used = mem["system_total_bytes"] - mem["system_available_bytes"]
    t = Text()
    t.append("mem ", style="bold")
    t.append(f"MLX active {size(mem.get('mlx_active_bytes'))} · peak {size(mem.get('mlx_peak_bytes'))} · cache {size(mem.get('mlx_cache_bytes'))}")
    t.append(" │ ")
    if used is not None:
        pct = 100.0 * used / mem["system_total_bytes"]
        t.append(f"system {gib(used)}/{gib(mem['system_total_bytes'])} GiB ({pct:.0f}%)", style="red" if pct > 90 else "")
    else:
        t.append(f"system total {gib(mem.get('system_total_bytes'))} GiB")
    return t


# ----------------------------------------------------------------------------- generation view


def text_body(view) -> Fit:
    def make(width, height):
        if not view.pieces:
            return Text("(waiting for the first token)" if view.phase != "done" else "(no tokens)", style="dim")
        t = Text()
        for piece, h in view.pieces:
            t.append(clean(piece, newlines=True), style=ZONE_STYLE.get(zone_of(h, view.zones), ""))
        return TailText(t)

    return Fit(make)


def entropy_body(view) -> Fit:
    def make(width, height):
        hs = view.entropy
        if not hs:
            return Text("H_t: no tokens yet", style="dim")
        cur = hs[-1]
        roll = float(np.mean(hs[-ROLLING:]))
        arr = np.asarray(hs, dtype=np.float64)
        t = Text()
        t.append("H_t ", style="bold")
        t.append(f"{cur:6.3f} nats ", style="bold")
        z = zone_of(cur, view.zones)
        t.append(z, style=ZONE_STYLE.get(z, ""))
        t.append(f"\nmean{ROLLING} {roll:.3f}  all {arr.mean():.3f} ± {arr.std():.3f}\n")
        top = max(6.0, float(arr.max()))
        spark = Text(sparkline(hs, width, 0.0, top))
        # colour each cell by the zone of its value
        tail = hs[-width:]
        for i, v in enumerate(tail):
            spark.stylize(ZONE_STYLE.get(zone_of(v, view.zones), ""), i, i + 1)
        t.append_text(spark)
        counts = zone_counts(hs, view.zones)
        n = max(len(hs), 1)
        name_w = max(len(k) for k in counts) + 1
        bar_w = max(width - name_w - 5, 3)
        for name, c in counts.items():
            t.append("\n")
            t.append(f"{name:<{name_w}}", style=ZONE_STYLE.get(name, ""))
            t.append(bar(c / n, bar_w), style=ZONE_STYLE.get(name, ""))
            t.append(f"{100 * c / n:4.0f}%")
        return t

    return Fit(make)


def basin_body(view) -> Fit:
    def make(width, height):
        t = Text()
        if view.ids:
            text = "".join(p for p, _ in view.pieces)
            mean_h = float(np.mean(view.entropy)) if view.entropy else None
            b = classify_basin(view.ids, text, mean_h, view.tail_ppl())
            loop = detect_loop(view.ids)
            t.append("basin ", style="bold")
            t.append(b.basin, style=BASIN_STYLE.get(b.basin, ""))
            t.append(f"\n{clean(b.reason)}\n", style="dim")
            t.append("loop  ", style="bold")
            t.append(f"period {loop.period} ×{loop.repeats} from token {loop.start}" if loop else "none", style="yellow" if loop else "")
            tp = b.tail_ppl
            t.append(f"\nrep_frac {b.rep_frac:.3f}  tail ppl {'-' if tp is None else f'{tp:.1f}'}")
        else:
            t.append("basin: no tokens yet", style="dim")
        if view.finished:
            t.append(f"\ndone {len(view.finished)} · ", style="bold")
            tally: dict[str, int] = {}
            for f in view.finished:
                tally[f["basin"]] = tally.get(f["basin"], 0) + 1
            for k, v in tally.items():
                t.append(f"{k.split('_')[-1].lower()} {v} ", style=BASIN_STYLE.get(k, ""))
        return t

    return Fit(make)


def spectra_body(view) -> Fit:
    def make(width, height):
        sp = view.spectra
        if not sp:
            msg = "per-layer spectra: off (--spectrum-every 0)" if not view.spectrum_every else f"per-layer spectra: after {view.spectrum_every} tokens"
            return Text(msg, style="dim")
        n = len(sp)
        counts = {s: sum(m.status == s for m in sp) for s in STATUS_STYLE}
        lo = min(range(n), key=lambda i: sp[i].spectral_entropy)
        hi = max(range(n), key=lambda i: sp[i].dominant_ratio)
        foot = Text()
        for s, c in counts.items():
            foot.append(f"{s} {c}  ", style=STATUS_STYLE[s])
        foot.append(f"\nmin Hs {sp[lo].spectral_entropy:.3f} @L{lo}  max dom {sp[hi].dominant_ratio:.3f} @L{hi}")
        foot.append(f"\nat token {view.spectra_token} · {view.spectra_rows} rows × {sp[0].dim}", style="dim")
        if height is None or height >= n + 4:
            # one row per layer: Hs and dominant-ratio bars in the status colour
            t = Text()
            bw = max((width - 24) // 2, 3)
            if height is None or height >= n + 5:
                t.append(f"{'':4}{'Hs (spectral entropy)' if bw >= 16 else 'Hs':<{bw + 6}}{'dominant ratio' if bw >= 12 else 'dom':<{bw + 6}}\n", style="dim")
            for i, m in enumerate(sp):
                st = STATUS_STYLE[m.status]
                t.append(f"L{i:<3}", style="bold")
                t.append(bar(m.spectral_entropy, bw), style=st)
                t.append(f" {m.spectral_entropy:.2f} ")
                t.append(bar(m.dominant_ratio, bw), style=st)
                t.append(f" {m.dominant_ratio:.2f} {m.status[0]}\n", style=st)
            t.append_text(foot)
            return t
        # compact: one cell per layer, rows of Hs and dominant ratio, wrapped if needed
        label_w = 4
        per_row = max(width - label_w, 1)
        t = Text()
        for start in range(0, n, per_row):
            chunk = range(start, min(start + per_row, n))
            t.append(f"L{start:<{label_w - 1}}", style="dim")
            t.append("".join(str(i % 10) if i % 5 == 0 else "·" for i in chunk) + "\n", style="dim")
            t.append("Hs  ", style="bold")
            for i in chunk:
                t.append(SPARK[min(7, int(sp[i].spectral_entropy * 8))], style=STATUS_STYLE[sp[i].status])
            t.append("\ndom ", style="bold")
            for i in chunk:
                t.append(SPARK[min(7, int(sp[i].dominant_ratio * 8))], style=STATUS_STYLE[sp[i].status])
            t.append("\n")
        t.append_text(foot)
        return t

    return Fit(make)


def generation_frame(view, mem: dict) -> Layout:
    """The whole --model frame: header, text | entropy, spectra | loop/basin, memory."""
    head = Text(no_wrap=True, overflow="ellipsis")
    head.append("mlxgate", style="bold")
    head.append(f" · {os.path.basename(view.model.rstrip('/')) or view.model} · prompt {min(view.index + 1, len(view.prompts))}/{len(view.prompts)} · tok {len(view.ids)}")
    head.append(f" · {view.rate:.1f} tok/s" if view.rate else " · - tok/s")
    head.append(f" · {view.phase}", style="green" if view.phase == "done" else "yellow")
    prompt = view.prompts[view.index] if view.index < len(view.prompts) else ""
    root = Layout()
    root.split_column(
        Layout(header(head), size=1),
        Layout(name="top", ratio=1, minimum_size=8),
        Layout(name="mid", ratio=1, minimum_size=8),
        Layout(Text(no_wrap=True, overflow="ellipsis").append_text(memory_line(mem)), size=1),
    )
    root["top"].split_row(
        Layout(Panel(text_body(view), title=clean(f"text · {prompt}")[:60], title_align="left", border_style="blue")),
        Layout(Panel(entropy_body(view), title=f"entropy ({view.zones})", title_align="left"), size=SIDE_WIDTH),
    )
    root["mid"].split_row(
        Layout(Panel(spectra_body(view), title=f"hidden spectra · {view.n_layers} layers", title_align="left")),
        Layout(Panel(basin_body(view), title="loop / basin", title_align="left"), size=SIDE_WIDTH),
    )
    return root


# ----------------------------------------------------------------------------- run view

RUN_FIELDS = ("round", "stage", "step", "progress", "auth_nats", "coherence", "kl", "kept", "dropped", "lora_rank", "n_ranks", "adapter_spectra")


def _latest_items(latest: dict) -> list[tuple[str, str, str | None]]:
    """(key, value text, field) for the latest panel, known fields first."""
    items = []
    keys = [k for k in RUN_FIELDS if k in latest] + [k for k in latest if k not in RUN_FIELDS]
    for k in keys:
        v = latest[k]
        if k == "progress":
            continue  # drawn as a bar
        if k == "adapter_spectra" and isinstance(v, dict):
            if "sigma_max" in v:
                items.append(("σ_max", fmt_num(v["sigma_max"]), k))
            if "spectral_entropy" in v:
                items.append(("Hs(σ)", fmt_num(v["spectral_entropy"]), k))
        elif isinstance(v, dict):
            items.append((k, " ".join(f"{kk} {fmt_num(vv)}" for kk, vv in v.items()), k))
        elif isinstance(v, list):
            items.append((k, f"[{len(v)} items]", k))
        else:
            items.append((k, fmt_num(v), k))
    return items


def _latest_lines(state, width: int) -> Text:
    """Latest value of every field, flowed into lines of ``width``; fields the newest event did not
    carry are dim (they are older)."""
    latest = state.latest
    if not latest:
        return Text("no events yet" if state.exists else f"waiting for {state.path.name}", style="dim")
    newest = state.events[-1][1] if state.events else {}
    t = Text()
    progress = latest.get("progress")
    if isinstance(progress, (int, float)) and not isinstance(progress, bool):
        frac = progress / 100.0 if progress > 1.0 else float(progress)
        t.append("progress ", style="bold" if "progress" in newest else "dim")
        t.append(bar(frac, max(width - 16, 3)), style="green")
        t.append(f" {100 * frac:5.1f}%\n")
    line_len = 0
    for key, value, fld in _latest_items(latest):
        cell = f"{key} {value}"
        sep = 3 if line_len else 0
        if line_len and line_len + sep + len(cell) > width:
            t.append("\n")
            line_len, sep = 0, 0
        if sep:
            t.append(" · ", style="dim")
        stale = fld not in newest
        t.append(key + " ", style="dim" if stale else "bold")
        t.append(clean(value), style="dim" if stale else "")
        line_len += sep + len(cell)
    return t


def run_frame(state, mem: dict) -> Layout:
    """The whole --run frame: header, latest fields | history, recent events and warnings, memory."""
    head = Text(no_wrap=True, overflow="ellipsis")
    head.append("mlxgate", style="bold")
    head.append(f" · run {os.path.basename(state.label.rstrip('/')) or state.label} · {len(state.events)} events")
    n_ranks = state.latest.get("n_ranks")  # from the run's start/resume event (mlx.launch group size)
    if isinstance(n_ranks, int) and n_ranks > 0:
        head.append(f" · {n_ranks} rank{'s' if n_ranks > 1 else ''}")
    if state.last_time is not None:
        head.append(f" · last {time.time() - state.last_time:.0f}s ago")

    def history(width, height):
        t = Text()
        series = state.series()
        if not series:
            return Text("no numeric history yet", style="dim")
        name_w = max(len(k) for k in series) + 1
        for name, vals in series.items():
            last = next((v for v in reversed(vals) if v is not None), None)
            t.append(f"{name:<{name_w}}", style="bold")
            sw = max(width - name_w - 9, 3)
            t.append(sparkline(vals, sw).ljust(sw), style="cyan")
            t.append(f" {fmt_num(last):>7}\n")
        return t

    def recent(width, height):
        lines = []
        for w in state.warnings[-3:]:
            lines.append(Text(clean(w), style="yellow", no_wrap=True, overflow="ellipsis"))
        room = (height or 6) - len(lines)
        for no, ev in state.events[-max(room, 0) :] if room > 0 else []:
            parts = []
            for k, v in ev.items():
                if isinstance(v, dict):
                    parts += [f"{k}.{kk}={fmt_num(vv)}" for kk, vv in v.items()]
                else:
                    parts.append(f"{k}={fmt_num(v) if not isinstance(v, list) else f'[{len(v)}]'}")
            lines.append(Text(f"#{no} " + " ".join(parts), no_wrap=True, overflow="ellipsis"))
        return Group(*lines) if lines else Text("(none)", style="dim")

    root = Layout()
    root.split_column(
        Layout(header(head), size=1),
        Layout(name="top", ratio=2, minimum_size=10),
        Layout(Panel(Fit(recent), title="recent events", title_align="left"), ratio=1, minimum_size=5),
        Layout(Text(no_wrap=True, overflow="ellipsis").append_text(memory_line(mem)), size=1),
    )
    root["top"].split_row(
        Layout(Panel(Fit(lambda w, h: _latest_lines(state, w)), title="latest", title_align="left", border_style="blue"), ratio=3),
        Layout(Panel(Fit(history), title="history", title_align="left"), ratio=2),
    )
    return root
