"""``mlxgate dashboard``: a live terminal view (rich ``Live``) of a generation or of a loop run.

- ``--model M``: generates greedily on the probe prompts (or ``--prompt``), one prompt at a time
  through ``generate.decode_steps``, and after every token updates: the text coloured by the zone
  of each token's H_t (nats), current and rolling H_t with a sparkline, the zone histogram, the
  token loop and basin, tokens/s and memory. Block outputs are captured during decoding
  (``hooks.capture``, no extra forward); every ``spectrum_every`` tokens the per-layer spectra of
  the text so far (prompt + generation) are computed in a worker thread.
- ``--run DIR``: follows ``DIR/events.jsonl`` as it is appended and shows the latest value of
  each field and a small history. A malformed line is skipped with a warning.

``q`` or Ctrl-C quits and restores the terminal (stdin in cbreak mode while it runs);
``--once`` prints one frame to stdout and exits.
"""

from __future__ import annotations

import json
import os
import select
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlxgate import backend, ops
from mlxgate.analysis.spectral import SpectrumMetrics, hidden_spectrum
from mlxgate.errors import UserError
from mlxgate.measure import tail_perplexity

EVENTS_FILE = "events.jsonl"
MAX_EVENTS = 2000  # kept in memory for the history; older ones only count


# ----------------------------------------------------------------------------- keys


class KeyReader:
    """Non-blocking key presses from stdin. On a TTY it switches to cbreak mode (keys arrive
    without Enter, Ctrl-C still interrupts) and restores the saved mode on exit, whatever happens."""

    def __init__(self, stream=None):
        self.stream = stream if stream is not None else sys.stdin
        self.fd = None
        self.saved = None
        self.eof = False

    @property
    def is_tty(self) -> bool:
        return self.fd is not None and self.saved is not None

    def __enter__(self) -> "KeyReader":
        try:
            self.fd = self.stream.fileno()
        except (AttributeError, OSError, ValueError):
            self.fd, self.eof = None, True
            return self
        if os.isatty(self.fd):
            import termios
            import tty

            self.saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)
        return self

    def __exit__(self, *exc) -> None:
        if self.saved is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
            self.saved = None

    def read(self, timeout: float = 0.0) -> str:
        """Characters typed since the last call (waits up to ``timeout`` s for the first)."""
        if self.fd is None or self.eof:
            if timeout > 0:
                time.sleep(timeout)
            return ""
        try:
            ready, _, _ = select.select([self.fd], [], [], timeout)
        except (OSError, ValueError):
            self.eof = True
            return ""
        if not ready:
            return ""
        data = os.read(self.fd, 64)
        if not data:
            self.eof = True  # a closed pipe: keep running, stop polling it
            return ""
        return data.decode("utf-8", errors="replace")

    def quit_pressed(self, timeout: float = 0.0) -> bool:
        return any(c in "qQ" for c in self.read(timeout))


# ----------------------------------------------------------------------------- generation


@dataclass
class GenView:
    """What the --model frame shows; updated token by token."""

    model: str
    n_layers: int
    prompts: list[str]
    zones: str = "iris"
    spectrum_every: int = 16
    index: int = 0
    phase: str = "prefill"
    ids: list[int] = field(default_factory=list)
    pieces: list[tuple[str, float]] = field(default_factory=list)  # (text segment, H_t of its token)
    entropy: list[float] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)
    rate: float | None = None  # tokens/s of the current prompt's decoding
    spectra: list[SpectrumMetrics] | None = None
    spectra_token: int = 0
    spectra_rows: int = 0
    finished: list[dict] = field(default_factory=list)

    def start(self, index: int) -> None:
        self.index, self.phase = index, "prefill"
        self.ids, self.pieces, self.entropy, self.nll, self.rate = [], [], [], [], None

    def tail_ppl(self) -> float | None:
        return tail_perplexity(self.nll)

    def summary(self) -> dict:
        from mlxgate.analysis.loops import classify_basin

        text = "".join(p for p, _ in self.pieces)
        mean_h = float(np.mean(self.entropy)) if self.entropy else None
        b = classify_basin(self.ids, text, mean_h, self.tail_ppl())
        return {"prompt": self.prompts[self.index], "n": len(self.ids), "mean_entropy": mean_h, "basin": b.basin}


def _layer_rows(captured: dict[int, list], limit: int) -> list[np.ndarray]:
    """[tokens, d] float32 per layer from the block outputs captured so far, at most ``limit``
    rows (prompt + generated tokens: decoding reads one token ahead, and an EOS is not text).
    Compacts each list to one array, so the next call concatenates only what came after.

    The last token of a completion cut by --max-tokens is never read by the model, so it has no
    hidden state: the final spectra cover prompt + all but that token."""
    import mlx.core as mx

    rows = []
    for layer in sorted(captured):
        chunks = captured[layer]
        whole = mx.concatenate(chunks, axis=1) if len(chunks) > 1 else chunks[0]
        chunks[:] = [whole]  # in place: the hook keeps appending to this same list
        rows.append(np.array(whole[0, :limit].astype(mx.float32)))
    return rows


def _spectra(rows: list[np.ndarray]) -> list[SpectrumMetrics]:
    return [hidden_spectrum(r) for r in rows]


class Refresher:
    """Calls ``draw()`` at most ``fps`` times a second (or when forced)."""

    def __init__(self, draw, fps: float):
        self.draw, self.period, self.last = draw, 1.0 / max(fps, 0.1), 0.0

    def __call__(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last >= self.period:
            self.last = now
            self.draw()


def run_generation(model, tokenizer, view: GenView, max_tokens: int, raw: bool, refresh, keys: KeyReader | None) -> bool:
    """Decode each prompt of ``view`` and keep ``view`` current; ``refresh(force)`` redraws.
    Returns False if the user quit, True when every prompt is done."""
    from mlxgate.generate import decode_steps
    from mlxgate.hooks import capture
    from mlxgate.prompts import prompt_ids

    eos = set(tokenizer.eos_token_ids)
    pool = ThreadPoolExecutor(max_workers=1) if view.spectrum_every > 0 else None
    job: tuple[Future, int, int] | None = None

    def collect(block: bool) -> None:
        nonlocal job
        if job is not None and (block or job[0].done()):
            fut, at, n_rows = job
            job = None
            view.spectra, view.spectra_token, view.spectra_rows = fut.result(), at, n_rows

    try:
        for index, prompt in enumerate(view.prompts):
            view.start(index)
            ids = prompt_ids(tokenizer, prompt, raw=raw)
            detok = tokenizer.detokenizer
            refresh(True)
            t_first = None
            with capture(model) as captured:
                for step in decode_steps(model, [ids], max_tokens):
                    stats = ops.entropy_stats(step.logits, step.tokens)
                    token = int(step.tokens[0].item())
                    if token in eos:
                        break
                    h = float(stats["entropy"][0].item())
                    nll = -float(stats["target_logprob"][0].item())
                    detok.add_token(token)
                    view.phase = "generating"
                    view.ids.append(token)
                    view.entropy.append(h)
                    view.nll.append(nll)
                    view.pieces.append((detok.last_segment, h))
                    now = time.monotonic()
                    if t_first is None:
                        t_first = now
                    elif len(view.ids) > 1:
                        view.rate = (len(view.ids) - 1) / max(now - t_first, 1e-9)
                    if pool is not None:
                        collect(block=False)
                        if job is None and len(view.ids) % view.spectrum_every == 0:
                            rows = _layer_rows(captured, len(ids) + len(view.ids))
                            job = (pool.submit(_spectra, rows), len(view.ids), rows[0].shape[0])
                    refresh(False)
                    if keys is not None and keys.quit_pressed():
                        return False
                detok.finalize()
                tail = detok.last_segment
                if tail and view.pieces:
                    piece, h = view.pieces[-1]
                    view.pieces[-1] = (piece + tail, h)
                if pool is not None:
                    collect(block=True)
                    if view.ids and view.spectra_token != len(view.ids):
                        rows = _layer_rows(captured, len(ids) + len(view.ids))
                        job = (pool.submit(_spectra, rows), len(view.ids), rows[0].shape[0])
                        collect(block=True)
            view.finished.append(view.summary())
            refresh(True)
        view.phase = "done"
        refresh(True)
        return True
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def model_dashboard(model_name: str, prompts: list[str], max_tokens: int, raw: bool, zones: str, spectrum_every: int, fps: float, once: bool, width: int | None, height: int | None, dtype: str | None) -> None:
    from rich.console import Console
    from rich.live import Live

    from mlxgate.dashboard_views import generation_frame
    from mlxgate.models import load

    model, tokenizer, info = load(model_name, dtype=dtype)
    view = GenView(model=info.name, n_layers=info.n_layers, prompts=prompts, zones=zones, spectrum_every=spectrum_every)
    if once or not Console().is_terminal:  # a live screen into a pipe shows nothing: one frame
        console = _once_console(width, height)
        run_generation(model, tokenizer, view, max_tokens, raw, lambda force=False: None, None)
        console.print(generation_frame(view, backend.memory()))
        return
    console = Console()
    with KeyReader() as keys, Live(console=console, screen=True, auto_refresh=False, redirect_stdout=False, redirect_stderr=False) as live:
        refresh = Refresher(lambda: live.update(generation_frame(view, backend.memory()), refresh=True), fps)
        if not run_generation(model, tokenizer, view, max_tokens, raw, refresh, keys):
            return
        if not keys.is_tty:
            return  # nobody can press q: leave when the work is done
        while not keys.quit_pressed(timeout=0.25):
            refresh(False)  # memory keeps moving


def _once_console(width: int | None, height: int | None):
    from rich.console import Console

    probe = Console()
    w = width or (probe.width if probe.is_terminal else 80)
    h = height or (probe.height if probe.is_terminal else 24)
    return Console(width=w, height=h)


# ----------------------------------------------------------------------------- run events


def _flatten_spectra(value) -> dict[str, float]:
    """sigma_max (largest) and spectral entropy (mean) from an adapter-spectra field in any of the
    shapes a run may write: one dict, a list of dicts, or {module: dict}."""
    if isinstance(value, dict) and "sigma_max" not in value:
        items = [v for v in value.values() if isinstance(v, dict)]
    elif isinstance(value, dict):
        items = [value]
    elif isinstance(value, list):
        items = [v for v in value if isinstance(v, dict)]
    else:
        return {}
    sig = [float(v["sigma_max"]) for v in items if isinstance(v.get("sigma_max"), (int, float))]
    ent = [float(v["spectral_entropy"]) for v in items if isinstance(v.get("spectral_entropy"), (int, float))]
    out = {}
    if sig:
        out["sigma_max"] = max(sig)
    if ent:
        out["spectral_entropy"] = float(np.mean(ent))
    return out


SPECTRA_KEYS = ("adapter_spectra", "spectra", "adapter_spectrum")


class RunState:
    """Follows an events.jsonl file: reads only what was appended since the last poll, keeps a
    partial last line for the next poll, starts over if the file shrinks (a new run)."""

    def __init__(self, run: str | Path):
        p = Path(run)
        if not p.exists():
            raise UserError(f"run directory not found: {p}")
        if p.is_dir():
            if not os.access(p, os.R_OK | os.X_OK):
                raise UserError(f"cannot read run directory {p}: permission denied")
            self.path = p / EVENTS_FILE
        elif p.is_file():
            self.path = p  # the events file itself
        else:
            raise UserError(f"{p} is neither a run directory nor an events file")
        if self.path.exists() and (self.path.is_dir() or not os.access(self.path, os.R_OK)):
            raise UserError(f"cannot read {self.path}: {'a directory' if self.path.is_dir() else 'permission denied'}")
        self.label = str(p)
        self.offset = 0
        self.partial = b""
        self.line_no = 0
        self.events: list[tuple[int, dict]] = []
        self.n_events = 0
        self.latest: dict = {}
        self.warnings: list[str] = []
        self.new_warnings: list[str] = []
        self.last_time: float | None = None

    @property
    def exists(self) -> bool:
        return self.path.exists()

    def poll(self) -> int:
        """Read appended lines; returns how many events were added."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return 0
        except OSError as err:
            raise UserError(f"cannot read {self.path}: {err.strerror or err}") from None
        if size < self.offset:  # truncated or replaced: start over
            self.__init__(self.label)
        if size == self.offset:
            return 0
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read(size - self.offset)
        except OSError as err:
            raise UserError(f"cannot read {self.path}: {err.strerror or err}") from None
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()  # no newline yet: may still be being written
        added = 0
        for raw in lines:
            self.line_no += 1
            if not raw.strip():
                continue
            try:
                ev = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                self._warn(f"{self.path.name}:{self.line_no}: skipped malformed line ({getattr(err, 'msg', err)})")
                continue
            if not isinstance(ev, dict):
                self._warn(f"{self.path.name}:{self.line_no}: skipped line (not a JSON object)")
                continue
            self._add(ev)
            added += 1
        if added:
            self.last_time = time.time()
        return added

    def _warn(self, msg: str) -> None:
        self.warnings.append(msg)
        self.new_warnings.append(msg)

    def _add(self, ev: dict) -> None:
        for key in SPECTRA_KEYS:
            if key in ev:
                flat = _flatten_spectra(ev[key])
                ev = {k: v for k, v in ev.items() if k != key}
                ev["adapter_spectra"] = flat or "?"
                break
        self.n_events += 1
        self.events.append((self.line_no, ev))
        del self.events[:-MAX_EVENTS]
        self.latest.update(ev)

    def series(self) -> dict[str, list]:
        """Numeric history of the fields worth a sparkline (only those that appear)."""
        out: dict[str, list] = {}
        for name in ("auth_nats", "coherence", "kl.rmse", "kl.mean", "kept", "dropped", "sigma_max", "lora_rank"):
            vals = [_lookup(ev, name) for _, ev in self.events]
            if any(v is not None for v in vals):
                out[name] = [v for v in vals if v is not None]
        return out


def _lookup(ev: dict, name: str):
    if name == "sigma_max":
        v = ev.get("adapter_spectra")
        v = v.get("sigma_max") if isinstance(v, dict) else None
    elif "." in name:
        outer, inner = name.split(".", 1)
        v = ev.get(outer)
        v = v.get(inner) if isinstance(v, dict) else None
    else:
        v = ev.get(name)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def run_dashboard(run: str, interval: float, fps: float, once: bool, width: int | None, height: int | None) -> None:
    from rich.console import Console
    from rich.live import Live

    from mlxgate.dashboard_views import run_frame

    state = RunState(run)
    state.poll()
    if once or not Console().is_terminal:  # a live screen into a pipe shows nothing: one frame
        for w in state.new_warnings:
            print(f"mlxgate: warning: {w}", file=sys.stderr)
        state.new_warnings.clear()
        _once_console(width, height).print(run_frame(state, backend.memory()))
        return
    console = Console()
    try:
        with KeyReader() as keys, Live(console=console, screen=True, auto_refresh=False, redirect_stdout=False, redirect_stderr=False) as live:
            refresh = Refresher(lambda: live.update(run_frame(state, backend.memory()), refresh=True), fps)
            refresh(True)
            while not keys.quit_pressed(timeout=interval):
                changed = state.poll()
                refresh(bool(changed))
    except KeyboardInterrupt:
        pass  # Ctrl-C: as q (the screen and terminal mode are restored on the way out)
    for w in state.new_warnings:  # shown in the frame while live; repeated where they last
        print(f"mlxgate: warning: {w}", file=sys.stderr)
