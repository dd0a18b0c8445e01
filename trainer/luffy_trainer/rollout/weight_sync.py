"""Weight sync from the trainer to vLLM workers: one protocol for the in-process engine and for `vllm serve` replicas.

The trainer streams its named tensors (Hugging Face names) into self-describing byte buckets (`stream_buckets`); every
vLLM worker unpacks them and loads them with vLLM's `reload_weights`, which re-runs the post-load processing (on CPU,
editing parameters in place has no effect because the linear layers were repacked into kernel handles). The caller
then resets the engine's prefix cache, whose blocks still hold keys and values computed with the old weights.

Only the transport of a bucket differs between the two engines:
- in-process (`VLLMEngine`): the bucket iterator itself is handed to the worker through `LLM.collective_rpc`;
- servers (`VLLMServerClient`): the trainer broadcasts each bucket over a torch.distributed process group made for
  one replica (rank 0 = the trainer, ranks 1.. = the replica's workers), gloo on CPU and NCCL on GPU, built directly
  over a TCPStore the trainer serves, so it never touches the trainer's own default process group. The workers are
  driven through the dev-mode `/collective_rpc` endpoint, which carries only JSON.

This module is imported inside vLLM worker processes (`WeightSyncExtension`), so it imports only torch.
"""

from __future__ import annotations

import json
import socket
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import torch
from torch._C._distributed_c10d import PrefixStore, ProcessGroup, ProcessGroupGloo, Store, TCPStore

EXTENSION_CLS = "luffy_trainer.rollout.weight_sync.WeightSyncExtension"
ALIGN_BYTES = 64  # every tensor starts at a multiple of this, so a byte slice can be viewed as any dtype
UNKNOWN_VERSION = -1  # a worker whose load failed half-way holds weights of no known version


@dataclass(frozen=True)
class TensorSlot:
    """Where one named tensor sits inside a bucket."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Bucket:
    """The layout of one contiguous byte buffer holding several tensors; the unit of transfer."""

    nbytes: int
    slots: tuple[TensorSlot, ...]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Bucket:
        try:
            data = json.loads(text)
            bucket = cls(
                nbytes=int(data["nbytes"]),
                slots=tuple(
                    TensorSlot(s["name"], s["dtype"], tuple(int(d) for d in s["shape"]), s["offset"], s["nbytes"])
                    for s in data["slots"]
                ),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed weight bucket header: {exc!r}") from None
        for slot in bucket.slots:
            torch_dtype(slot.dtype)
            if slot.offset + slot.nbytes > bucket.nbytes:
                raise ValueError(f"weight {slot.name!r} lies outside its bucket")
        return bucket


def torch_dtype(name: str) -> torch.dtype:
    """`"bfloat16"` -> torch.bfloat16, refusing names that are not dtypes."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown tensor dtype {name!r}")
    return dtype


def _aligned(n: int) -> int:
    return -(-n // ALIGN_BYTES) * ALIGN_BYTES


def _pack(named_tensors: list[tuple[str, torch.Tensor]], device: torch.device | str) -> tuple[Bucket, torch.Tensor]:
    slots, used = [], 0
    for name, tensor in named_tensors:
        offset = _aligned(used)
        nbytes = tensor.numel() * tensor.element_size()
        slots.append(TensorSlot(name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), offset, nbytes))
        used = offset + nbytes
    buffer = torch.empty(used, dtype=torch.uint8, device=device)
    for slot, (_, tensor) in zip(slots, named_tensors, strict=True):  # copied in its own dtype: a vectorised copy
        buffer[slot.offset : slot.offset + slot.nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor)
    return Bucket(used, tuple(slots)), buffer


def stream_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    bucket_bytes: int,
    device: torch.device | str,
    float_dtype: torch.dtype | None = None,
) -> Iterator[tuple[Bucket, torch.Tensor]]:
    """Pack tensors, in the given order, into uint8 buffers of at most `bucket_bytes` (a larger tensor gets its own).

    Lazy: the input is read only as far as the bucket being filled, so a generator that all-gathers one sharded
    parameter at a time keeps at most one bucket of them alive. Order is kept because vLLM processes a layer as soon
    as all its weights have arrived. `float_dtype` casts floating-point tensors (e.g. float32 master weights to the
    bfloat16 the engines serve), halving the bytes sent.
    """
    if bucket_bytes < 1:
        raise ValueError("bucket_bytes must be positive")
    pending: list[tuple[str, torch.Tensor]] = []
    used = 0
    for name, tensor in named_tensors:
        tensor = tensor.detach()
        if float_dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(float_dtype)
        nbytes = tensor.numel() * tensor.element_size()
        if pending and _aligned(used) + nbytes > bucket_bytes:
            yield _pack(pending, device)
            pending, used = [], 0
        pending.append((name, tensor))
        used = _aligned(used) + nbytes
    if pending:
        yield _pack(pending, device)


def unpack_bucket(bucket: Bucket, buffer: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Views of a received bucket as its named tensors (no copy)."""
    if buffer.numel() != bucket.nbytes:
        raise ValueError(f"bucket buffer has {buffer.numel()} bytes, expected {bucket.nbytes}")
    return [
        (s.name, buffer[s.offset : s.offset + s.nbytes].view(torch_dtype(s.dtype)).view(s.shape)) for s in bucket.slots
    ]


def broadcast_bucket(group: ProcessGroup, bucket: Bucket, buffer: torch.Tensor) -> None:
    """Send one bucket from rank 0: a header (header length, data length), the JSON layout, then the bytes."""
    layout = torch.frombuffer(bytearray(bucket.to_json().encode()), dtype=torch.uint8).to(buffer.device)
    header = torch.tensor([layout.numel(), buffer.numel()], dtype=torch.int64, device=buffer.device)
    for tensor in (header, layout, buffer):
        group.broadcast([tensor]).wait()


def broadcast_end(group: ProcessGroup, device: torch.device) -> None:
    """Tell the receivers that the update is complete (an all-zero header)."""
    group.broadcast([torch.zeros(2, dtype=torch.int64, device=device)]).wait()


def receive_buckets(group: ProcessGroup, device: torch.device) -> Iterator[tuple[Bucket, torch.Tensor]]:
    """The receiving side of `broadcast_bucket`, until `broadcast_end`."""
    while True:
        header = torch.empty(2, dtype=torch.int64, device=device)
        group.broadcast([header]).wait()
        layout_len, nbytes = header.tolist()
        if layout_len == 0:
            return
        layout = torch.empty(layout_len, dtype=torch.uint8, device=device)
        group.broadcast([layout]).wait()
        bucket = Bucket.from_json(layout.cpu().numpy().tobytes().decode())
        buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
        group.broadcast([buffer]).wait()
        yield bucket, buffer


def local_address_towards(host: str, port: int) -> str:
    """This machine's address on the route to `host` (what the peers of a gloo group must connect to)."""
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(sockaddr)  # UDP: no packet is sent, the kernel only picks the route
        return probe.getsockname()[0]


def new_process_group(
    backend: str, store: Store, rank: int, world_size: int, timeout_s: float, hostname: str
) -> ProcessGroup:
    """A process group of its own (not torch.distributed's default group); the backend name is the only switch."""
    timeout = timedelta(seconds=timeout_s)
    if backend == "gloo":
        options = ProcessGroupGloo._Options()
        options._timeout = timeout
        options._devices = [ProcessGroupGloo.create_device(hostname=hostname)]
        return ProcessGroupGloo(store, rank, world_size, options)
    if backend == "nccl":
        from torch.distributed import ProcessGroupNCCL

        options = ProcessGroupNCCL.Options()
        options._timeout = timeout
        return ProcessGroupNCCL(store, rank, world_size, options)
    raise ValueError(f"unknown weight-sync backend {backend!r} (expected 'gloo' or 'nccl')")


def transfer_device(backend: str) -> torch.device:
    """Where bucket buffers live for a backend: host memory for gloo, this process's current GPU for NCCL."""
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


@dataclass(frozen=True)
class JoinSpec:
    """What a worker needs to join the trainer's weight-sync group of its replica."""

    host: str
    port: int
    prefix: str  # store namespace of this join, so a re-join never reads keys of an earlier one
    world_size: int
    backend: str
    timeout_s: float
    token: int  # broadcast by the trainer right after the group forms; the worker returns it as proof

    def to_json(self) -> str:
        return json.dumps(asdict(self))


class TrainerSyncGroup:
    """The trainer's end of one replica's weight-sync group: the TCPStore it serves and the current process group."""

    def __init__(self, host: str, port: int, backend: str, timeout_s: float) -> None:
        self.host, self.port, self.backend, self.timeout_s = host, port, backend, timeout_s
        try:
            self._store = TCPStore(host, port, None, True, timedelta(seconds=timeout_s), wait_for_workers=False)
        except Exception as exc:
            raise OSError(f"cannot listen for weight sync on {host}:{port}: {exc}") from None
        self._joins = 0
        self._group: ProcessGroup | None = None
        self._device = transfer_device(backend)

    @property
    def joined(self) -> bool:
        return self._group is not None

    def join(self, world_size: int, remote_join: Callable[[str], list[Any]]) -> None:
        """Form a new group with a replica's workers; `remote_join(spec_json)` must make them call `luffy_join`.

        Both ends block until the group forms, so each runs in a thread; whichever fails first is reported at once
        (a group that cannot form only gives up after `timeout_s`).
        """
        self.leave()
        self._joins += 1
        spec = JoinSpec(self.host, self.port, f"luffy-sync/{self._joins}/", world_size, self.backend,
                        self.timeout_s, token=self._joins)  # fmt: skip

        def form() -> ProcessGroup:
            group = new_process_group(
                self.backend,
                PrefixStore(spec.prefix, self._store),
                0,
                world_size,
                self.timeout_s,
                local_address_towards(self.host, self.port),
            )
            group.broadcast([torch.tensor([spec.token], dtype=torch.int64, device=self._device)]).wait()
            return group

        pool = ThreadPoolExecutor(2, thread_name_prefix="luffy-join")
        try:
            local, remote = pool.submit(form), pool.submit(remote_join, spec.to_json())
            wait([local, remote], timeout=self.timeout_s + 30, return_when=FIRST_EXCEPTION)
            for side, future in (("worker", remote), ("trainer", local)):
                if not future.done():
                    raise RuntimeError(f"weight-sync group on port {self.port}: the {side} side did not finish")
                if future.exception() is not None:
                    raise RuntimeError(f"weight-sync group on port {self.port}: {future.exception()}")
        finally:
            pool.shutdown(wait=False)
        tokens = [r.get("token") for r in remote.result()]
        if tokens != [spec.token] * (world_size - 1):
            raise RuntimeError(f"workers confirmed tokens {tokens}, expected {spec.token}")
        self._group = local.result()

    def send_bucket(self, bucket: Bucket, buffer: torch.Tensor) -> None:
        broadcast_bucket(self._joined_group(), bucket, buffer.to(self._device))

    def send_end(self) -> None:
        broadcast_end(self._joined_group(), self._device)

    def _joined_group(self) -> ProcessGroup:
        if self._group is None:
            raise RuntimeError("weight-sync group is not joined")
        return self._group

    def leave(self) -> None:
        self._group = None

    def close(self) -> None:
        self.leave()
        self._store = None


class WeightSyncExtension:
    """Mixed into every vLLM worker (`worker_extension_cls`); its methods are called through `collective_rpc`.

    Each worker remembers the version of the weights it holds and a random id of its process, so a client can tell
    a replica that restarted (new id, version 0) from one that is up to date.
    """

    def luffy_sync_state(self) -> dict[str, Any]:
        """This worker's process id, weight version and device (JSON, for `/collective_rpc`)."""
        if getattr(self, "_luffy_instance", None) is None:
            self._luffy_instance = uuid.uuid4().hex
            self._luffy_version = 0
        return {
            "instance": self._luffy_instance,
            "version": self._luffy_version,
            "rank": self.rank,
            "device": str(self.device),
            "joined": getattr(self, "_luffy_group", None) is not None,
        }

    def luffy_join(self, spec_json: str) -> dict[str, Any]:
        """Join the trainer's weight-sync group of this replica, replacing any earlier group."""
        self.luffy_sync_state()
        spec = JoinSpec(**json.loads(spec_json))
        self._luffy_group = None
        timeout = timedelta(seconds=spec.timeout_s)
        store = TCPStore(spec.host, spec.port, None, False, timeout)
        group = new_process_group(
            spec.backend,
            PrefixStore(spec.prefix, store),
            1 + self.rank,
            spec.world_size,
            spec.timeout_s,
            local_address_towards(spec.host, spec.port),
        )
        device = self.device if spec.backend == "nccl" else torch.device("cpu")
        token = torch.zeros(1, dtype=torch.int64, device=device)
        group.broadcast([token]).wait()
        self._luffy_store, self._luffy_group, self._luffy_buffer_device = store, group, device
        return {"token": int(token.item())}

    def luffy_receive_weights(self, version: str) -> dict[str, Any]:
        """Receive an update from the trainer's broadcast and load it (server path); `version` is a JSON int."""
        group = getattr(self, "_luffy_group", None)
        if group is None:
            raise RuntimeError("luffy_receive_weights before luffy_join")
        try:
            return self._luffy_reload(int(version), receive_buckets(group, self._luffy_buffer_device))
        except Exception:
            self.luffy_leave()  # closes the connections, so the trainer's pending send fails at once
            raise

    def luffy_load_weights(self, version: int, buckets: Iterable[tuple[Bucket, torch.Tensor]]) -> dict[str, Any]:
        """Load an update whose buckets are handed over directly (in-process engine path)."""
        return self._luffy_reload(version, buckets)

    def luffy_leave(self) -> None:
        self._luffy_group = self._luffy_store = None

    def _luffy_reload(self, version: int, buckets: Iterable[tuple[Bucket, torch.Tensor]]) -> dict[str, Any]:
        self.luffy_sync_state()
        stream = iter(buckets)
        loaded = 0

        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal loaded
            for bucket, buffer in stream:
                loaded += len(bucket.slots)
                yield from unpack_bucket(bucket, buffer)

        self._luffy_version = UNKNOWN_VERSION
        self.reload_weights(weights_iterator=weights())
        deque(stream, maxlen=0)  # the sender waits for every bucket to be taken, even ones the model did not want
        if loaded == 0:
            raise RuntimeError("weight update contained no tensors")
        self._luffy_version = version
        return self.luffy_sync_state()
