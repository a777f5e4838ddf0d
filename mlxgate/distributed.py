"""Scale-out over ``mx.distributed``: one process per rank, started by ``mlx.launch``.

    mlx.launch -n 2 --backend ring -- mlxgate heal ...        # two ranks on this machine
    mlx.launch --hostfile hosts.json --backend ring -- ...    # several machines

Without a launcher the group has size 1 and every helper here is the identity (no collective is
issued), so a plain run behaves exactly as before.

- :func:`group`, :func:`rank`, :func:`size`, :func:`is_main`: the global group, initialised once.
- :func:`shard` / :func:`gather_ordered`: split a list of work items into contiguous per-rank
  blocks and put the per-item results back in input order (any picklable result).
- :func:`all_sum_tree`: sum a gradient tree over ranks with one flat collective.
- :func:`guard`: every collective runs inside it. A peer that dies closes its ring sockets and the
  collective raises; that error (and a watchdog timeout for a peer that hangs) becomes one clear
  line naming the rank that stopped answering.
- :func:`on_main`: rank 0 reads or checks (its run directory) and every rank gets the answer.
- :func:`main_only` / :func:`log`: only rank 0 writes files; the others log to their own stderr
  with ``[rank r/n]`` in front.
"""

from __future__ import annotations

import os
import pickle
import sys
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import mlxgate  # noqa: F401  (OpenBLAS before mlx.core)

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402

from mlxgate.errors import UserError  # noqa: E402

# Seconds a collective may block before the watchdog declares the peers lost. A peer that exits
# is noticed at once (its sockets close); this only catches a hung or unreachable peer, and must
# exceed the longest wait for a slower rank (a gather after uneven generation shards).
# MLXGATE_DIST_TIMEOUT overrides it.
DEFAULT_TIMEOUT_S = 1800.0
_GROUP = None


def group():
    """The global group (``mx.distributed.init()``, any backend: MPI where launched by mpirun, ring
    under ``mlx.launch --backend ring``); a singleton group when no launcher started us."""
    global _GROUP
    if _GROUP is None:
        _GROUP = mx.distributed.init()
        if _GROUP.size() > 1:
            _on_sigterm()
    return _GROUP


def _on_sigterm() -> None:
    """mlx.launch (and mpirun) SIGTERM the surviving ranks when one exits. Turn that into one line
    naming the peer and a Python exit, so pending atomic writes remove their temporaries instead
    of the process vanishing mid-write."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        print(str(_lost("the run", "the launcher sent SIGTERM after a peer exited")), file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def rank() -> int:
    return group().rank()


def size() -> int:
    return group().size()


def is_main() -> bool:
    """True on rank 0, the only rank that writes output files."""
    return rank() == 0


def timeout_s() -> float:
    try:
        return float(os.environ.get("MLXGATE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    except ValueError:
        return DEFAULT_TIMEOUT_S


def prefix() -> str:
    """``"[rank r/n] "`` in a group, ``""`` alone."""
    return f"[rank {rank()}/{size()}] " if size() > 1 else ""


def error_prefix() -> str:
    """:func:`prefix` for an error line, without joining the group: a command can fail before it
    ever did (bad flags), and under ``mlx.launch`` every rank prints that line."""
    if _GROUP is not None:
        return prefix()
    r = os.environ.get("MLX_RANK")  # set by mlx.launch for each rank
    return f"[rank {r}] " if r is not None else ""


def log(msg: str) -> None:
    """One line on this rank's stderr, prefixed with the rank in a group."""
    print(prefix() + msg, file=sys.stderr, flush=True)


def main_only(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` on rank 0 only (file writes); None elsewhere."""
    return fn(*args, **kwargs) if is_main() else None


def _peers_text() -> str:
    others = [r for r in range(size()) if r != rank()]
    if len(others) == 1:
        return f"rank {others[0]}"
    # The ring only sees its neighbours; which of them went away is not known here.
    return "one of ranks " + ", ".join(map(str, others))


def _lost(what: str, detail: str) -> UserError:
    return UserError(
        f"rank {rank()}: lost contact with {_peers_text()} during {what} ({detail}); stopping. "
        "Outputs written so far are complete; restart every rank to resume."
    )


@contextmanager
def guard(what: str = "a collective", timeout: float | None = None) -> Iterator[None]:
    """Run the collectives evaluated inside the block under a watchdog.

    A ring peer that exits closes its sockets, so the pending collective raises RuntimeError; that
    becomes a :class:`UserError` naming the peer. A peer that hangs instead would block forever:
    after ``timeout`` seconds (:data:`DEFAULT_TIMEOUT_S`, env MLXGATE_DIST_TIMEOUT) the watchdog
    prints the same message and ends this process with exit code 3 (the C++ call cannot be
    interrupted from Python). Size 1: no watchdog at all."""
    if size() == 1:
        yield
        return
    limit = timeout_s() if timeout is None else timeout
    done = threading.Event()

    def watch():
        if not done.wait(limit):
            print(str(_lost(what, f"no answer for {limit:.0f} s")), file=sys.stderr, flush=True)
            os._exit(3)

    threading.Thread(target=watch, daemon=True).start()
    try:
        yield
    except RuntimeError as err:
        text = str(err).lower()
        if any(tag in text for tag in ("[ring]", "[mpi]", "[nccl]", "nccl error", "peer")):
            raise _lost(what, str(err)) from None
        raise
    finally:
        done.set()


def barrier(what: str = "a barrier") -> None:
    """Wait until every rank gets here."""
    if size() > 1:
        with guard(what):
            mx.eval(mx.distributed.all_sum(mx.zeros(1), stream=mx.cpu))


def shard(items: Sequence, n: int | None = None, r: int | None = None) -> tuple[list[int], list]:
    """This rank's contiguous block of ``items``: (indices into ``items``, the items). Blocks
    differ in length by at most one; the first ``len % n`` ranks take the longer ones."""
    n = size() if n is None else n
    r = rank() if r is None else r
    q, extra = divmod(len(items), n)
    start = r * q + min(r, extra)
    stop = start + q + (1 if r < extra else 0)
    idx = list(range(start, stop))
    return idx, [items[i] for i in idx]


def all_gather_bytes(blob: bytes, what: str = "a gather") -> list[bytes]:
    """Every rank's ``blob``, in rank order, on every rank (lengths may differ)."""
    if size() == 1:
        return [blob]
    with guard(what):
        lengths = mx.distributed.all_gather(mx.array([len(blob)], dtype=mx.int32), stream=mx.cpu)
        lengths = [int(x) for x in lengths.tolist()]
        buf = bytearray(max(lengths))
        buf[: len(blob)] = blob
        # np.frombuffer, not list(buf): one Python int per byte cost ~1.3 s per 20 MB (adapters).
        data = mx.distributed.all_gather(mx.array(np.frombuffer(bytes(buf) or b"\0", dtype=np.uint8))[None], stream=mx.cpu)
        mx.eval(data)
    rows = bytes(memoryview(data.reshape(-1)))  # uint8 -> bytes
    width = max(max(lengths), 1)
    return [rows[i * width : i * width + lengths[i]] for i in range(size())]


def gather_ordered(local: Sequence, indices: Sequence[int], all_ranks: bool = False, what: str = "gathering results") -> list | None:
    """Put per-item results back in input order: ``local[j]`` is the result for input
    ``indices[j]`` (as given by :func:`shard`). Returns the full list on rank 0 (and on every rank
    if ``all_ranks``), None on the others. Results travel pickled."""
    if size() == 1:
        return list(local)
    if len(local) != len(indices):
        raise ValueError("gather_ordered: one result per index")
    parts = all_gather_bytes(pickle.dumps((list(indices), list(local))), what)
    if not (all_ranks or is_main()):
        return None
    pairs = {}
    for blob in parts:
        idx, res = pickle.loads(blob)
        pairs.update(zip(idx, res))
    if sorted(pairs) != list(range(len(pairs))):
        raise RuntimeError("gather_ordered: the ranks' indices do not cover 0..n-1 exactly once")
    return [pairs[i] for i in range(len(pairs))]


def broadcast(obj: Any, what: str = "a broadcast") -> Any:
    """Rank 0's ``obj`` (picklable) on every rank: e.g. the resume point a loop read from its run
    directory, which only rank 0's disk is guaranteed to hold."""
    if size() == 1:
        return obj
    return pickle.loads(all_gather_bytes(pickle.dumps(obj), what)[0])


def on_main(fn: Callable, *args, what: str = "a decision on rank 0", **kwargs) -> Any:
    """``fn(*args, **kwargs)`` run on rank 0 only, its result (or the UserError it raised) given to
    every rank: checks and reads of the run directory, which only rank 0's disk is sure to hold,
    so that a bad input stops every rank with the same one line instead of leaving peers waiting."""
    if size() == 1:
        return fn(*args, **kwargs)
    result, message = None, None
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except UserError as err:
            message = str(err)
    result, message = broadcast((result, message), what)
    if message is not None:
        raise UserError(message)
    return result


def all_sum_tree(tree, stream=mx.cpu):
    """Elementwise sum of an array tree (gradients) over ranks: one flat all_sum of every leaf
    concatenated (float32), split back into the tree's shapes and dtypes. Lazy: evaluate it inside
    :func:`guard`. Size 1: ``tree`` itself."""
    if size() == 1:
        return tree
    flat = tree_flatten(tree)
    vec = mx.concatenate([v.astype(mx.float32).reshape(-1) for _, v in flat])
    vec = mx.distributed.all_sum(vec, stream=stream)
    out, at = [], 0
    for key, v in flat:
        out.append((key, vec[at : at + v.size].reshape(v.shape).astype(v.dtype)))
        at += v.size
    return tree_unflatten(out)


def all_sum_scalars(values: Sequence[float], what: str = "a reduction") -> list[float]:
    """Sum Python floats over ranks (float64 on the host, sent as float32 pairs hi+lo so counts
    up to 2^48 and sums stay exact enough for reporting)."""
    if size() == 1:
        return [float(v) for v in values]
    hi = [float(mx.array(v, dtype=mx.float32).item()) for v in values]
    lo = [float(v) - h for v, h in zip(values, hi)]
    with guard(what):
        s = mx.distributed.all_sum(mx.array(hi + lo, dtype=mx.float32), stream=mx.cpu).tolist()
    k = len(values)
    return [s[i] + s[k + i] for i in range(k)]


def describe() -> dict:
    """{"n_ranks", "rank"} for configs and events (the dashboard reads n_ranks)."""
    return {"n_ranks": size(), "rank": rank()}

