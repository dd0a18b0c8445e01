"""The documentation: a short README, one docs/ page per topic, links that resolve, and the one list of training
metrics (docs/tracking.md) equal to what a real tiny training logs.

The luffy-mode run is the session's `short_training_run` (shared with tests/test_train.py); the baseline modes are
compared in tests/test_train.py::test_baseline_modes_train, on the runs it already makes.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest
from docs_metrics import MODES, compare, documented_training_metrics
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
README_MAX_BYTES = 15 * 1024
PAGES = [
    "training",
    "algorithm",
    "rollouts",
    "tracking",
    "kubernetes",
    "security",
    "testing",
    "architecture",
    "evaluation",
]
# [text](target) and ![alt](target), without the optional "title".
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
METRIC_ROW = re.compile(r"^\| `(?:reward|loss|actor|time|throughput|batch|response_length)/", re.MULTILINE)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)


def test_readme_is_at_most_15_kib() -> None:
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes, over {README_MAX_BYTES}: move reference to docs/"


@pytest.mark.parametrize("page", PAGES)
def test_each_docs_page_exists_and_the_readme_links_it(page: str) -> None:
    path = REPO / "docs" / f"{page}.md"
    assert path.is_file(), f"docs/{page}.md is missing"
    assert path.read_text().startswith("# "), f"docs/{page}.md has no title"
    assert f"(docs/{page}.md" in README.read_text(), f"README.md does not link docs/{page}.md"


def _relative_links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text())  # code blocks hold commands, not links
    targets = [unquote(t) for t in LINK.findall(text)]
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation removed, spaces to hyphens."""
    text = FENCE.sub("", path.read_text())
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", text, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("doc", [README, *sorted((REPO / "docs").glob("*.md"))], ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_to_files_that_exist(doc: Path) -> None:
    broken = []
    for target in _relative_links(doc):
        file_part, _, anchor = target.partition("#")
        resolved = (doc.parent / file_part).resolve() if file_part else doc
        if not resolved.exists():
            broken.append(f"{target} (no {resolved.relative_to(REPO) if resolved.is_relative_to(REPO) else resolved})")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target} (no heading #{anchor} in {resolved.relative_to(REPO)})")
    assert not broken, f"{doc.relative_to(REPO)}: broken links: {broken}"


def test_the_metric_table_names_each_metric_once_with_known_modes() -> None:
    metrics = documented_training_metrics()  # asserts: no duplicate, no unknown mode, not empty
    assert {mode for modes in metrics.values() for mode in modes} == set(MODES)
    assert "val/<benchmark>/avg_at_<k>" in metrics and "val/best/mean_avg" in metrics


def test_the_metric_list_is_nowhere_else() -> None:
    """The names are listed once: no other page copies the table (a page may mention a metric, not list them)."""
    for path in [README, *(REPO / "docs").glob("*.md")]:
        if path.name == "tracking.md":
            continue
        listed = METRIC_ROW.findall(path.read_text())
        assert not listed, f"{path.relative_to(REPO)} lists metric names in a table; they belong in docs/tracking.md"


@pytest.mark.vllm
def test_documented_metrics_are_what_a_luffy_training_logs(short_training_run) -> None:
    result, config = short_training_run.result, short_training_run.config
    logged = MlflowClient(short_training_run.tracking_uri).get_run(result.run_id).data.metrics
    difference = compare(
        config.algorithm.mode, logged, result.validation.by_source, config.validation.samples_per_prompt
    )
    assert difference is None, difference
