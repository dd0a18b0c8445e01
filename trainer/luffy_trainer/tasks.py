"""A generated reasoning task for the quickstart: multi-step addition with worked solutions as off-policy traces.

Operands are digits 1-9 and every sum stays at most 9, so each step is one of 36 single-token addition facts. Three
splits, all in the released LUFFY parquet schema:
- `base`: one-step sums "a + b", used to give the tiny model what a pretrained base model brings: the answer format
  and every addition fact the longer problems need.
- `train`: five operands. Each row carries its step-by-step trace ("1 + 2 = 3", "3 + 1 = 4", ...), the way DeepSeek-R1
  traces come with OpenR1-Math. Chaining four steps is what the base model almost never does by itself (about 1% of
  its samples are right), so on-policy exploration has little to start from, which is the regime LUFFY targets.
- `val`: held-out five-operand sums never seen in training (`unseen-5-terms`), and four-operand sums
  (`4-terms`), a kind never trained on at all, so the model has to run the procedure rather than recall answers.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

MAX_SUM = 9
TRAIN_OPERANDS = 5
OTHER_OPERANDS = 4


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


def arithmetic_rows(n_base: int, n_train: int, n_other: int, seed: int = 0) -> dict[str, list[dict]]:
    """Rows of the three splits. `val` holds a quarter of the five-operand problems (never in `train`) and `n_other`
    four-operand ones; `base` and `train` repeat their problems in random order."""
    rng = random.Random(seed)
    candidates = problems(TRAIN_OPERANDS)
    rng.shuffle(candidates)
    held_out = sorted(candidates[: len(candidates) // 4])
    seen = candidates[len(candidates) // 4 :]
    pairs = problems(2)
    base = [_row(rng.choice(pairs), i, "base", "base") for i in range(n_base)]
    train = [_row(rng.choice(seen), i, "train", "train") for i in range(n_train)]
    other = sorted(rng.sample(problems(OTHER_OPERANDS), n_other))
    val = [_row(p, i, "test", f"unseen-{TRAIN_OPERANDS}-terms") for i, p in enumerate(held_out)]
    val += [_row(p, len(val) + i, "test", f"{OTHER_OPERANDS}-terms") for i, p in enumerate(other)]
    return {"base": base, "train": train, "val": val}


def write_arithmetic_task(
    directory: str | Path, n_base: int = 20000, n_train: int = 4000, n_other: int = 40, seed: int = 0
) -> Path:
    """Write base.parquet, train.parquet and val.parquet; returns the directory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for split, rows in arithmetic_rows(n_base, n_train, n_other, seed).items():
        pq.write_table(pa.Table.from_pylist(rows), directory / f"{split}.parquet")
    return directory
