"""Conversations artifacts for the tests of the conversation stages: train.parquet / val.parquet with the
`messages` (JSON), `source`, `answer` columns of the mixture stage's contract."""
from __future__ import annotations

import json
import random
from pathlib import Path


def write_conversations(root: Path, train: list, val: list) -> Path:
    """`root` as a conversations artifact: each list holds conversations (lists of messages)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    for split, convs in (("train", train), ("val", val)):
        table = pa.table({
            "messages": pa.array([json.dumps(c) for c in convs], pa.string()),
            "source": pa.array(["test"] * len(convs), pa.string()),
            "answer": pa.array([None] * len(convs), pa.string()),
        })
        pq.write_table(table, root / f"{split}.parquet")
    return root


def arithmetic(n: int, seed: int = 0, turns: int = 1) -> list[list[dict]]:
    """`n` short question/answer conversations about sums (deterministic)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        conv = []
        for _ in range(turns):
            a, b = rng.randint(0, 50), rng.randint(0, 50)
            conv += [{"role": "user", "content": f"What is {a} + {b}?"},
                     {"role": "assistant", "content": f"{a} + {b} = {a + b}."}]
        out.append(conv)
    return out
