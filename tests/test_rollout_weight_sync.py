"""The weight-sync transport without vLLM: bucket packing, and the gloo group between trainer and worker.

The worker side here is `WeightSyncExtension` on a minimal host object whose `reload_weights` keeps what it receives;
the real vLLM worker is exercised in test_rollout_vllm.py and test_rollout_server.py.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from luffy_trainer.rollout import weight_sync
from luffy_trainer.rollout.weight_sync import Bucket, TrainerSyncGroup, WeightSyncExtension
from rollout_reference import free_port_block


def mixed_tensors() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        ("a.weight", torch.randn(3, 5, generator=g)),
        ("a.bias", torch.randn(7, generator=g).to(torch.bfloat16)),
        ("big", torch.randn(64, 64, generator=g)),  # 16 KiB: larger than the bucket below, so alone in its own
        ("steps", torch.arange(5, dtype=torch.int64)),
        ("scalar", torch.tensor(2.5)),
        ("half", torch.randn(2, 3, generator=g).to(torch.float16)),
        ("transposed", torch.randn(4, 6, generator=g).t()),  # not contiguous
    ]


def unpacked(buckets) -> dict[str, torch.Tensor]:
    return {name: t.clone() for bucket, buffer in buckets for name, t in weight_sync.unpack_bucket(bucket, buffer)}


def test_stream_buckets_round_trip_keeps_names_dtypes_shapes_and_values():
    tensors = mixed_tensors()
    buckets = list(weight_sync.stream_buckets(tensors, bucket_bytes=1024, device="cpu"))
    assert [s.name for b, _ in buckets for s in b.slots] == [n for n, _ in tensors]
    assert any(b.nbytes > 1024 and len(b.slots) == 1 for b, _ in buckets)  # the big tensor
    assert all(b.nbytes <= 1024 for b, _ in buckets if len(b.slots) > 1)
    assert all(s.offset % weight_sync.ALIGN_BYTES == 0 for b, _ in buckets for s in b.slots)
    out = unpacked(buckets)
    for name, t in tensors:
        assert out[name].dtype == t.dtype and out[name].shape == t.shape
        assert torch.equal(out[name], t)


def test_stream_buckets_reads_its_input_lazily_and_casts_floats():
    consumed = []

    def gen():
        for name, t in mixed_tensors():
            consumed.append(name)
            yield name, t

    stream = weight_sync.stream_buckets(gen(), bucket_bytes=1024, device="cpu", float_dtype=torch.bfloat16)
    bucket, _ = next(stream)
    assert len(consumed) == len(bucket.slots) + 1  # the tensor that did not fit is held back for the next bucket
    out = unpacked([(bucket, _), *stream])
    assert out["a.weight"].dtype == torch.bfloat16 and out["steps"].dtype == torch.int64
    assert torch.equal(out["a.weight"], dict(mixed_tensors())["a.weight"].to(torch.bfloat16))


def test_bucket_layout_json_round_trip_and_rejects_bad_input():
    bucket, _ = next(weight_sync.stream_buckets(mixed_tensors()[:2], 1 << 20, "cpu"))
    assert Bucket.from_json(bucket.to_json()) == bucket
    with pytest.raises(ValueError, match="unknown tensor dtype 'floaty'"):
        Bucket.from_json(bucket.to_json().replace('"float32"', '"floaty"'))
    with pytest.raises(ValueError, match="outside its bucket"):
        Bucket.from_json(bucket.to_json().replace(f'"nbytes": {bucket.nbytes}', '"nbytes": 8', 1))
    with pytest.raises(ValueError, match="malformed"):
        Bucket.from_json('{"slots": []}')


class HostWorker(WeightSyncExtension):
    """Stands in for vLLM's Worker: the attributes the extension uses, and a reload that records the weights."""

    def __init__(self) -> None:
        self.rank, self.device, self.loaded = 0, torch.device("cpu"), {}

    def reload_weights(self, weights_iterator) -> None:
        self.loaded = {name: t.clone() for name, t in weights_iterator}


def run_in_thread(fn, *args):
    result: dict = {}

    def target():
        try:
            result["value"] = fn(*args)
        except Exception as exc:
            result["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, result


def test_gloo_group_carries_updates_and_survives_a_worker_restart():
    port = free_port_block(1)
    group = TrainerSyncGroup("127.0.0.1", port, "gloo", timeout_s=20)
    worker = HostWorker()
    group.join(2, lambda spec: [worker.luffy_join(spec)])
    assert group.joined and worker.luffy_sync_state()["joined"]

    for version, scale in ((1, 1.0), (2, -3.0)):
        tensors = [(n, t * scale if t.is_floating_point() else t) for n, t in mixed_tensors()]
        thread, result = run_in_thread(worker.luffy_receive_weights, str(version))
        for bucket, buffer in weight_sync.stream_buckets(tensors, 1024, "cpu"):
            group.send_bucket(bucket, buffer)
        group.send_end()
        thread.join(20)
        assert "error" not in result, result
        assert result["value"]["version"] == version
        for name, t in tensors:
            assert torch.equal(worker.loaded[name], t)

    # A restarted worker is a new process: new id, version 0, no group; the trainer re-joins on the same store.
    restarted = HostWorker()
    assert restarted.luffy_sync_state()["instance"] != worker.luffy_sync_state()["instance"]
    assert restarted.luffy_sync_state()["version"] == 0
    worker.luffy_leave()
    group.join(2, lambda spec: [restarted.luffy_join(spec)])
    thread, result = run_in_thread(restarted.luffy_receive_weights, "7")
    for bucket, buffer in weight_sync.stream_buckets(mixed_tensors(), 1024, "cpu"):
        group.send_bucket(bucket, buffer)
    group.send_end()
    thread.join(20)
    assert result["value"]["version"] == 7 and set(restarted.loaded) == {n for n, _ in mixed_tensors()}
    group.close()


def test_sending_to_a_worker_that_left_fails_fast_instead_of_hanging():
    group = TrainerSyncGroup("127.0.0.1", free_port_block(1), "gloo", timeout_s=60)
    worker = HostWorker()
    group.join(2, lambda spec: [worker.luffy_join(spec)])
    worker.luffy_leave()  # as when its process dies: its end of the group is destroyed
    bucket, buffer = next(weight_sync.stream_buckets(mixed_tensors(), 1 << 20, "cpu"))
    with pytest.raises(RuntimeError):
        group.send_bucket(bucket, buffer)
    group.close()


def test_join_reports_the_worker_error_without_waiting_for_the_timeout():
    group = TrainerSyncGroup("127.0.0.1", free_port_block(1), "gloo", timeout_s=20)

    def failing_remote(spec: str):
        raise ConnectionError("replica refused")

    start = time.monotonic()
    with pytest.raises(RuntimeError, match="replica refused"):
        group.join(2, failing_remote)
    assert time.monotonic() - start < 10  # not the 20 s the trainer's side would wait for the worker
    assert not group.joined
    group.close()


def test_receiving_before_joining_is_an_error():
    with pytest.raises(RuntimeError, match="before luffy_join"):
        HostWorker().luffy_receive_weights("1")


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown weight-sync backend 'mpi'"):
        weight_sync.new_process_group("mpi", None, 0, 1, 1.0, "127.0.0.1")
