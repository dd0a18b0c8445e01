"""luffy's Kubernetes operator: the LuffyRun API, its child manifests, and the kopf handlers."""

__version__ = "0.1.0"
