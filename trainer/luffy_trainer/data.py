"""Training and validation data: prompts with ground truth and off-policy traces, and a resumable sampler.

Sources are local only: parquet files, JSON-lines files, or directories written by `datasets.save_to_disk`. Two row
formats (`data.format`):
- `luffy`, the released LUFFY/verl schema: `prompt` is a list of chat messages, `target` the trace as one assistant
  message (a dict or a one-element list of dicts), `reward_model.ground_truth` the answer (a dotted path into a struct
  column), and an optional `data_source`.
- `flat`: question / answer / solution columns named by `data.flat_columns`; the prompt is the optional
  `data.system_prompt` plus the question as the user turn.

Prompts go through the tokenizer's chat template with the generation prompt. Traces are tokenized without special
tokens and end with EOS; when the generation prompt already opens "<think>\\n", a trace starting with it loses that
prefix (as the released dataset code does), so the model never sees the tag twice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from luffy_trainer.config import DataConfig, UserError

logger = logging.getLogger(__name__)

THINK_PREFIX = "<think>\n"
TOKENIZE_BATCH_ROWS = 512


@dataclass
class Example:
    """One usable row: its tokenized prompt, answer and (possibly empty) off-policy trace."""

    index: int  # position in LoadedData.examples
    prompt_ids: list[int]
    ground_truth: str
    trace_ids: list[int]  # trace tokens + EOS; empty when traces were not requested
    data_source: str
    prompt_text: str


@dataclass
class LoadStats:
    """What happened to the rows read: kept, or dropped for one reason each."""

    rows_read: int = 0
    kept: int = 0
    dropped_overlong_prompt: int = 0
    dropped_overlong_trace: int = 0
    dropped_missing_trace: int = 0


@dataclass
class LoadedData:
    examples: list[Example]
    stats: LoadStats


@dataclass
class _Row:
    """A parsed row before tokenization; `where` names it in error messages."""

    where: str
    messages: list[dict[str, str]]
    ground_truth: str
    trace: str | None
    data_source: str


@dataclass
class _ColumnSpec:
    """A config column name: a top-level column plus keys into its struct; `setting` is the config field."""

    setting: str
    name: str
    column: str = ""
    keys: list[str] = field(default_factory=list)

    def resolve(self, present: list[str], path: Path) -> _ColumnSpec:
        """Bind to the file's columns: the whole name if it is a column, else its first dotted part."""
        if self.name in present:
            self.column, self.keys = self.name, []
        else:
            self.column, *self.keys = self.name.split(".")
        if self.column not in present:
            raise UserError(
                f"column {self.column!r} ({self.setting} = {self.name!r}) not found in {path}; "
                f"columns present: {', '.join(present) or '(none)'}"
            )
        return self

    def get(self, row: dict[str, Any], where: str) -> Any:
        value = row.get(self.column)
        for key in self.keys:
            if value is None:
                return None
            if not isinstance(value, dict):
                raise UserError(f"{where}: column {self.column!r} is not a struct, cannot read {self.name!r}")
            if key not in value:
                raise UserError(f"{where}: column {self.column!r} has no key {key!r} (for {self.setting})")
            value = value[key]
        return value


RowReader = Callable[[list[str]], list[dict[str, Any]]]


def _open_file(path: Path) -> tuple[list[str], RowReader]:
    """Column names of a parquet file, a JSON-lines file or a `datasets` directory, and a reader of the rows (dicts)
    restricted to given columns, so wide unused columns (per-token teacher probabilities, say) are never loaded."""
    if not path.exists():
        raise UserError(f"data file {path} does not exist")
    if path.is_dir():
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if len(loaded) != 1:
                raise UserError(
                    f"{path} holds several splits ({', '.join(loaded)}); point the data files at one of them, "
                    f"e.g. {path / next(iter(loaded))}"
                )
            loaded = next(iter(loaded.values()))
        return list(loaded.column_names), lambda columns: loaded.select_columns(columns).to_list()
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names), lambda columns: pq.read_table(path, columns=columns).to_pylist()
    if suffix in (".jsonl", ".json"):
        rows, present = [], {}
        with path.open(encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(
                        f"{path} line {line_no} is not valid JSON ({exc.msg}); expected JSON lines"
                    ) from None
                if not isinstance(row, dict):
                    raise UserError(f"{path} line {line_no} is not a JSON object")
                present.update(dict.fromkeys(row))
                rows.append(row)
        return list(present), lambda columns: [{c: row.get(c) for c in columns} for row in rows]
    raise UserError(
        f"unsupported data file {path}: expected a .parquet file, a .jsonl/.json (JSON lines) file or a directory "
        f"written by datasets.save_to_disk"
    )


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _trace_content(value: Any, where: str) -> str | None:
    """The trace text of a luffy `target` cell: one assistant message, possibly wrapped in a one-element list."""
    if isinstance(value, list):
        if not value:
            return None
        if len(value) > 1:
            raise UserError(f"{where}: target holds {len(value)} messages; expected one assistant message")
        value = value[0]
    if value is None:
        return None
    if not isinstance(value, dict) or "content" not in value:
        raise UserError(f"{where}: target must be a message dict with 'content', got {type(value).__name__}")
    return _text(value["content"])


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: prompt must be a non-empty list of chat messages, got {type(value).__name__}")
    for message in value:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise UserError(f"{where}: each prompt message needs 'role' and 'content', got {message!r}")
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]


def _parse_rows(path: Path, data: DataConfig, require_traces: bool) -> list[_Row]:
    present, read_rows = _open_file(path)
    section = "luffy_columns" if data.format == "luffy" else "flat_columns"
    names = ("prompt", "ground_truth", "target") if data.format == "luffy" else ("question", "answer", "solution")
    prompt, truth, trace = (_ColumnSpec(f"data.{section}.{n}", getattr(getattr(data, section), n)) for n in names)
    prompt.resolve(present, path)
    truth.resolve(present, path)
    trace = trace.resolve(present, path) if require_traces else None
    wanted = [prompt.column, truth.column] + ([trace.column] if trace else []) + ["data_source"]
    records = read_rows([c for c in dict.fromkeys(wanted) if c in present])
    rows = []
    for i, record in enumerate(records):
        where = f"{path} row {i}"
        if data.format == "luffy":
            messages = _messages(prompt.get(record, where), where)
            trace_text = _trace_content(trace.get(record, where), where) if trace else None
        else:
            question = _text(prompt.get(record, where))
            if question is None:
                raise UserError(f"{where}: {prompt.setting} ({prompt.name!r}) is empty")
            system = [{"role": "system", "content": data.system_prompt}] if data.system_prompt is not None else []
            messages = [*system, {"role": "user", "content": question}]
            trace_text = _text(trace.get(record, where)) if trace else None
        ground_truth = _text(truth.get(record, where))
        if ground_truth is None:
            raise UserError(f"{where}: {truth.setting} ({truth.name!r}) is empty")
        source = record.get("data_source")
        rows.append(_Row(where, messages, ground_truth, trace_text or None, str(source) if source else path.stem))
    return rows


class _SharedInts:
    """Token ids as shared int objects: a list of ids then costs 8 bytes per token instead of about 36."""

    def __init__(self, size: int):
        self._table = list(range(size))

    def __call__(self, ids: list[int]) -> list[int]:
        if ids and max(ids) >= len(self._table):
            self._table.extend(range(len(self._table), max(ids) + 1))
        return list(map(self._table.__getitem__, ids))


_LIMITS = {"prompt": ("overlong_prompt", "max_prompt_length"), "trace": ("overlong_trace", "max_response_length")}


def _over_limit(data: DataConfig, what: str, where: str, length: int) -> bool:
    """Whether a prompt/trace of `length` tokens exceeds its limit; raises instead under policy `error`."""
    policy, setting = _LIMITS[what]
    limit = getattr(data, setting)
    if length <= limit:
        return False
    if getattr(data, policy) == "error":
        raise UserError(
            f"{where}: {what} has {length} tokens, over data.{setting} = {limit} "
            f"(data.{policy} = 'drop' skips such rows)"
        )
    return True


def load_examples(files: list[str], data: DataConfig, tokenizer, *, require_traces: bool = True) -> LoadedData:
    """Read, template, tokenize and length-filter the rows of `files` (in order) into Examples.

    With `require_traces` the trace column must exist, rows without a trace are dropped (counted), and traces over
    `data.max_response_length` (EOS included) follow `data.overlong_trace`. Without it traces are not read at all
    (validation sets, GRPO). Prompts over `data.max_prompt_length` follow `data.overlong_prompt`.
    """
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token; traces must end with one")
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the tokenizer has no chat template; prompts are built with it")
    if not files:
        raise UserError("no data files given")
    stats = LoadStats()
    examples: list[Example] = []
    shared = _SharedInts(len(tokenizer))
    for file in files:
        rows = _parse_rows(Path(file), data, require_traces)
        stats.rows_read += len(rows)
        for start in range(0, len(rows), TOKENIZE_BATCH_ROWS):
            batch = rows[start : start + TOKENIZE_BATCH_ROWS]
            texts = tokenizer.apply_chat_template(
                [r.messages for r in batch], add_generation_prompt=True, tokenize=False
            )
            prompt_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
            traces = [
                r.trace[len(THINK_PREFIX) :]
                if r.trace and text.endswith(THINK_PREFIX) and r.trace.startswith(THINK_PREFIX)
                else r.trace or ""
                for r, text in zip(batch, texts, strict=True)
            ]
            trace_ids = tokenizer(traces, add_special_tokens=False)["input_ids"] if require_traces else None
            for j, row in enumerate(batch):
                if _over_limit(data, "prompt", row.where, len(prompt_ids[j])):
                    stats.dropped_overlong_prompt += 1
                    continue
                trace = []
                if require_traces:
                    if row.trace is None:
                        stats.dropped_missing_trace += 1
                        continue
                    trace = [*trace_ids[j], tokenizer.eos_token_id]
                    if _over_limit(data, "trace", row.where, len(trace)):
                        stats.dropped_overlong_trace += 1
                        continue
                examples.append(
                    Example(
                        index=len(examples),
                        prompt_ids=shared(prompt_ids[j]),
                        ground_truth=row.ground_truth,
                        trace_ids=shared(trace),
                        data_source=row.data_source,
                        prompt_text=texts[j],
                    )
                )
    stats.kept = len(examples)
    logger.info(
        "data: %d of %d rows kept from %s; dropped %d with a prompt over %d tokens, %d with a trace over %d tokens, "
        "%d without a trace",
        stats.kept,
        stats.rows_read,
        ", ".join(files),
        stats.dropped_overlong_prompt,
        data.max_prompt_length,
        stats.dropped_overlong_trace,
        data.max_response_length,
        stats.dropped_missing_trace,
    )
    if not examples:
        raise UserError(
            f"no usable rows in {', '.join(files)}: of {stats.rows_read} read, {stats.dropped_overlong_prompt} have a "
            f"prompt over data.max_prompt_length = {data.max_prompt_length}, {stats.dropped_overlong_trace} a trace "
            f"over data.max_response_length = {data.max_response_length}, {stats.dropped_missing_trace} no trace"
        )
    return LoadedData(examples, stats)


class ResumableSampler:
    """Endless batches of item indices, epoch after epoch, with a state that restores the exact continuation.

    Epoch e visits every index once, in a permutation seeded by (seed, e) (or in order without shuffle). The state
    is (epoch, position in that epoch's order); a state saved after the last index of an epoch resumes with the
    next epoch, never with an empty one.
    """

    def __init__(self, num_items: int, seed: int, shuffle: bool = True):
        if num_items < 1:
            raise ValueError(f"cannot sample from {num_items} items")
        self.num_items = num_items
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_items))
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_items).tolist()

    def next_batch(self, k: int) -> list[int]:
        """The next `k` indices; a batch that reaches the end of an epoch continues into the next one."""
        if k < 1:
            raise ValueError(f"batch size must be at least 1, got {k}")
        batch: list[int] = []
        while len(batch) < k:
            if self.position == self.num_items:
                self.epoch += 1
                self.position = 0
                self._order = self._epoch_order(self.epoch)
            take = min(k - len(batch), self.num_items - self.position)
            batch.extend(self._order[self.position : self.position + take])
            self.position += take
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_items": self.num_items,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "epoch": self.epoch,
            "position": self.position,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state; the data size, seed and shuffle setting must be the ones it was saved with."""
        for key in ("num_items", "seed", "shuffle"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"sampler state was saved with {key}={state.get(key)!r}, this run has {key}={getattr(self, key)!r}"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.num_items:
            raise ValueError(f"invalid sampler state: epoch {epoch}, position {position} of {self.num_items}")
        self.epoch, self.position = epoch, position
        self._order = self._epoch_order(epoch)
