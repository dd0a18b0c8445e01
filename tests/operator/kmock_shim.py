"""kmock 0.8 made usable by kopf and kubectl (shim from the project's testing notes, Appendix B), plus a
minimal owner-reference garbage collector and a threaded server for tests and benchmarks.

The shim stamps resourceVersion/uid/creationTimestamp/generation, serves /api/v1/namespaces, answers failed
JSON-patch tests with 422, gives lists a kind, fixes core discovery, sets Content-Type on watches, and replays a
watch consistently from ?resourceVersion. It uses kmock internals: pin kmock==0.8.

Not emulated (tests must not rely on them): controllers (pods never run; tests patch Job/StatefulSet status),
schema validation and defaulting, label selectors, PUT, spec/status separation.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import threading
import uuid
from collections.abc import Callable
from typing import Any

import jsonpatch
import kmock
from kmock._internal import dsl, k8s_dicts, parsing, rendering

_resource_versions = itertools.count(1)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# resourceVersion (+ generation on a spec change) bumped on every stored change.
_original_patch, _original_create = k8s_dicts.Object.patch, k8s_dicts.Object.create


def _stamp(obj: Any, old_spec: Any = None) -> None:
    if obj.deleted:
        return
    raw = obj.last.raw
    md = dict(raw.get("metadata") or {})
    md["resourceVersion"] = str(next(_resource_versions))
    if old_spec is not None and raw.get("spec") != old_spec:
        md["generation"] = int(md.get("generation", 1)) + 1
    obj.last["metadata"] = md


def _patch(self: Any, change: Any = None, /, **kwargs: Any) -> None:
    old = None if self.deleted else self.last.raw.get("spec")
    _original_patch(self, change, **kwargs)
    _stamp(self, old)


def _create(self: Any, change: Any = None, /, **kwargs: Any) -> None:
    _original_create(self, change, **kwargs)
    _stamp(self)


k8s_dicts.Object.patch, k8s_dicts.Object.create = _patch, _create

# /api/v1/namespaces[/name[/status|finalize]] is the namespaces resource (kmock 0.8 crashes on it).
_original_parse_path = parsing.parse_path


def _parse_path(path: str) -> Any:
    p = path.strip("/").split("/")
    if p[:3] == ["api", "v1", "namespaces"] and len(p) <= 4:
        return parsing.ParsedPath("", "v1", "namespaces", None, p[3] if len(p) == 4 else None, None)
    if p[:3] == ["api", "v1", "namespaces"] and len(p) == 5 and p[4] in ("status", "finalize"):
        return parsing.ParsedPath("", "v1", "namespaces", None, p[3], p[4])
    return _original_parse_path(path)


parsing.parse_path = _parse_path

# Watch streams need Content-Type: application/json for kubectl.
_original_apply_metadata = rendering.Response._Response__apply_metadata


def _apply_metadata(self: Any, resp: Any) -> None:
    _original_apply_metadata(self, resp)
    resp.headers.setdefault("Content-Type", "application/json")


rendering.Response._Response__apply_metadata = _apply_metadata

# kmock decides which reaction serves a request by asking `request in view` for each reaction, and a view answers
# by replaying every request ever served through its filters: each request costs O(all requests so far), so a
# long test slows to a crawl. Membership of a filter is its criteria on this one request plus membership of its
# source; the newest request is the one at the end of the root's list.
_original_contains = dsl.View.__contains__


def _chained_contains(self: Any, item: Any) -> bool:
    if not isinstance(item, rendering.Request):
        return _original_contains(self, item)
    if isinstance(self, dsl.Filter) and not self.criteria(item):
        return False
    return item in self._source


def _root_contains(self: Any, item: Any) -> bool:
    if not isinstance(item, rendering.Request):
        return _original_contains(self, item)
    return any(r is item for r in reversed(self._requests))


dsl.Filter.__contains__ = _chained_contains
dsl.Priority.__contains__ = _chained_contains
kmock.RawHandler.__contains__ = _root_contains


class Emulator(kmock.KubernetesEmulator):
    """The kmock emulator with the shim's fixes and owner-reference garbage collection."""

    async def _handle(self, request: Any) -> Any:
        if request.resource is not None and request.action == kmock.action.CREATE and isinstance(request.data, dict):
            md = request.data.setdefault("metadata", {})
            if not md.get("name") and md.get("generateName"):
                md["name"] = md["generateName"] + uuid.uuid4().hex[:5]
            if request.namespace and not md.get("namespace"):
                md["namespace"] = request.namespace
            md.setdefault("uid", str(uuid.uuid4()))
            md.setdefault("creationTimestamp", _now())
            md["generation"] = 1
            md["resourceVersion"] = str(next(_resource_versions))
            if request.resource.plural == "customresourcedefinitions":
                self._register_crd(request.data)
        response = await super()._handle(request)
        if request.resource is not None and request.action in (kmock.action.DELETE, kmock.action.UPDATE):
            key = (request.resource, request.namespace, request.name)
            if key in self._objects and self._objects[key].deleted:  # an owner may just have gone
                await self._collect_garbage()
        return response

    async def _collect_garbage(self) -> None:
        """Delete objects whose owners are all gone (what the garbage collector does, without its delays)."""
        while True:
            async with self._lock:
                live = {o.raw["metadata"].get("uid") for o in self._objects.values() if not o.deleted}
                orphans = [
                    (res, obj)
                    for (res, _ns, _name), obj in self._objects.items()
                    if not obj.deleted
                    and (refs := obj.raw["metadata"].get("ownerReferences"))
                    and not any(r.get("uid") in live for r in refs)
                ]
                for res, obj in orphans:
                    raw = obj.raw
                    obj.delete()
                    await self._buses[res].put({"type": "DELETED", "object": raw})
            if not orphans:
                return

    def _register_crd(self, crd: dict[str, Any]) -> None:
        """A created CRD becomes discoverable."""
        s = crd.get("spec", {})
        n = s.get("names", {})
        for v in s.get("versions", []):
            if v.get("served", True):
                self.resources[f"{s['group']}/{v['name']}/{n['plural']}"] = kmock.ResourceInfo(
                    kind=n.get("kind"),
                    singular=n.get("singular") or n["kind"].lower(),
                    namespaced=s.get("scope", "Namespaced") == "Namespaced",
                    verbs={"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"},
                    shortnames=set(n.get("shortNames", [])),
                    categories=set(n.get("categories", [])),
                    subresources=set((v.get("subresources") or {}).keys()),
                )

    async def _render_error(self, exc: Exception) -> Any:
        """kopf expects 422 for a failed JSON-patch 'test'."""
        if isinstance(exc, jsonpatch.JsonPatchTestFailed | jsonpatch.JsonPatchConflict):
            exc = kmock.KubernetesError(status=422, reason="Invalid", message=str(exc))
        return await super()._render_error(exc)

    async def _serve_server_version(self, request: Any) -> Any:
        """The oldest Kubernetes the chart claims (the CRD's CEL needs fieldPath, 1.28, and quantity(), 1.29), not
        kmock's fixed 1.26, so Helm's kubeVersion check passes."""
        r = await super()._serve_server_version(request)
        return {**r, "minor": "29", "gitVersion": "v1.29.0+kmock"}

    async def _serve_version(self, request: Any) -> Any:
        """'v1' not '/v1'; no shortNames or categories on subresources (kubectl expands categories to them)."""
        r = await super()._serve_version(request)
        r["groupVersion"] = r["groupVersion"].lstrip("/")
        for e in r["resources"]:
            if "/" in e["name"]:
                e["shortNames"] = []
                e["categories"] = []
        return r

    async def _serve_list(self, request: Any) -> Any:
        """Lists carry kind/apiVersion and a numeric resourceVersion."""
        r = await super()._serve_list(request)
        info = self.resources.get(request.resource)
        gv = f"{request.resource.group}/{request.resource.version}".lstrip("/")
        r["metadata"]["resourceVersion"] = str(next(_resource_versions))
        return {"apiVersion": gv, "kind": ((info and info.kind) or "Object") + "List", **r}

    async def _serve_watch(self, request: Any) -> Any:
        """Subscribe before the snapshot; honour ?resourceVersion."""
        yield b""
        q = request.params.get("resourceVersion") or "0"
        since = int(q) if q.isdigit() else 0
        bus = self._buses[request.resource]
        async with self._lock:
            mark = await bus.mark()
            events = []
            for (res, ns, name), obj in self._objects.items():
                if res != request.resource or obj.deleted:
                    continue
                if request.namespace is not None and ns != request.namespace:
                    continue
                if request.name is not None and name != request.name:
                    continue
                if int(obj.raw.get("metadata", {}).get("resourceVersion", 0) or 0) > since:
                    first = next((v for v in obj.history if v is not None), None)
                    first_md = first.raw.get("metadata", {}) if first is not None else {}
                    first_rv = int(first_md.get("resourceVersion", 0) or 0)
                    events.append({"type": "ADDED" if not since or first_rv > since else "MODIFIED", "object": obj.raw})
        for e in events:
            yield e
        async for e in bus.stream(since=mark):
            md = e.get("object", {}).get("metadata", {})
            if request.namespace is not None and md.get("namespace") != request.namespace:
                continue
            if request.name is not None and md.get("name") != request.name:
                continue
            yield e


class EmulatorServer:
    """The shimmed emulator on 127.0.0.1:<free port>, served from a background thread with its own event loop.

    Tests talk to it over HTTP like any client; `call(fn)` runs `fn(emulator)` inside its loop for direct reads.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.emulator: Emulator | None = None
        self.url = ""
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="kmock", daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._started.set()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with Emulator() as emulator, kmock.Server(emulator) as server:
            emulator.resources.load_bundled()
            self.emulator = emulator
            self.url = str(server.url).rstrip("/")
            self._started.set()
            await self._stop.wait()

    def start(self) -> EmulatorServer:
        self._thread.start()
        if not self._started.wait(30) or self._error is not None:
            raise RuntimeError(f"kmock server did not start: {self._error}")
        return self

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def call(self, fn: Callable[[Emulator], Any], timeout: float = 30) -> Any:
        """Run fn(emulator) in the server's loop (kmock state is not thread-safe) and return its result."""

        async def run() -> Any:
            return fn(self.emulator)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def kubeconfig(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
            "users": [{"name": "kmock", "user": {"token": "kmock"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": "default"}}],
            "current-context": "kmock",
        }
