"""A generated reasoning task for the quickstart: multi-step addition with worked solutions as off-policy traces.

Operands are digits 1-9 and every sum stays at most 9, so each step is one of 36 single-token addition facts. Three
splits, all in the released LUFFY parquet schema:
- `base`: one-step sums "a + b", used to give the tiny model what a pretrained base model brings: the answer format
  and every addition fact the longer problems need.
- `train`: three operands. Each row carries its step-by-step trace ("3 + 2 = 5", "5 + 4 = 9"), the way DeepSeek-R1
  traces come with OpenR1-Math. Chaining two steps is what the base model cannot do yet.
- `val`: held-out three-operand sums never seen in training, and a harder kind with four operands, so the model has to
  run the procedure the traces teach rather than recall answers.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

MAX_SUM = 9
TRAIN_OPERANDS = 3
HARDER_OPERANDS = 4


def problems(n_operands: int) -> list[tuple[int, ...]]:
    """Every tuple of `n_operands` digits 1-9 whose sum is at most MAX_SUM."""
    return [p for p in itertools.product(range(1, MAX_SUM + 1), repeat=n_operands) if sum(p) <= MAX_SUM]


def solution_steps(operands: list[int]) -> str:
    """The worked solution: one running-sum line per addition, then the boxed answer after </think>."""
    lines, total = [], operands[0]
    for x in operands[1:]:
        lines.append(f"{total} + {x} = {total + x}")
        total += x
    return "<think>\n" + "\n".join(lines) + f"\n</think>\n\\boxed{{{total}}}"


def question(operands: list[int]) -> str:
    return " + ".join(map(str, operands)) + " = ?"


def _row(operands: tuple[int, ...], index: int, split: str, source: str) -> dict:
    ops = list(operands)
    return {
        "data_source": source,
        "prompt": [{"role": "user", "content": question(ops)}],
        "target": [{"role": "assistant", "content": solution_steps(ops)}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": str(sum(ops))},
        "extra_info": {"split": split, "index": index},
    }


def arithmetic_rows(n_base: int, n_train: int, n_val: int, seed: int = 0) -> dict[str, list[dict]]:
    """Rows of the three splits. `val` holds `n_val` problems: a quarter of the three-operand problems (never in
    `train`) and four-operand ones for the rest; `base` and `train` repeat their problems in random order."""
    rng = random.Random(seed)
    triples = problems(TRAIN_OPERANDS)
    rng.shuffle(triples)
    held_out = sorted(triples[: len(triples) // 4])
    seen = triples[len(triples) // 4 :]
    pairs = problems(2)
    base = [_row(rng.choice(pairs), i, "base", "base") for i in range(n_base)]
    train = [_row(rng.choice(seen), i, "train", "train") for i in range(n_train)]
    harder = sorted(rng.sample(problems(HARDER_OPERANDS), max(n_val - len(held_out), 0)))
    val = [_row(p, i, "test", "unseen-3-terms") for i, p in enumerate(held_out)]
    val += [_row(p, len(val) + i, "test", "harder-4-terms") for i, p in enumerate(harder)]
    return {"base": base, "train": train, "val": val}


def write_arithmetic_task(
    directory: str | Path, n_base: int = 20000, n_train: int = 4000, n_val: int = 100, seed: int = 0
) -> Path:
    """Write base.parquet, train.parquet and val.parquet; returns the directory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for split, rows in arithmetic_rows(n_base, n_train, n_val, seed).items():
        pq.write_table(pa.Table.from_pylist(rows), directory / f"{split}.parquet")
    return directory
