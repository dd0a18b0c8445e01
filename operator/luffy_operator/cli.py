"""`luffy-operator`: run the LuffyRun operator (kopf), or print its CRD. Needs no torch (the operator image has none).

luffy-operator run [--standalone] [--namespace NS ...] [--liveness URL]   against the kubeconfig or service account
luffy-operator crd                                                        the CustomResourceDefinition as YAML
"""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="luffy-operator", description="The LuffyRun operator of luffy.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="Run the operator against a cluster.", description="Run the LuffyRun operator.")
    run.add_argument("--namespace", "-n", action="append", default=[], help="watch only these namespaces")
    run.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="liveness endpoint URL")
    run.add_argument("--standalone", action="store_true", help="no peering (tests, single replica)")
    sub.add_parser("crd", help="Print the LuffyRun CustomResourceDefinition (YAML).")
    return parser


def run(args: argparse.Namespace) -> int:
    import kopf

    from luffy_operator import handlers  # noqa: F401  (registers the handlers with kopf)

    kopf.configure(verbose=args.verbose, log_prefix=True)
    kopf.run(
        standalone=args.standalone,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness or None,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "crd":
        from luffy_operator.crd import render

        sys.stdout.write(render())
        return 0
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
