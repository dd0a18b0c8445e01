"""The training metrics documented in docs/tracking.md, and how they compare with what a run logged."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

TRACKING_DOC = Path(__file__).resolve().parents[1] / "docs" / "tracking.md"
SECTION = "## Training metrics"
MODES = ("luffy", "grpo", "sft", "rl_sft_loss")
NOT_LISTED = ("system/",)  # MLflow's own system metrics, named by MLflow


def documented_training_metrics(path: Path = TRACKING_DOC) -> dict[str, tuple[str, ...]]:
    """Each metric (or pattern such as `val/<benchmark>/avg_at_<k>`) of the table under SECTION, with its modes."""
    text = path.read_text()
    assert SECTION in text, f"{path} has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    metrics: dict[str, tuple[str, ...]] = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        name, modes = cells[0].strip("`"), cells[1].split()
        modes = list(MODES) if modes == ["all"] else modes
        unknown = sorted(set(modes) - set(MODES))
        assert not unknown, f"{path}: metric {name} names unknown modes {unknown}"
        assert name not in metrics, f"{path}: metric {name} is listed twice"
        metrics[name] = tuple(modes)
    assert metrics, f"{path}: no metric rows under {SECTION!r}"
    return metrics


def expected_metrics(mode: str, benchmarks: Iterable[str], k: int) -> set[str]:
    """The documented metric names of a run in `mode`, patterns filled in with its benchmarks and k."""
    out = set()
    for pattern, modes in documented_training_metrics().items():
        if mode not in modes:
            continue
        names = [pattern.replace("<k>", str(k))]
        if "<benchmark>" in pattern:
            names = [n.replace("<benchmark>", b) for n in names for b in benchmarks]
        out.update(names)
    return out


def compare(mode: str, logged: Iterable[str], benchmarks: Iterable[str], k: int) -> str | None:
    """None when the logged metrics are exactly the documented ones, else a message naming the difference."""
    logged = {name for name in logged if not name.startswith(NOT_LISTED)}
    documented = expected_metrics(mode, list(benchmarks), k)
    if logged == documented:
        return None
    lines = [f"mode {mode}: docs/tracking.md ({SECTION}) and the metrics a real training logs differ"]
    if logged - documented:
        lines.append(f"  logged but not documented: {sorted(logged - documented)}")
    if documented - logged:
        lines.append(f"  documented but not logged: {sorted(documented - logged)}")
    return "\n".join(lines)
