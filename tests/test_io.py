"""mlxgate.io's strict JSON: what a reader without NaN/Infinity extensions can parse."""

from __future__ import annotations

import json
import math

import numpy as np

from mlxgate import io as IO


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_and_numpy_values_become_strict_json(tmp_path):
    obj = {"auth_nats": -math.inf, "h": float("nan"), "n": np.int64(3), "p": np.float32(0.5), "xs": (1.0, np.inf), 2: "k"}
    want = {"auth_nats": None, "h": None, "n": 3, "p": 0.5, "xs": [1.0, None], "2": "k"}
    assert _strict(IO.dumps(obj)) == want
    IO.write_json(tmp_path / "a.json", obj)
    assert _strict((tmp_path / "a.json").read_text()) == want
    IO.append_jsonl(tmp_path / "e.jsonl", obj)
    IO.append_jsonl(tmp_path / "e.jsonl", {"x": -np.inf})
    assert [_strict(x) for x in (tmp_path / "e.jsonl").read_text().splitlines()] == [want, {"x": None}]
