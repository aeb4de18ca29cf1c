"""Alert texts: what a person reads in Slack (or the run log) about a model decision."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Contender:
    """One model's standing on the current test set."""

    role: str  # candidate | deployed | baseline
    version: str | None
    roc_auc: float | None
    accuracy: float | None = None
    log_loss: float | None = None


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def comparison_lines(
    contenders: list[Contender], base_rate_accuracy: float | None, test_set: str, n_test: int
) -> list[str]:
    """One line per model plus the base rate: the comparison the seed's message only promised."""
    lines = [f"Test set {test_set} ({n_test} images):"]
    for c in contenders:
        name = f" `{c.version}`" if c.version else " (none)"
        lines.append(
            f"• {c.role}{name}: AUC {_number(c.roc_auc)}, accuracy {_number(c.accuracy)}, "
            f"log loss {_number(c.log_loss)}"
        )
    lines.append(f"• always guessing the majority class: accuracy {_number(base_rate_accuracy)}")
    return lines


def promotion_message(
    version: str, contenders: list[Contender], base_rate_accuracy: float | None,
    test_set: str, n_test: int,
) -> str:
    head = f":white_check_mark: Promoted `{version}` to deployed_model."
    return "\n".join([head, *comparison_lines(contenders, base_rate_accuracy, test_set, n_test)])


def refusal_message(
    version: str, reason: str, contenders: list[Contender], base_rate_accuracy: float | None,
    test_set: str, n_test: int,
) -> str:
    head = f":no_entry: Candidate `{version}` was not promoted: {reason}"
    return "\n".join([head, *comparison_lines(contenders, base_rate_accuracy, test_set, n_test)])


def run_failure_message(job: str, run_id: str, error: str, tags: Mapping[str, str] | None = None) -> str:
    assets = (tags or {}).get("dagster/asset_selection") or ""
    where = f" ({assets})" if assets else ""
    first_line = error.strip().splitlines()[0] if error.strip() else "no error message"
    return f":rotating_light: Run `{run_id[:8]}` of `{job}`{where} failed: {first_line[:500]}"
