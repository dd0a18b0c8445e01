"""Rollout engines: the engine protocol and its backends (vLLM in-process, vLLM servers, HF transformers)."""
