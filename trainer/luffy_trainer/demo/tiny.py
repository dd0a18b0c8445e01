"""A deterministic tiny Qwen2-style model and tokenizer, built offline, for tests, examples and benchmarks.

The tokenizer is a byte-level BPE trained on generated arithmetic text, with ChatML special tokens and a chat template
whose generation prompt ends with "<think>\\n", as LUFFY's base model does. Like Qwen2.5's tokenizer it splits numbers
into single digits, so arithmetic is the same few tokens whatever the number. vLLM's CPU attention needs head_dim >= 32.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [PAD_TOKEN, "<|im_start|>", EOS_TOKEN]
THINK_TOKENS = ["<think>", "</think>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)


@dataclass(frozen=True)
class TinyModelShape:
    """Architecture of the generated model (the defaults give ~0.4M parameters, 1.6 MB in float32)."""

    hidden_size: int = 128
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    vocab_size: int = 384
    max_position_embeddings: int = 2048
    tokenizer_vocab_size: int = 376

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def _corpus(seed: int = 1234, lines: int = 5000) -> list[str]:
    """Arithmetic sentences in the style of the quickstart task, so BPE learns digits, operators and tags."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        op = rng.choice("+-*")
        value = a + b if op == "+" else a - b if op == "-" else a * b
        out.append(
            f"What is {a} {op} {b}? Think step by step. <think>\n{a} {op} {b} = {value}\n</think>\n"
            f"The answer is \\boxed{{{value}}}."
        )
    return out


def build_tokenizer(shape: TinyModelShape = TinyModelShape()):
    """A PreTrainedTokenizerFast with ChatML tokens, think tags and the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=shape.tokenizer_vocab_size - len(THINK_TOKENS),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=["<|im_start|>"],
    )
    fast.add_tokens(THINK_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    if len(fast) > shape.vocab_size:
        raise ValueError(f"tokenizer has {len(fast)} tokens, more than the model vocabulary {shape.vocab_size}")
    return fast


def build_model(tokenizer, shape: TinyModelShape = TinyModelShape(), seed: int = 0):
    """A randomly initialised Qwen2ForCausalLM (float32) whose special-token ids match the tokenizer."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    if shape.head_dim < 32:
        raise ValueError(f"head_dim {shape.head_dim} < 32 is not supported by vLLM's CPU attention")
    config = Qwen2Config(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=config.bos_token_id
    )
    return model


def make_tiny_model(directory: str | Path, seed: int = 0, shape: TinyModelShape = TinyModelShape()) -> Path:
    """Write model + tokenizer to `directory` (created); the same seed gives the same bytes."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(shape)
    model = build_model(tokenizer, shape, seed)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    (directory / "luffy_tiny.json").write_text(json.dumps({"seed": seed, **asdict(shape)}, indent=2))
    return directory


def main(args: argparse.Namespace) -> int:
    path = make_tiny_model(args.dir, seed=args.seed)
    print(f"wrote tiny model and tokenizer to {path}")
    return 0
