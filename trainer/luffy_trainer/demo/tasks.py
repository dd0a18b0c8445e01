"""A generated reasoning task for the quickstart: five-term sums, with worked solutions as off-policy traces.

Operands are digits 0-9 and every sum stays at most 9, and a worked solution adds only the nonzero ones, so each
step is one of 36 addition facts of digits 1-9, each one token. Three splits, in the released LUFFY parquet schema:
- `base`: problems of two to five operands with exactly two nonzero, solved with one addition. A supervised warm-up
  on them (long enough that the model answers every one the same way) gives the tiny model what a pretrained base
  model brings: the answer format, every addition fact, and the habit of adding two numbers.
- `train`: five operands, at least three nonzero, each row with its step-by-step trace over the nonzero operands
  ("3 + 2 = 5", "5 + 3 = 8", ...), the way DeepSeek-R1 traces come with OpenR1-Math. With three nonzero operands no
  operand and no sum of two is the total, so the base model, answering the way it knows, is never right: GRPO's
  groups start all wrong, every advantage 0, and on-policy RL has nothing to learn from but a lucky guess. The traces
  show the chain. Zeros make the problems many (1,596), so a model cannot pass by recalling the training problems.
- `val`: five-operand sums never trained on (`unseen-5-terms`) and four-operand sums (`4-terms`), a kind never
  trained on, so the model has to run the procedure rather than recall answers. Both take at most VAL_PER_TOTAL
  problems of each total, so that no single answer is right for most of them (`constant_answer_accuracy`).
"""

from __future__ import annotations

import itertools
import random
from collections import Counter, defaultdict
from pathlib import Path

DIGITS = range(0, 10)
MAX_SUM = 9
TRAIN_OPERANDS = 5
OTHER_OPERANDS = 4
VAL_PER_TOTAL = 8
# How many operands are nonzero: one addition for the base model, at least two for the task.
BASE_NONZERO = range(2, 3)
TASK_NONZERO = range(3, TRAIN_OPERANDS + 1)


def problems(n_operands: int, nonzero: range) -> list[tuple[int, ...]]:
    """Every tuple of `n_operands` digits 0-9 whose sum is at most MAX_SUM and whose count of nonzero operands is in
    `nonzero`."""
    return [
        p
        for p in itertools.product(DIGITS, repeat=n_operands)
        if sum(p) <= MAX_SUM and sum(x > 0 for x in p) in nonzero
    ]


def solution_steps(operands: list[int]) -> str:
    """The worked solution: the running sum of the nonzero operands, one line per addition, then the boxed answer
    after </think>."""
    terms = [x for x in operands if x]
    lines, total = [], terms[0]
    for x in terms[1:]:
        lines.append(f"{total} + {x} = {total + x}")
        total += x
    return "<think>\n" + "\n".join(lines) + f"\n</think>\n\\boxed{{{total}}}"


def question(operands: list[int]) -> str:
    return " + ".join(map(str, operands)) + " = ?"


def constant_answer_accuracy(rows: list[dict]) -> float:
    """The accuracy of always giving the most common answer: the floor a held-out score has to clear."""
    counts = Counter(row["reward_model"]["ground_truth"] for row in rows)
    return max(counts.values()) / len(rows) if rows else 0.0


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


def _by_total(pool: list[tuple[int, ...]], rng: random.Random) -> dict[int, list[tuple[int, ...]]]:
    groups: dict[int, list[tuple[int, ...]]] = defaultdict(list)
    for p in pool:
        groups[sum(p)].append(p)
    for members in groups.values():
        rng.shuffle(members)
    return dict(sorted(groups.items()))


def arithmetic_rows(
    n_base: int, n_train: int, seed: int = 0, val_per_total: int = VAL_PER_TOTAL
) -> dict[str, list[dict]]:
    """Rows of the three splits: `val` takes up to `val_per_total` problems of each total; `train` draws the other
    five-operand problems, each total equally often; `base` draws problems of one addition."""
    rng = random.Random(seed)
    five = _by_total(problems(TRAIN_OPERANDS, TASK_NONZERO), rng)
    held_out = sorted(p for members in five.values() for p in members[:val_per_total])
    seen = {total: members[val_per_total:] for total, members in five.items() if members[val_per_total:]}
    four = _by_total(problems(OTHER_OPERANDS, TASK_NONZERO), rng)
    other = sorted(p for members in four.values() for p in members[:val_per_total])
    one_addition = [problems(n, BASE_NONZERO) for n in range(2, TRAIN_OPERANDS + 1)]
    base = [_row(rng.choice(rng.choice(one_addition)), i, "base", "base") for i in range(n_base)]
    totals = list(seen)
    train = [_row(rng.choice(seen[rng.choice(totals)]), i, "train", "train") for i in range(n_train)]
    val = [_row(p, i, "test", f"unseen-{TRAIN_OPERANDS}-terms") for i, p in enumerate(held_out)]
    val += [_row(p, len(val) + i, "test", f"{OTHER_OPERANDS}-terms") for i, p in enumerate(other)]
    return {"base": base, "train": train, "val": val}


def write_arithmetic_task(
    directory: str | Path, n_base: int = 20000, n_train: int = 4000, seed: int = 0, val_per_total: int = VAL_PER_TOTAL
) -> Path:
    """Write base.parquet, train.parquet and val.parquet; returns the directory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for split, rows in arithmetic_rows(n_base, n_train, seed, val_per_total).items():
        pq.write_table(pa.Table.from_pylist(rows), directory / f"{split}.parquet")
    return directory
