"""Rollouts with Hugging Face transformers `generate`, for models or machines vLLM cannot serve.

Much slower than vLLM on real models, but it needs nothing beyond transformers. Log-probs are those of the distribution
sampled (log-softmax of generate's processed scores: after temperature, top-k and top-p), as with vLLM's
`processed_logprobs` mode. A seeded call is reproducible, but its samples differ from vLLM's for the same seed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from luffy_trainer.rollout.base import Completion, RolloutError, SamplingParams
from luffy_trainer.rollout.common import (
    check_request,
    check_version,
    is_greedy,
    prompt_seed,
    repeat_greedy,
    samples_per_request,
)


class HFEngine:
    """A `RolloutEngine` that runs `model.generate` in this process, `max_batch_prompts` prompts at a time."""

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        device: str | None = None,
        trust_remote_code: bool = False,
        max_batch_prompts: int = 32,
    ) -> None:
        from transformers import AutoModelForCausalLM

        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            model = AutoModelForCausalLM.from_pretrained(
                model_path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError) as exc:
            raise RolloutError(f"transformers could not load {model_path!r}: {exc}") from exc
        self._model = model.to(self._device).eval()
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = model.config.eos_token_id
        if eos is None:
            raise RolloutError(f"model {model_path!r} defines no eos_token_id")
        self._eos = [eos] if isinstance(eos, int) else list(eos)
        pad = model.generation_config.pad_token_id
        self._pad = pad if pad is not None else self._eos[0]
        self._max_batch_prompts = max_batch_prompts
        self._version = 0

    @property
    def weight_version(self) -> int:
        return self._version

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        n: int,
        params: SamplingParams,
        seed: int | None = None,
    ) -> list[list[Completion]]:
        check_request(prompts, n, params)
        out: list[list[Completion]] = []
        for start in range(0, len(prompts), self._max_batch_prompts):
            chunk = prompts[start : start + self._max_batch_prompts]
            chunk_seed = prompt_seed(seed, start)
            out.extend(repeat_greedy(c, params, n) for c in self._generate_chunk(chunk, n, params, chunk_seed))
        return out

    @torch.no_grad()
    def _generate_chunk(
        self, prompts: Sequence[Sequence[int]], n: int, params: SamplingParams, seed: int | None
    ) -> list[list[Completion]]:
        from transformers import GenerationConfig

        k = samples_per_request(params, n)
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self._pad, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding: every prompt ends where generation starts
            input_ids[row, width - len(prompt) :] = torch.tensor(list(prompt))
            attention_mask[row, width - len(prompt) :] = 1
        sampling = {} if is_greedy(params) else {
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": max(params.top_k, 0),  # 0 turns top-k off; None would mean generate's default of 50
        }  # fmt: skip
        config = GenerationConfig(
            max_new_tokens=params.max_tokens,
            do_sample=not is_greedy(params),
            num_return_sequences=k,
            eos_token_id=self._eos,
            pad_token_id=self._pad,
            output_scores=True,
            return_dict_in_generate=True,
            **sampling,
        )
        devices = [self._device] if self._device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.manual_seed(seed)
            result = self._model.generate(
                input_ids=input_ids.to(self._device),
                attention_mask=attention_mask.to(self._device),
                generation_config=config,
            )
        tokens = result.sequences[:, width:].cpu()
        logprobs = torch.stack(result.scores, dim=1).float().log_softmax(-1)
        logprobs = logprobs.gather(-1, tokens.to(logprobs.device).unsqueeze(-1)).squeeze(-1).cpu()
        completions: list[list[Completion]] = [[] for _ in prompts]
        for row in range(tokens.shape[0]):  # rows are prompt 0 x k, prompt 1 x k, ...
            ids = tokens[row].tolist()
            stop = next((j for j, t in enumerate(ids) if t in self._eos), None)
            length = len(ids) if stop is None else stop + 1
            completions[row // k].append(
                Completion(
                    token_ids=ids[:length],
                    logprobs=logprobs[row, :length].tolist(),
                    finish_reason="length" if stop is None else "stop",
                    weight_version=self._version,
                )
            )
        return completions

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        check_version(version)
        tensors = list(named_tensors)
        state = self._model.state_dict()
        for name, tensor in tensors:
            if name not in state:
                raise RolloutError(f"update_weights: the model has no weight named {name!r}")
            if tuple(state[name].shape) != tuple(tensor.shape):
                raise RolloutError(
                    f"update_weights: weight {name!r} has shape {tuple(tensor.shape)}, "
                    f"the model's is {tuple(state[name].shape)}"
                )
        with torch.no_grad():
            for name, tensor in tensors:
                state[name].copy_(tensor)
        self._version = version

    def health(self) -> bool:
        return self._model is not None

    def close(self) -> None:
        self._model = None
