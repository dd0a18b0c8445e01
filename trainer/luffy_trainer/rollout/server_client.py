"""A client for one or many `luffy serve-rollout` (vLLM OpenAI server) replicas.

Generation: one `/v1/completions` request per prompt (token ids in, token ids and log-probs out), spread over the
ready replicas by fewest requests in flight. A request that fails with a connection error, a timeout or a 5xx is sent
again to another replica; the failing replica is left out until a health probe, with exponential back-off, finds it
up again. Each prompt's answer is taken from exactly one successful request. With no replica ready for
`unhealthy_timeout_s`, the batch fails with a RolloutError that lists each replica's last error.

Weights (see `weight_sync`): each replica gets its own process group (trainer = rank 0) on port
`contract.weight_sync_port(sync_port, index)`. An update is streamed once: each bucket is broadcast to every replica in
turn while the replicas receive it through `/collective_rpc`; then their prefix caches are reset. A replica is *ready*
only when it still runs the process that last received weights from this client and reports the current version. One
that restarted (new process id) is re-joined and sent the current weights before any generation request goes to it; for
that the client keeps the last update's bytes in host memory (one copy of the weights, in the dtype sent).

With a control token (`rollout.control_token_file`, see `control`), every request carries it as a Bearer header.

Not thread-safe: call generate and update_weights from one thread, never at the same time.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import requests

from luffy_trainer import contract
from luffy_trainer.rollout import control, weight_sync
from luffy_trainer.rollout.base import Completion, RolloutError, RolloutUnreachable, SamplingParams
from luffy_trainer.rollout.common import (
    check_request,
    check_version,
    finish_reason,
    nonempty,
    prompt_seed,
    repeat_greedy,
    samples_per_request,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

CONTROL_TIMEOUT_S = 30.0  # health probes, sync-state queries, prefix-cache resets
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 10.0


class _Retryable(Exception):
    """A request failed in a way another replica (or a later try) may not: connection error, timeout, 5xx."""


@dataclass(frozen=True)
class ReplicaStats:
    """What one replica did for this client (for logs, metrics and tests)."""

    url: str
    ready: bool
    version: int | None  # weight version it reported last (None before the first probe)
    inflight: int  # generation requests to it not answered yet
    answered: int  # prompts it answered
    failed_requests: int  # requests to it that failed and were sent elsewhere
    weight_pushes: int  # weight updates it received from this client
    restarts: int  # times it came back as a new process


@dataclass(eq=False)
class _Replica:
    url: str
    sync_port: int
    instance: str | None = None
    version: int | None = None
    world_size: int = 1
    group: weight_sync.TrainerSyncGroup | None = None
    ready: bool = False
    inflight: int = 0
    failures: int = 0
    next_probe: float = 0.0
    last_error: str = "not probed yet"

    def mark_down(self, reason: str) -> None:
        self.ready = False
        self.failures += 1
        self.last_error = reason
        self.next_probe = time.monotonic() + min(BACKOFF_FIRST_S * 2 ** (self.failures - 1), BACKOFF_MAX_S)


class VLLMServerClient:
    """A `RolloutEngine` over `vllm serve` replicas started with luffy's weight-sync extension."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        sync_host: str = "127.0.0.1",
        sync_port: int = contract.WEIGHT_SYNC_PORT,
        sync_backend: str = "gloo",
        sync_timeout_s: float = 600.0,
        bucket_mb: int = 256,
        request_timeout_s: float = 1800.0,
        unhealthy_timeout_s: float = 300.0,
        max_inflight_requests: int = 64,
        request_attempts: int = 5,
        float_dtype: str | None = None,
        control_token: str | None = None,
    ) -> None:
        if not urls:
            raise RolloutError("VLLMServerClient needs at least one server URL")
        if sync_backend not in ("gloo", "nccl"):
            raise RolloutError(f"sync_backend must be 'gloo' or 'nccl', got {sync_backend!r}")
        self._replicas = [
            _Replica(url.rstrip("/"), contract.weight_sync_port(sync_port, i)) for i, url in enumerate(urls)
        ]
        self._sync_host, self._sync_backend, self._sync_timeout_s = sync_host, sync_backend, sync_timeout_s
        self._bucket_bytes = bucket_mb * 2**20
        self._request_timeout_s = request_timeout_s
        self._unhealthy_timeout_s = unhealthy_timeout_s
        self._max_inflight = max_inflight_requests
        self._max_attempts = request_attempts
        self._counts = {r.url: dict(answered=0, failed_requests=0, weight_pushes=0, restarts=0) for r in self._replicas}
        self._float_dtype = None if float_dtype in (None, "auto") else weight_sync.torch_dtype(float_dtype)
        self._version = 0
        self._kept: list[tuple[weight_sync.Bucket, torch.Tensor]] | None = None  # last update, in host memory
        self._headers = control.authorization(control_token) if control_token else {}
        self._local = threading.local()
        self._inflight_lock = threading.Lock()
        self._requests = ThreadPoolExecutor(max_inflight_requests, thread_name_prefix="luffy-rollout")
        self._control = ThreadPoolExecutor(len(self._replicas), thread_name_prefix="luffy-control")
        self._closed = False

    # -- RolloutEngine ------------------------------------------------------------------------------------------

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
        self._refresh([r for r in self._replicas if r.inflight == 0])
        results: list[list[Completion] | None] = [None] * len(prompts)
        attempts = [0] * len(prompts)
        pending = deque(range(len(prompts)))
        inflight: dict[Future, tuple[int, _Replica]] = {}
        try:
            while pending or inflight:
                while pending and len(inflight) < self._max_inflight:
                    replica = self._choose_replica(wait=not inflight)
                    if replica is None:
                        break
                    i = pending.popleft()
                    attempts[i] += 1
                    inflight[self._submit(replica, prompts[i], n, params, prompt_seed(seed, i))] = (i, replica)
                done, _ = wait(inflight, timeout=BACKOFF_MAX_S, return_when=FIRST_COMPLETED)
                for future in done:
                    i, replica = inflight.pop(future)
                    self._release(replica)
                    try:
                        results[i] = future.result()
                        self._counts[replica.url]["answered"] += 1
                    except _Retryable as exc:
                        self._counts[replica.url]["failed_requests"] += 1
                        replica.mark_down(str(exc))
                        log.warning("prompt %d: %s; retrying on another replica", i, exc)
                        if attempts[i] >= self._max_attempts:
                            raise RolloutError(f"prompt {i} failed {attempts[i]} times, last: {exc}") from None
                        pending.appendleft(i)
        finally:  # a failed batch leaves requests running: free their replicas' slots when they end
            for future, (_, replica) in inflight.items():
                future.add_done_callback(lambda _, r=replica: self._release(r))
        return results  # type: ignore[return-value]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Stream the weights to every healthy replica at once; keep their bytes to re-send to a replica that restarts.

        The input is always read to the end, even when replicas fail, since under FSDP every rank gathers in step.
        """
        check_version(version)
        tensors = nonempty(named_tensors, "update_weights: the weights")
        self._version, self._kept = version, None
        for replica in self._replicas:
            replica.ready = False
        receiving = self._start_receiving([r for r in self._replicas if r.inflight == 0 and self._probe(r)])
        device = weight_sync.transfer_device(self._sync_backend)
        kept = []
        for bucket, buffer in weight_sync.stream_buckets(tensors, self._bucket_bytes, device, self._float_dtype):
            self._send(receiving, bucket, buffer)
            kept.append((bucket, buffer.cpu()))
        self._kept = kept
        self._finish(receiving)
        self._choose_replica(wait=True)

    def health(self) -> bool:
        """Whether at least one replica answers its health check now."""
        return any(self._healthy(r) for r in self._replicas)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for replica in self._replicas:
            if replica.group is not None:
                with contextlib.suppress(_Retryable, RolloutError):  # a replica that is down has no group left
                    self._rpc(replica, "luffy_leave", timeout=5.0)
                replica.group.close()
                replica.group = None
        self._requests.shutdown(wait=False, cancel_futures=True)
        self._control.shutdown(wait=False, cancel_futures=True)

    # -- inspection ---------------------------------------------------------------------------------------------

    def replica_stats(self) -> list[ReplicaStats]:
        return [
            ReplicaStats(url=r.url, ready=r.ready, version=r.version, inflight=r.inflight, **self._counts[r.url])
            for r in self._replicas
        ]

    def _submit(
        self, replica: _Replica, prompt: Sequence[int], n: int, params: SamplingParams, seed: int | None
    ) -> Future:
        """Start one generation request, counted in flight on its replica until `_release`."""
        with self._inflight_lock:
            replica.inflight += 1
        return self._requests.submit(self._complete, replica, prompt, n, params, seed, replica.version)

    def _release(self, replica: _Replica) -> None:
        with self._inflight_lock:
            replica.inflight -= 1

    # -- replicas: health, readiness, weight push ---------------------------------------------------------------

    def _choose_replica(self, wait: bool) -> _Replica | None:
        """The ready replica with fewest requests in flight; with `wait`, block until one is ready or time runs out."""
        deadline = time.monotonic() + self._unhealthy_timeout_s
        while True:
            now = time.monotonic()
            self._refresh([r for r in self._replicas if not r.ready and r.inflight == 0 and r.next_probe <= now])
            ready = [r for r in self._replicas if r.ready]
            if ready:
                return min(ready, key=lambda r: r.inflight)
            if not wait:
                return None
            if now >= deadline:
                errors = "; ".join(f"{r.url}: {r.last_error}" for r in self._replicas)
                never_answered = all(r.instance is None for r in self._replicas)
                raise (RolloutUnreachable if never_answered else RolloutError)(
                    f"no rollout server became ready within {self._unhealthy_timeout_s:g} s ({errors})"
                )
            next_probe = min(r.next_probe for r in self._replicas)
            time.sleep(max(0.05, min(next_probe - now, deadline - now)))

    def _refresh(self, replicas: list[_Replica]) -> None:
        """Probe idle replicas; bring the healthy ones that are behind to the current weights; mark who is ready."""
        healthy = [r for r in replicas if self._probe(r)]
        behind = [r for r in healthy if not self._is_current(r)]
        if behind:
            receiving = self._start_receiving(behind)
            for bucket, buffer in self._kept or []:
                self._send(receiving, bucket, buffer)
            self._finish(receiving)
        for replica in healthy:
            if self._is_current(replica):
                replica.ready, replica.failures = True, 0

    def _is_current(self, replica: _Replica) -> bool:
        if self._kept is None:  # no update yet: current = the weights every server loads from its model directory
            if replica.version != 0:
                raise RolloutError(
                    f"rollout server {replica.url} does not hold its model directory's weights (it reports version "
                    f"{replica.version}, pushed by an earlier client); call update_weights before generate"
                )
            return True
        return replica.group is not None and replica.group.joined and replica.version == self._version

    def _probe(self, replica: _Replica) -> bool:
        """Health check plus the workers' sync state; forgets the group of a replica that restarted."""
        try:
            if not self._healthy(replica):
                raise _Retryable("health check failed")
            states = self._rpc(replica, "luffy_sync_state")
        except _Retryable as exc:
            replica.mark_down(str(exc))
            return False
        instance = ",".join(sorted(s["instance"] for s in states))
        if instance != replica.instance:
            if replica.instance is not None:
                log.warning("rollout server %s restarted; it will get the current weights before serving", replica.url)
                self._counts[replica.url]["restarts"] += 1
            if replica.group is not None:
                replica.group.leave()
            replica.instance, replica.world_size = instance, len(states)
        versions = {s["version"] for s in states}
        replica.version = versions.pop() if len(versions) == 1 else weight_sync.UNKNOWN_VERSION
        return True

    def _start_receiving(self, replicas: list[_Replica]) -> dict[_Replica, Future]:
        """Join each replica's group where needed and start its workers' receive loop; returns those that started."""
        receiving: dict[_Replica, Future] = {}
        for replica in replicas:
            if replica.group is None:
                try:
                    replica.group = weight_sync.TrainerSyncGroup(
                        self._sync_host, replica.sync_port, self._sync_backend, self._sync_timeout_s
                    )
                except OSError as exc:
                    raise RolloutError(f"{exc} (set rollout.weight_sync_host / rollout.weight_sync_port)") from None
            try:
                if not replica.group.joined:
                    replica.group.join(
                        1 + replica.world_size,
                        lambda spec, r=replica: self._rpc(r, "luffy_join", spec, timeout=self._sync_timeout_s),
                    )
            except (_Retryable, RolloutError, RuntimeError, OSError) as exc:
                self._drop(replica, f"weight-sync join failed: {exc}")
                continue
            receiving[replica] = self._control.submit(
                self._rpc, replica, "luffy_receive_weights", str(self._version), timeout=self._sync_timeout_s
            )
        return receiving

    def _send(self, receiving: dict[_Replica, Future], bucket: weight_sync.Bucket, buffer: torch.Tensor) -> None:
        """Broadcast one bucket to each receiving replica in turn; a replica that fails is dropped from the update."""
        for replica, future in list(receiving.items()):
            try:
                if future.done():  # its receive loop can only have ended early by failing
                    future.result()
                    raise RuntimeError("its workers stopped receiving")
                replica.group.send_bucket(bucket, buffer)
            except Exception as exc:
                self._drop(replica, f"weight broadcast failed: {exc}")
                del receiving[replica]

    def _finish(self, receiving: dict[_Replica, Future]) -> None:
        """End the update on each replica, wait for its workers to load it, reset its prefix cache."""
        for replica, future in list(receiving.items()):
            try:
                if future.done():
                    future.result()
                replica.group.send_end()
            except Exception as exc:
                self._drop(replica, f"weight update failed: {exc}")
                del receiving[replica]
        for replica, future in receiving.items():
            try:
                states = future.result()
                if any(s["version"] != self._version for s in states):
                    raise RuntimeError(f"workers report {states}")
                self._reset_prefix_cache(replica)
            except Exception as exc:
                self._drop(replica, f"weight update failed: {exc}")
                continue
            replica.version = self._version
            self._counts[replica.url]["weight_pushes"] += 1

    def _drop(self, replica: _Replica, reason: str) -> None:
        """After a failed transfer the group's state is unknown: leave it; the next probe re-joins and re-sends."""
        if replica.group is not None:
            replica.group.leave()
        replica.version = weight_sync.UNKNOWN_VERSION
        replica.mark_down(reason)

    def _reset_prefix_cache(self, replica: _Replica) -> None:
        body = self._post(replica, "/reset_prefix_cache", None, CONTROL_TIMEOUT_S)
        if not body.get("success"):
            raise RuntimeError("the server refused to reset its prefix cache (requests still running?)")

    # -- HTTP -----------------------------------------------------------------------------------------------------

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.headers.update(self._headers)
        return session

    def _healthy(self, replica: _Replica) -> bool:
        try:
            return self._session().get(f"{replica.url}/health", timeout=CONTROL_TIMEOUT_S).status_code == 200
        except requests.RequestException:
            return False

    def _post(self, replica: _Replica, path: str, body: dict[str, Any] | None, timeout: float) -> Any:
        """POST and decode JSON; connection errors, timeouts and 5xx raise _Retryable, other errors RolloutError."""
        try:
            response = self._session().post(f"{replica.url}{path}", json=body, timeout=(CONTROL_TIMEOUT_S, timeout))
        except requests.RequestException as exc:
            raise _Retryable(f"{replica.url}{path}: {type(exc).__name__}: {exc}") from None
        if response.status_code >= 500:
            raise _Retryable(f"{replica.url}{path}: HTTP {response.status_code}: {response.text[:500]}")
        if response.status_code == 401:
            raise RolloutError(
                f"{replica.url}{path} answered HTTP 401: the server wants its run's control token "
                "(set rollout.control_token_file to the file that holds it)"
            )
        if response.status_code != 200:
            raise RolloutError(f"{replica.url}{path} answered HTTP {response.status_code}: {response.text[:1000]}")
        return response.json() if response.content else {}

    def _rpc(self, replica: _Replica, method: str, *args: str, timeout: float = CONTROL_TIMEOUT_S) -> list[Any]:
        """Call a worker-extension method on every worker of a replica; one result per worker."""
        hint = (
            "is the server started with `luffy serve-rollout` "
            f"(--worker-extension-cls {weight_sync.EXTENSION_CLS}, VLLM_SERVER_DEV_MODE=1)?"
        )
        body = {"method": method, "args": list(args), "timeout": timeout}
        try:
            answer = self._post(replica, "/collective_rpc", body, timeout + CONTROL_TIMEOUT_S)
        except RolloutError as exc:  # e.g. 404: the dev-mode routes are off
            raise RolloutError(f"{exc}; {hint}") from None
        results = answer.get("results") if isinstance(answer, dict) else None
        if method != "luffy_leave" and not results:
            raise RolloutError(f"{replica.url}/collective_rpc {method} returned {answer!r}; {hint}")
        return results or []

    def _complete(
        self,
        replica: _Replica,
        prompt: Sequence[int],
        n: int,
        params: SamplingParams,
        seed: int | None,
        version: int | None,
    ) -> list[Completion]:
        body: dict[str, Any] = {
            "prompt": list(prompt),
            "n": samples_per_request(params, n),
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,
            "logprobs": 0,
            "return_token_ids": True,
        }
        if seed is not None:
            body["seed"] = seed
        response = self._post(replica, "/v1/completions", body, self._request_timeout_s)
        try:
            choices = sorted(response["choices"], key=lambda c: c["index"])
        except (KeyError, TypeError) as exc:
            raise RolloutError(f"{replica.url}/v1/completions returned no choices: {exc!r}") from None
        completions = []
        for choice in choices:
            token_ids, logprobs = choice.get("token_ids"), (choice.get("logprobs") or {}).get("token_logprobs")
            if token_ids is None or logprobs is None or len(token_ids) != len(logprobs):
                raise RolloutError(f"{replica.url} returned a choice without matching token ids and log-probs")
            completions.append(
                Completion(
                    token_ids=list(token_ids),
                    logprobs=[float(x) for x in logprobs],
                    finish_reason=finish_reason(choice.get("finish_reason")),
                    weight_version=version if version is not None else self._version,
                )
            )
        return repeat_greedy(completions, params, n)
