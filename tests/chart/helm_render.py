"""Lint and render the chart with Helm's own library (helm-sdkpy, Helm v4) in the Python 3.12 side venv.

helm-sdkpy has no `helm template`: each case is a real `helm install` with the in-memory release driver against a
fresh kmock emulator (tests/operator/kmock_shim.py), and the release's `manifest` is the rendered chart. HELM_DRIVER
must be `memory` in the environment this process starts with (the Go library reads it once, at load).

    HELM_DRIVER=memory .venv312/bin/python tests/chart/helm_render.py request.json result.json

request: {"chart": path, "lint": [chart paths], "namespace": ns, "cases": [{"release": name, "values": {...}}],
          "package_dir": where `helm package` writes the chart archive}
result:  {"lint": {path: Helm's lint result}, "cases": {release: {"manifest": text, "notes": text} | {"error": text}},
          "package": {"archive": path, "luffy": the archive installed as release `luffy` with default values}}
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))

import helm_sdkpy
from kmock_shim import EmulatorServer


async def lint(chart: str, kubeconfig: str) -> dict[str, Any]:
    return await helm_sdkpy.Lint(helm_sdkpy.Configuration(kubeconfig=kubeconfig)).run(chart)


async def package(chart: str, dest: str, kubeconfig: str) -> str:
    return await helm_sdkpy.Package(helm_sdkpy.Configuration(kubeconfig=kubeconfig)).run(chart, dest_dir=dest)


async def install(chart: str, namespace: str, release: str, values: dict[str, Any]) -> dict[str, str]:
    """One `helm install` into an empty emulator; the rendered manifest and NOTES.txt, or Helm's error text."""
    with EmulatorServer() as server:
        config = helm_sdkpy.Configuration(namespace=namespace, kubeconfig=yaml.safe_dump(server.kubeconfig()))
        try:
            result = await helm_sdkpy.Install(config).run(release, chart, values=values, wait=False, timeout=60)
        except helm_sdkpy.HelmError as err:
            return {"error": str(err)}
        return {"manifest": result["manifest"], "notes": result["info"]["notes"]}


async def main(request_path: str, result_path: str) -> None:
    if os.environ.get("HELM_DRIVER") != "memory":
        raise SystemExit("HELM_DRIVER=memory must be set before this process starts (Helm reads it at load)")
    request = json.loads(Path(request_path).read_text())
    chart, namespace = request["chart"], request["namespace"]
    with EmulatorServer() as server:
        kubeconfig = yaml.safe_dump(server.kubeconfig())
        lint_results = {path: await lint(path, kubeconfig) for path in request["lint"]}
        archive = await package(chart, request["package_dir"], kubeconfig)
    cases = {}
    for case in request["cases"]:
        cases[case["release"]] = await install(chart, namespace, case["release"], case["values"])
    packaged = {"archive": archive, "luffy": await install(archive, namespace, "luffy", {})}
    Path(result_path).write_text(json.dumps({"lint": lint_results, "cases": cases, "package": packaged}))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:3]))
