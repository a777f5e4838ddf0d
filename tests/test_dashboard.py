"""dashboard: --once frames checked against independent computations, --run following an appended
events file, and the live UI driven in tmux as a person would (panels, changing numbers, q and
Ctrl-C leave cleanly with the terminal restored)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import mlx.core as mx
from mlxgate.analysis.loops import classify_basin
from mlxgate.analysis.spectral import hidden_spectrum
from mlxgate.cli import main
from mlxgate.generate import generate
from mlxgate.hooks import hidden_states
from mlxgate.io import append_jsonl
from mlxgate.measure import tail_perplexity
from mlxgate.prompts import prompt_ids

MLXGATE = str(Path(sys.executable).with_name("mlxgate"))
EVENTS = [
    {"round": 0, "stage": "eval", "auth_nats": -2.35, "coherence": 0.996},
    {"round": 1, "stage": "steer", "step": 0, "progress": 0.1, "kept": 40, "dropped": 8},
    {"round": 1, "stage": "heal", "step": 10, "progress": 0.4, "kl": {"mean": 0.31, "rmse": 0.52, "p95": 1.1, "max": 2.3}},
]


def once(args) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["dashboard", *args, "--once", "--width", "80", "--height", "24"])
    return result.exit_code, result.stdout, result.stderr


def test_once_frame_numbers_match_an_independent_run(tiny_dirs, tiny_models):
    model, tok, _ = tiny_models["mistral"]
    prompt, n_tok = "tell me something", 40
    code, out, err = once(["--model", tiny_dirs["mistral"], "-p", prompt, "--max-tokens", str(n_tok), "--spectrum-every", "8"])
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 24 and all(len(line) <= 80 for line in lines), out
    for panel in ("text · tell me something", "entropy (iris)", "hidden spectra · 4 layers", "loop / basin", "mem MLX active", "system"):
        assert panel in out, panel
    # the same greedy generation, done here with the library
    ids = prompt_ids(tok, prompt)
    comp = generate(model, [ids], n_tok, eos_ids=set(tok.eos_token_ids), with_logprobs=True)[0]
    h = np.array(comp.entropy)
    assert f"tok {len(comp.tokens)} " in lines[0] and "done" in lines[0]
    assert f"H_t {h[-1]:6.3f} nats" in out
    assert f"mean16 {h[-16:].mean():.3f}  all {h.mean():.3f} ± {h.std():.3f}" in out
    basin = classify_basin(comp.tokens, tok.decode(comp.tokens), float(h.mean()), tail_perplexity([-lp for lp in comp.logprobs]))
    assert f"basin {basin.basin}" in out
    # per-layer spectra of prompt + generation, from one teacher-forced forward (not the capture
    # during decoding the dashboard uses): the same numbers to the 2 printed decimals
    # (the last token of a completion cut by --max-tokens is never read, so it has no row)
    read = ids + comp.tokens[:-1] if comp.finish == "length" else ids + comp.tokens
    hs = hidden_states(model, mx.array([read]))
    spectra = [hidden_spectrum(np.array(hs[layer][0])) for layer in sorted(hs)]
    assert f"at token {len(comp.tokens)} · {len(read)} rows × 64" in out
    shown = re.findall(r"L(\d)\s+[█░]+ (\d\.\d\d) [█░]+ (\d\.\d\d) ([HDW])", out)
    assert [int(s[0]) for s in shown] == [0, 1, 2, 3], out
    for (_, hs_txt, dom_txt, status), sp in zip(shown, spectra):
        assert abs(float(hs_txt) - sp.spectral_entropy) <= 0.0051
        assert abs(float(dom_txt) - sp.dominant_ratio) <= 0.0051
        assert status == sp.status[0]


def test_piped_stdout_without_once_prints_one_frame(tiny_dirs, tmp_path):
    env = {**os.environ, "COLUMNS": "80", "LINES": "24"}
    proc = subprocess.run(
        [MLXGATE, "dashboard", "--model", tiny_dirs["llama"], "-p", "hi", "--max-tokens", "6"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 24 and "tok 6 " in lines[0] and "done" in lines[0]
    assert "\x1b[" not in proc.stdout  # no colour codes into a pipe


def test_text_helpers():
    from mlxgate.dashboard_views import clean, sparkline

    assert clean("a\x1b[2Jb\tc\nd") == "a·[2Jb c\nd"
    assert clean("x\ny", newlines=True) == "x↵\ny"
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7], 8, 0, 7) == "▁▂▃▄▅▆▇█"
    assert sparkline([1.0, math.nan, 3.0], 5) == "▁ █"


def _write_events(path: Path, events, bad_line_after: int | None = None) -> None:
    with open(path, "w") as fh:
        for i, ev in enumerate(events):
            fh.write(json.dumps(ev) + "\n")
            if bad_line_after is not None and i == bad_line_after:
                fh.write("{this is not json\n")


def test_run_once_follows_appends_and_skips_a_malformed_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    code, out, err = once(["--run", str(run)])
    assert code == 0 and "waiting for events.jsonl" in out and "0 events" in out
    _write_events(run / "events.jsonl", EVENTS, bad_line_after=1)  # the bad line is line 3
    code, out, err = once(["--run", str(run)])
    assert code == 0, err
    assert "events.jsonl:3: skipped malformed line" in err and "events.jsonl:3: skipped malformed line" in out
    assert "3 events" in out.splitlines()[0]
    assert "progress ████" in out and "40.0%" in out
    assert "kl mean 0.31 rmse 0.52 p95 1.1 max 2.3" in out
    assert "kept 40" in out and "coherence 0.996" in out
    assert "#4 round=1 stage=heal step=10 progress=0.4 kl.mean=0.31 kl.rmse=0.52" in out  # file line numbers kept
    # append (as the loop does) and look again
    append_jsonl(run / "events.jsonl", {"round": 1, "stage": "eval", "auth_nats": -2.1, "coherence": 0.99, "adapter_spectra": [{"sigma_max": 0.12, "spectral_entropy": 0.8}, {"sigma_max": 0.2, "spectral_entropy": 0.7}]})
    code, out, err = once(["--run", str(run)])
    assert code == 0 and "4 events" in out.splitlines()[0]
    assert "coherence 0.99 " in out or "coherence 0.99\n" in out or re.search(r"coherence 0\.99\b", out)
    assert "σ_max 0.2" in out and "Hs(σ) 0.75" in out
    assert re.search(r"auth_nats ▁█\s+-2\.1", out), out  # history: -2.35 then -2.1


def test_run_state_partial_line_and_truncation(tmp_path):
    from mlxgate.dashboard import RunState

    path = tmp_path / "events.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "coh')
    state = RunState(path)
    assert state.poll() == 1 and state.latest == {"step": 1}
    with open(path, "a") as fh:
        fh.write('erence": 0.5}\n')
    assert state.poll() == 1 and state.latest == {"step": 2, "coherence": 0.5} and not state.warnings
    path.write_text('{"step": 9}\n')  # a new, shorter file: start over
    assert state.poll() == 1 and state.latest == {"step": 9} and state.n_events == 1


@pytest.mark.parametrize("case, needle", [
    ("missing", "run directory not found"),
    ("unreadable", "permission denied"),
    ("events_is_dir", "cannot read"),
    ("both", "exactly one of --model M or --run DIR"),
    ("neither", "exactly one of --model M or --run DIR"),
])
def test_bad_input_exit_2(tmp_path, tiny_dirs, case, needle):
    run = tmp_path / "run"
    run.mkdir()
    args = ["--run", str(run)]
    if case == "missing":
        args = ["--run", str(tmp_path / "nowhere")]
    elif case == "unreadable":
        if os.geteuid() == 0:
            pytest.skip("root reads any directory: permissions cannot make it unreadable")
        run.chmod(0)
    elif case == "events_is_dir":
        (run / "events.jsonl").mkdir()
    elif case == "both":
        args = ["--run", str(run), "--model", tiny_dirs["llama"]]
    elif case == "neither":
        args = []
    try:
        code, out, err = once(args)
    finally:
        run.chmod(0o755)
    assert code == 2, out
    assert needle in err and "Traceback" not in err


# ----------------------------------------------------------------------------- live, in tmux

TMUX = shutil.which("tmux")
needs_tmux = pytest.mark.skipif(TMUX is None, reason="tmux is not installed: the live dashboard needs a terminal to drive")


class Pane:
    """A detached tmux session on a private server socket running one shell command at 80x24."""

    def __init__(self, tmp_path: Path, command: str):
        self.socket = f"mlxgate-test-{os.getpid()}-{tmp_path.name}"
        self.session = "dash"
        self.exit_file = tmp_path / "exit.txt"
        self.stty_file = tmp_path / "stty.txt"
        self.err_file = tmp_path / "stderr.txt"
        # After the dashboard: its exit code, then the terminal mode it left behind.
        shell = f"{command} 2>{self.err_file}; echo EXIT=$? > {self.exit_file}; stty -a > {self.stty_file}; sleep 60"
        self.tmux("new-session", "-d", "-s", self.session, "-x", "80", "-y", "24", shell)

    def tmux(self, *args) -> str:
        return subprocess.run([TMUX, "-L", self.socket, *args], check=True, capture_output=True, text=True).stdout

    def capture(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", self.session)

    def wait_for(self, pattern: str, timeout: float = 90.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.capture())
            if m:
                return m
            time.sleep(0.2)
        raise AssertionError(f"{pattern!r} never appeared; pane:\n{self.capture()}\nstderr: {self.err_file.read_text() if self.err_file.exists() else ''}")

    def keys(self, *keys) -> None:
        self.tmux("send-keys", "-t", self.session, *keys)

    def exit_code(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.exit_file.exists() and self.exit_file.read_text().strip() and self.stty_file.exists() and self.stty_file.stat().st_size:
                return int(self.exit_file.read_text().strip().split("=")[1])
            time.sleep(0.2)
        raise AssertionError(f"the dashboard did not exit; pane:\n{self.capture()}")

    def terminal_restored(self) -> bool:
        time.sleep(0.2)
        flags = self.stty_file.read_text().split()
        return "icanon" in flags and "echo" in flags  # cbreak mode turned both off

    def close(self) -> None:
        subprocess.run([TMUX, "-L", self.socket, "kill-server"], capture_output=True)


@needs_tmux
def test_live_model_dashboard_in_tmux_q_quits_mid_generation(tiny_dirs, tmp_path):
    pane = Pane(tmp_path, f"{MLXGATE} dashboard --model {tiny_dirs['llama']} -p 'count to a thousand' --max-tokens 3000 --spectrum-every 16 --fps 10")
    try:
        first = pane.wait_for(r"tok (\d+) .*generating")
        frame1 = pane.capture()
        for panel in ("text · count to a thousand", "entropy (iris)", "hidden spectra · 4 layers", "loop / basin", "mem MLX active", "H_t ", "tok/s"):
            assert panel in frame1, (panel, frame1)
        time.sleep(1.5)
        frame2 = pane.capture()
        tok1 = int(re.search(r"tok (\d+) ", frame1).group(1))
        tok2 = int(re.search(r"tok (\d+) ", frame2).group(1))
        assert tok2 > tok1 >= int(first.group(1)) and frame1 != frame2
        assert re.search(r"at token \d+ · \d+ rows × 64", frame2)  # spectra computed while decoding
        pane.keys("q")
        assert pane.exit_code() == 0
        assert pane.terminal_restored()
        assert "Traceback" not in pane.err_file.read_text()
    finally:
        pane.close()


@needs_tmux
def test_live_model_dashboard_holds_the_final_frame_until_q(tiny_dirs, tmp_path):
    pane = Pane(tmp_path, f"{MLXGATE} dashboard --model {tiny_dirs['gemma3_text']} -p one -p two --max-tokens 20")
    try:
        pane.wait_for(r"prompt 2/2 .*done")
        time.sleep(1.0)
        assert "done" in pane.capture() and not pane.exit_file.exists()  # still there: waits for q
        pane.keys("q")
        assert pane.exit_code() == 0 and pane.terminal_restored()
    finally:
        pane.close()


@needs_tmux
def test_live_run_dashboard_follows_appends_ctrl_c_quits(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    pane = Pane(tmp_path, f"{MLXGATE} dashboard --run {run} --interval 0.2")
    try:
        pane.wait_for(r"waiting for events\.jsonl")
        assert "0 events" in pane.capture()
        events = run / "events.jsonl"
        append_jsonl(events, EVENTS[0])
        with open(events, "a") as fh:
            fh.write("not json at all\n")
        append_jsonl(events, EVENTS[1])
        pane.wait_for(r"2 events")
        frame = pane.capture()
        assert "events.jsonl:2: skipped malformed line" in frame
        assert "kept 40" in frame and "dropped 8" in frame and "10.0%" in frame
        append_jsonl(events, EVENTS[2])
        pane.wait_for(r"3 events")
        frame = pane.capture()
        assert "40.0%" in frame and "kl mean 0.31 rmse 0.52" in frame
        pane.keys("C-c")
        assert pane.exit_code() == 0 and pane.terminal_restored()
        assert "events.jsonl:2: skipped malformed line" in pane.err_file.read_text()  # repeated after the screen is gone
    finally:
        pane.close()
