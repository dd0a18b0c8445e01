"""Rollout pieces that need no model: the engine factory and its config, serve-rollout's command line, and the
server client's bounded wait when no replica is up."""

from __future__ import annotations

import argparse
import time

import pytest
from luffy_trainer import contract
from luffy_trainer.cli import build_parser
from luffy_trainer.config import TrainConfig
from luffy_trainer.rollout import RolloutError, SamplingParams, build_rollout_engine, serve
from luffy_trainer.rollout.factory import rollout_server_urls, weight_sync_address
from luffy_trainer.rollout.server_client import VLLMServerClient
from luffy_trainer.rollout.weight_sync import EXTENSION_CLS
from pydantic import ValidationError
from rollout_reference import free_port_block


def server_config(urls: list[str], **rollout) -> TrainConfig:
    return TrainConfig.model_validate({"rollout": {"backend": "vllm-server", "serverUrls": urls, **rollout}})


def test_server_urls_come_from_the_config():
    config = server_config(["http://r-0.svc:8000", "http://r-1.svc:8000"]).rollout
    assert rollout_server_urls(config) == ["http://r-0.svc:8000", "http://r-1.svc:8000"]


@pytest.mark.parametrize(
    ("urls", "message"),
    [
        ([], "needs server URLs: set rollout.server_urls"),
        (["a:8000"], "rollout.server_urls: 'a:8000' is not an http"),
        (["http://a", "http://a"], "listed twice"),
    ],
)
def test_bad_server_urls_name_the_field(urls, message):
    with pytest.raises(RolloutError, match=message):
        rollout_server_urls(server_config(urls).rollout)


def test_weight_sync_address_defaults_and_validation():
    assert weight_sync_address(server_config([]).rollout, 2) == ("127.0.0.1", contract.WEIGHT_SYNC_PORT)
    given = server_config([], weightSyncHost="trainer-0.run", weightSyncPort=31000).rollout
    assert weight_sync_address(given, 4) == ("trainer-0.run", 31000)
    with pytest.raises(ValidationError, match="weightSyncPort"):
        server_config([], weightSyncPort="x")
    with pytest.raises(RolloutError, match=r"65535\.\.65536 are not all valid"):
        weight_sync_address(server_config([], weightSyncPort=65535).rollout, 2)


def test_factory_builds_a_server_client_from_the_config():
    base = free_port_block(2)
    config = server_config(["http://127.0.0.1:9", "http://127.0.0.1:10"], weightSyncPort=base)
    engine = build_rollout_engine(config, "unused")
    try:
        assert isinstance(engine, VLLMServerClient)
        assert [s.url for s in engine.replica_stats()] == ["http://127.0.0.1:9", "http://127.0.0.1:10"]
        assert engine.weight_version == 0 and not engine.health()
    finally:
        engine.close()


def test_no_healthy_replica_fails_after_the_bounded_wait_naming_each_replica():
    urls = [f"http://127.0.0.1:{free_port_block(1)}" for _ in range(2)]  # nothing listens there
    client = VLLMServerClient(urls, sync_port=free_port_block(2), unhealthy_timeout_s=1.5)
    start = time.monotonic()
    try:
        with pytest.raises(RolloutError, match=r"no rollout server became ready within 1\.5 s") as err:
            client.generate([[5, 6, 7]], 1, SamplingParams(max_tokens=4))
    finally:
        client.close()
    assert 1.5 <= time.monotonic() - start < 30  # it waited, and not longer than needed
    assert all(url in str(err.value) for url in urls)


def serve_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve-rollout", *argv])


def test_serve_command_adds_the_extension_and_safe_defaults(tmp_path):
    args = serve_args("--model", str(tmp_path), "--port", "8123", "--enforce-eager", "--", "--max-num-seqs", "8")
    cmd = serve.server_command(args, cpu=False, python="py")
    assert cmd[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(cmd)
    for part in (
        f"--model {tmp_path}",
        "--port 8123",
        f"--worker-extension-cls {EXTENSION_CLS}",
        "--enable-prefix-caching",
        "--logprobs-mode processed_logprobs",
        "--generation-config vllm",
        "--served-model-name policy",
        "--enforce-eager",
    ):
        assert part in joined
    assert cmd[-2:] == ["--max-num-seqs", "8"]  # pass-through arguments come last, so they can override defaults
    assert "chunked-prefill" not in joined  # GPU: vLLM's scheduler defaults


def test_serve_command_on_cpu_prefills_prompts_whole(tmp_path):
    cmd = serve.server_command(serve_args("--model", str(tmp_path), "--max-model-len", "9216"), cpu=True)
    assert "--no-enable-chunked-prefill" in cmd
    assert cmd[cmd.index("--max-num-batched-tokens") + 1] == "9216"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--", "--port", "1"], "--port is set by serve-rollout"),
        (["--", "--worker-extension-cls=x.Y"], "--worker-extension-cls is set by serve-rollout"),
        (["--port", "0"], "not a TCP port"),
    ],
)
def test_serve_refuses_arguments_that_would_break_the_replica(tmp_path, extra, message):
    with pytest.raises(serve.ServeError, match=message):
        serve.server_command(serve_args("--model", str(tmp_path), *extra), cpu=False)


def test_serve_main_reports_a_missing_model_directory(tmp_path, capsys):
    assert serve.main(serve_args("--model", str(tmp_path / "missing"))) == 2
    assert "no such model directory" in capsys.readouterr().err
