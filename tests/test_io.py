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


def test_read_jsonl_names_the_real_line(tmp_path):
    import pytest

    from mlxgate.errors import UserError

    p = tmp_path / "d.jsonl"
    p.write_text('{"a": 1}\n\n{"b": 2}\n')
    assert IO.read_jsonl(p) == [(1, {"a": 1}), (3, {"b": 2})]  # blank lines still count
    p.write_text('{"a": 1}\n\n[1, 2]\n')
    with pytest.raises(UserError, match=r"d.jsonl:3: each line must be a JSON object"):
        IO.read_jsonl(p)
    p.write_text('\n{"a": \n')
    with pytest.raises(UserError, match=r"d.jsonl:2: not valid JSON"):
        IO.read_jsonl(p)
    with pytest.raises(UserError, match="prompts file not found"):
        IO.read_jsonl(tmp_path / "missing.jsonl", "prompts file")
