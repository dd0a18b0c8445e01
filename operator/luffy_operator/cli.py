"""`luffy operator`: run the LuffyRun operator (kopf) against the cluster of the kubeconfig or service account."""

from __future__ import annotations

import argparse

import kopf


def main(args: argparse.Namespace) -> int:
    from luffy_operator import handlers  # noqa: F401  (registers the handlers with kopf)

    kopf.configure(verbose=getattr(args, "verbose", False), log_prefix=True)
    kopf.run(
        standalone=args.standalone,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness or None,
    )
    return 0
