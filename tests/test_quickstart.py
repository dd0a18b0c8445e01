"""The quickstart's report: curves over seeds, the comparison table, the verdict line and the figure."""

from __future__ import annotations

from dataclasses import dataclass, field

from luffy_trainer.demo.quickstart import comparison_table, held_out_curves, plot_curves, verdict
from luffy_trainer.evaluation import EvalResult


@dataclass
class FakeResult:
    validation_history: dict[int, EvalResult]
    run_id: str | None = None
    validation: EvalResult | None = field(init=False)

    def __post_init__(self):
        self.validation = self.validation_history[max(self.validation_history)] if self.validation_history else None


def evaluation(a: float, b: float) -> EvalResult:
    return EvalResult(
        k=4, by_source={"4-terms": {"problems": 3.0, "avg@4": a}, "unseen-5-terms": {"problems": 3.0, "avg@4": b}}
    )


RESULTS = {
    "luffy": {
        1: FakeResult({10: evaluation(0.2, 0.4), 20: evaluation(0.5, 0.7)}),
        2: FakeResult({10: evaluation(0.1, 0.3), 20: evaluation(0.3, 0.5)}),
    },
    "grpo": {
        1: FakeResult({10: evaluation(0.0, 0.0), 20: evaluation(0.0, 0.1)}),
        2: FakeResult({10: evaluation(0.0, 0.0), 20: evaluation(0.1, 0.0)}),
    },
}
BASE = {"4-terms": 0.0, "unseen-5-terms": 0.0, "mean": 0.0}


def test_curves_start_at_the_base_model_and_keep_one_value_per_seed():
    curves = held_out_curves(RESULTS, BASE)
    assert list(curves["luffy"]) == [0, 10, 20]
    assert curves["luffy"][0]["mean"] == [0.0, 0.0]
    assert curves["luffy"][20]["mean"] == [0.6, 0.4]  # (0.5 + 0.7) / 2 and (0.3 + 0.5) / 2, in seed order
    assert curves["grpo"][20]["4-terms"] == [0.0, 0.1]


def test_table_shows_the_last_step_with_mean_and_spread_and_the_floor():
    table = comparison_table(
        held_out_curves(RESULTS, BASE), [1, 2], 4, {"4-terms": 0.25, "unseen-5-terms": 0.5, "mean": 0.375}
    )
    assert "| luffy | 20 | 0.400 (0.30-0.50) | 0.600 (0.50-0.70) | 0.500 (0.40-0.60) |" in table
    assert "| grpo | 20 | 0.050 (0.00-0.10) | 0.050 (0.00-0.10) | 0.050 (0.05-0.05) |" in table
    assert "| (most common answer) | | 0.250 | 0.500 | 0.375 |" in table
    assert "| base model | 0 | 0.000 | 0.000 | 0.000 |" in table


def test_verdict_gives_the_lead_per_seed_and_says_when_it_is_not_everywhere():
    assert (
        verdict(RESULTS)
        == "verdict: LUFFY ahead of GRPO on held-out accuracy on every seed: lead +0.550 (seed 1), +0.350 (seed 2)"
    )
    behind = {"luffy": RESULTS["luffy"], "grpo": {1: RESULTS["luffy"][1], 2: RESULTS["grpo"][2]}}
    assert verdict(behind).startswith(
        "verdict: LUFFY NOT ahead of GRPO on held-out accuracy on every seed: lead +0.000 (seed 1)"
    )
    assert verdict({"luffy": RESULTS["luffy"]}) == "verdict: needs both luffy and grpo in --modes"


def test_the_figure_is_a_png(tmp_path):
    path = plot_curves(held_out_curves(RESULTS, BASE), [1, 2], 4, tmp_path / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
