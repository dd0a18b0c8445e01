"""Loading prompts, answers and traces from parquet / JSONL / datasets directories, and the resumable sampler."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from luffy_trainer.config import DataConfig, UserError
from luffy_trainer.data import ResumableSampler, load_examples
from luffy_trainer.demo.tiny import EOS_TOKEN, PAD_TOKEN, build_tokenizer

SYSTEM = "Think, then answer in a box."
THINK_TRACE = "<think>\n2 + 3 = 5\n</think>\nSo \\boxed{5}."
LONG_QUESTION = "What is " + " + ".join(["1"] * 60) + "?"
LONG_TRACE = "<think>\n" + " + ".join(["1"] * 60) + "\n</think>\n\\boxed{60}"


def luffy_rows(target_as_dict: bool = False) -> list[dict]:
    """Released-schema rows: 0 and 1 usable, 2 without a trace, 3 with a long prompt, 4 with a long trace."""

    def target(content):
        if content is None:
            return None
        message = {"role": "assistant", "content": content}
        return message if target_as_dict else [message]

    def row(question, trace, answer, source="arith"):
        return {
            "data_source": source,
            "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
            "target": target(trace),
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": answer},
        }

    return [
        row("What is 2 + 3?", THINK_TRACE, "5"),
        row("What is 3 + 4?", "Just add: \\boxed{7}", "7", source=""),
        row("What is 1 + 1?", None, "2"),
        row(LONG_QUESTION, THINK_TRACE, "60"),
        row("What is 1 + ... + 1?", LONG_TRACE, "60"),
    ]


def write_source(kind: str, rows: list[dict], directory) -> str:
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = directory / "train.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif kind == "jsonl":
        path = directory / "train.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        import datasets

        path = directory / "train_ds"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def chatml(*turns: tuple[str, str]) -> str:
    """The tiny tokenizer's template written out by hand, generation prompt included."""
    body = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)
    return body + "<|im_start|>assistant\n<think>\n"


LIMITS = {"max_prompt_length": 80, "max_response_length": 60, "overlong_prompt": "drop", "overlong_trace": "drop"}


@pytest.mark.parametrize("kind", ["parquet", "jsonl", "datasets"])
def test_luffy_format(kind, tok, tmp_path, caplog):
    path = write_source(kind, luffy_rows(target_as_dict=kind == "jsonl"), tmp_path)
    with caplog.at_level(logging.INFO, logger="luffy_trainer.data"):
        loaded = load_examples([path], DataConfig(train_files=[path], **LIMITS), tok)

    s = loaded.stats
    assert (s.rows_read, s.kept, s.dropped_missing_trace, s.dropped_overlong_prompt, s.dropped_overlong_trace) == (
        5,
        2,
        1,
        1,
        1,
    )
    assert "2 of 5 rows kept" in caplog.text
    first, second = loaded.examples
    assert [first.index, second.index] == [0, 1]

    prompt_text = chatml(("system", SYSTEM), ("user", "What is 2 + 3?"))
    assert first.prompt_text == prompt_text
    assert first.prompt_ids == encode(tok, prompt_text)
    assert first.ground_truth == "5" and second.ground_truth == "7"
    # The template already opened "<think>\n", so the trace starts right after it and ends with EOS.
    assert first.trace_ids == [*encode(tok, "2 + 3 = 5\n</think>\nSo \\boxed{5}."), tok.eos_token_id]
    assert tok.decode(first.trace_ids) == THINK_TRACE.removeprefix("<think>\n") + EOS_TOKEN
    assert second.trace_ids == [*encode(tok, "Just add: \\boxed{7}"), tok.eos_token_id]
    assert first.data_source == "arith"
    assert second.data_source == tmp_path.joinpath(path).stem  # empty data_source falls back to the file name


def test_prompt_and_trace_limits_count_every_token(tok, tmp_path):
    path = write_source("parquet", luffy_rows(), tmp_path)
    prompt_len = len(encode(tok, chatml(("system", SYSTEM), ("user", "What is 2 + 3?"))))
    trace_len = len(encode(tok, THINK_TRACE.removeprefix("<think>\n"))) + 1  # + EOS
    exact = DataConfig(train_files=[path], **{**LIMITS, "max_prompt_length": prompt_len})
    exact.max_response_length = trace_len
    kept = load_examples([path], exact, tok).examples
    assert [e.ground_truth for e in kept] == ["5", "7"]

    exact.max_response_length = trace_len - 1  # the EOS no longer fits for row 0
    assert [e.ground_truth for e in load_examples([path], exact, tok).examples] == ["7"]
    exact.max_prompt_length = prompt_len - 1
    with pytest.raises(ValueError, match="no usable rows"):
        load_examples([path], exact, tok)


def test_error_policies_name_the_row_and_limit(tok, tmp_path):
    path = write_source("jsonl", luffy_rows(), tmp_path)
    config = DataConfig(train_files=[path], **{**LIMITS, "overlong_prompt": "error"})
    with pytest.raises(
        ValueError, match=r"train\.jsonl row 3: prompt has \d+ tokens, over data.max_prompt_length = 80"
    ):
        load_examples([path], config, tok)
    config = DataConfig(train_files=[path], **{**LIMITS, "overlong_trace": "error"})
    with pytest.raises(
        ValueError, match=r"train\.jsonl row 4: trace has \d+ tokens, over data.max_response_length = 60"
    ):
        load_examples([path], config, tok)


def test_traces_are_not_read_when_not_required(tok, tmp_path):
    rows = [{k: v for k, v in r.items() if k != "target"} for r in luffy_rows()[:3]]
    path = write_source("parquet", rows, tmp_path)
    config = DataConfig(train_files=[path], **LIMITS)
    loaded = load_examples([path], config, tok, require_traces=False)
    assert [e.trace_ids for e in loaded.examples] == [[], [], []]
    assert loaded.stats.kept == 3
    with pytest.raises(ValueError, match="column 'target'"):
        load_examples([path], config, tok)


def test_missing_column_names_column_and_file(tok, tmp_path):
    rows = [{k: v for k, v in r.items() if k != "reward_model"} for r in luffy_rows()]
    path = write_source("parquet", rows, tmp_path)
    with pytest.raises(ValueError) as err:
        load_examples([path], DataConfig(train_files=[path]), tok)
    message = str(err.value)
    assert "column 'reward_model'" in message and "data.luffy_columns.ground_truth" in message
    assert str(path) in message
    assert "columns present: data_source, prompt, target, ability" in message

    path = write_source("jsonl", luffy_rows(), tmp_path)
    config = DataConfig(train_files=[path], luffy_columns={"ground_truth": "reward_model.answer"})
    with pytest.raises(ValueError, match=r"train\.jsonl row 0: column 'reward_model' has no key 'answer'"):
        load_examples([path], config, tok)


def test_flat_format(tok, tmp_path):
    rows = [
        {"problem": "What is 6 * 7?", "final": 42, "worked": "<think>\n6 * 7 = 42\n</think>\n\\boxed{42}"},
        {"problem": "What is 9 - 4?", "final": "5", "worked": "9 - 4 = 5, so \\boxed{5}"},
        {"problem": "What is 1 + 2?", "final": "3", "worked": None},
    ]
    path = write_source("jsonl", rows, tmp_path)
    config = DataConfig(
        train_files=[path],
        format="flat",
        flat_columns={"question": "problem", "answer": "final", "solution": "worked"},
        system_prompt=SYSTEM,
    )
    loaded = load_examples([path], config, tok)
    assert loaded.stats.dropped_missing_trace == 1
    first, second = loaded.examples
    assert first.prompt_text == chatml(("system", SYSTEM), ("user", "What is 6 * 7?"))
    assert first.prompt_ids == encode(tok, first.prompt_text)
    assert first.ground_truth == "42"
    assert first.trace_ids == [*encode(tok, "6 * 7 = 42\n</think>\n\\boxed{42}"), tok.eos_token_id]
    assert second.trace_ids == [*encode(tok, "9 - 4 = 5, so \\boxed{5}"), tok.eos_token_id]
    assert first.data_source == "train"

    config.system_prompt = None
    (no_system,) = load_examples([path], config, tok, require_traces=False).examples[:1]
    assert no_system.prompt_text == chatml(("user", "What is 6 * 7?"))

    config.flat_columns.solution = "steps"
    with pytest.raises(ValueError, match=r"column 'steps' \(data.flat_columns.solution = 'steps'\) not found"):
        load_examples([path], config, tok)


def test_no_special_tokens_enter_prompts_or_traces(tok, tmp_path):
    """A tokenizer that adds a BOS when asked must not get it inside templated prompts or traces."""
    from tokenizers import processors

    bos_tok = build_tokenizer()
    pad_id = bos_tok.convert_tokens_to_ids(PAD_TOKEN)
    bos_tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{PAD_TOKEN} $A", special_tokens=[(PAD_TOKEN, pad_id)]
    )
    assert bos_tok("x")["input_ids"][0] == pad_id  # the BOS really is added by default
    path = write_source("parquet", luffy_rows(), tmp_path)
    first = load_examples([path], DataConfig(train_files=[path], **LIMITS), bos_tok).examples[0]
    assert pad_id not in first.prompt_ids and pad_id not in first.trace_ids
    assert first.trace_ids == [*encode(tok, THINK_TRACE.removeprefix("<think>\n")), tok.eos_token_id]


def test_datasets_directory_with_several_splits(tok, tmp_path):
    import datasets

    split = datasets.Dataset.from_list(luffy_rows()[:2])
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"several splits \(train, test\).*dd/train"):
        load_examples([str(tmp_path / "dd")], DataConfig(), tok)
    assert load_examples([str(tmp_path / "dd" / "train")], DataConfig(), tok).stats.kept == 2


def test_unsupported_and_missing_files(tok, tmp_path):
    csv = tmp_path / "train.csv"
    csv.write_text("question,answer\n")
    with pytest.raises(ValueError, match=r"unsupported data file .*train\.csv"):
        load_examples([str(csv)], DataConfig(), tok)
    with pytest.raises(UserError, match=r"data file .*nowhere\.parquet does not exist"):
        load_examples([str(tmp_path / "nowhere.parquet")], DataConfig(), tok)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": []}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl line 2 is not valid JSON"):
        load_examples([str(bad)], DataConfig(), tok)


def test_sampler_epochs_are_seeded_permutations():
    n, k = 5, 3
    sampler = ResumableSampler(n, seed=47)
    flat = [i for _ in range(5) for i in sampler.next_batch(k)]  # 15 indices = 3 epochs
    epochs = [flat[e * n : (e + 1) * n] for e in range(3)]
    assert all(sorted(e) == list(range(n)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1
    assert sampler.epoch == 2 and sampler.position == n
    other = ResumableSampler(n, seed=47)
    assert [i for _ in range(5) for i in other.next_batch(k)] == flat
    assert ResumableSampler(n, seed=48).next_batch(n) != epochs[0]
    assert ResumableSampler(n, seed=1, shuffle=False).next_batch(7) == [0, 1, 2, 3, 4, 0, 1]


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_sampler_resumes_exactly_including_at_epoch_boundaries(k):
    n = 4
    reference = ResumableSampler(n, seed=3)
    boundary_states = 0
    for _ in range(10):
        state = reference.state_dict()
        boundary_states += state["position"] == n
        resumed = ResumableSampler(n, seed=3)
        resumed.load_state_dict(json.loads(json.dumps(state)))  # as stored in a checkpoint
        copy = ResumableSampler(n, seed=3)
        copy.load_state_dict(state)
        expected = [copy.next_batch(k) for _ in range(4)]
        assert [resumed.next_batch(k) for _ in range(4)] == expected
        assert all(len(b) == k for b in expected)
        reference.next_batch(k)
    assert boundary_states > 0  # states saved exactly at the end of an epoch were exercised


def test_sampler_resume_at_boundary_continues_into_next_epoch():
    """Independent of the sampler's own continuation: the next batch is epoch 1's seeded permutation."""
    sampler = ResumableSampler(4, seed=3)
    sampler.next_batch(4)
    state = sampler.state_dict()
    assert (state["epoch"], state["position"]) == (0, 4)
    resumed = ResumableSampler(4, seed=3)
    resumed.load_state_dict(state)
    assert resumed.next_batch(4) == np.random.default_rng([3, 1]).permutation(4).tolist()
    assert resumed.epoch == 1


def test_sampler_rejects_foreign_state():
    state = ResumableSampler(4, seed=3).state_dict()
    with pytest.raises(ValueError, match="num_items=4, this run has num_items=5"):
        ResumableSampler(5, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=3, this run has seed=4"):
        ResumableSampler(4, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="invalid sampler state"):
        ResumableSampler(4, seed=3).load_state_dict({**state, "position": 5})
    with pytest.raises(ValueError, match="batch size"):
        ResumableSampler(4, seed=3).next_batch(0)
    with pytest.raises(ValueError, match="cannot sample from 0 items"):
        ResumableSampler(0, seed=3)
