"""Helper for tests/test_distributed.py: ``measure_prompts`` on a tiny fixture (greedy), single
process or one rank of ``mlx.launch``. Usage: measure_dp.py FIXTURE_DIR OUT_JSON BATCH_SIZE.
Every rank writes OUT_JSON.rank{r} (all ranks get the gathered report)."""

import json
import sys

import mlxgate  # noqa: F401

from mlxgate import distributed as D  # noqa: E402
from mlxgate.measure import measure_prompts  # noqa: E402
from mlxgate.models import load  # noqa: E402

PROMPTS = ["one", "two words", "a third prompt here", "four", "the fifth and longest prompt of all", "six", "seven!"]


def main() -> None:
    model, tok, _ = load(sys.argv[1])
    report = measure_prompts(model, tok, PROMPTS, max_tokens=12, temp=0.0, batch_size=int(sys.argv[3]))
    with open(f"{sys.argv[2]}.rank{D.rank()}", "w") as fh:
        json.dump(report, fh)


if __name__ == "__main__":
    main()
