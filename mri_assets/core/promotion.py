"""The promotion rule and the standing it is decided on.

A candidate replaces the deployed model only if it clearly beats it and the baseline, measured on
the same test-set version. The standing (every contender's scores and the decision) is computed
once, by the candidate_evaluation asset, recorded in DuckDB, and read by everything after it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Action = Literal["promote", "keep", "refuse"]


@dataclass(frozen=True)
class Score:
    """One model's figures on one test-set version."""

    version: str
    roc_auc: float | None
    accuracy: float | None = None
    log_loss: float | None = None


@dataclass(frozen=True)
class Decision:
    action: Action  # promote | keep (candidate already deployed) | refuse
    reason: str

    @property
    def allowed(self) -> bool:
        """Whether deployed_model may proceed (promote, or confirm what is already deployed)."""
        return self.action != "refuse"


def decide_promotion(
    *, candidate: Score, baseline: Score, deployed: Score | None, margin: float
) -> Decision:
    """Compare AUCs measured on the same test-set version.

    The candidate must beat the baseline's AUC, and the deployed model's if there is one, by at
    least ``margin``. An undefined AUC (single-class test set) never promotes.
    """
    if deployed is not None and candidate.version == deployed.version:
        return Decision("keep", f"{candidate.version} is already the deployed model")
    if candidate.roc_auc is None:
        return Decision(
            "refuse", "the candidate's ROC AUC is undefined on this test set (one class only)"
        )
    if baseline.roc_auc is None:
        return Decision("refuse", "the baseline has no ROC AUC on this test set to compare against")
    if deployed is not None and deployed.roc_auc is None:
        return Decision(
            "refuse", f"the deployed model {deployed.version} has no ROC AUC on this test set"
        )
    bars = [("baseline", baseline.roc_auc)]
    if deployed is not None:
        bars.append(("deployed model", deployed.roc_auc))
    for name, auc in bars:
        if candidate.roc_auc < auc + margin:
            return Decision(
                "refuse",
                f"AUC {candidate.roc_auc:.4f} does not beat the {name}'s {auc:.4f} "
                f"by the margin {margin:g}",
            )
    beaten = " and ".join(f"the {name} ({auc:.4f})" for name, auc in bars)
    return Decision("promote", f"AUC {candidate.roc_auc:.4f} beats {beaten} by at least {margin:g}")


@dataclass(frozen=True)
class Standing:
    """Candidate, deployed model and baseline on the same test-set version, and the decision."""

    test_set_version: str
    n_test: int
    base_rate_accuracy: float | None  # accuracy of always guessing the majority class
    candidate: Score
    baseline: Score
    deployed: Score | None
    margin: float
    decision: Decision

    @classmethod
    def decide(
        cls,
        *,
        test_set_version: str,
        n_test: int,
        base_rate_accuracy: float | None,
        candidate: Score,
        baseline: Score,
        deployed: Score | None,
        margin: float,
    ) -> Standing:
        """The standing with its decision (decide_promotion) filled in."""
        decision = decide_promotion(
            candidate=candidate, baseline=baseline, deployed=deployed, margin=margin
        )
        return cls(
            test_set_version,
            n_test,
            base_rate_accuracy,
            candidate,
            baseline,
            deployed,
            margin,
            decision,
        )

    def contenders(self) -> list[tuple[str, Score | None]]:
        """(role, score) in the order a person compares them; a missing deployed model is None."""
        return [
            ("candidate", self.candidate),
            ("deployed", self.deployed),
            ("baseline", self.baseline),
        ]

    def comparison_markdown(self) -> str:
        """The standing as a markdown table, with the majority-class guess for scale."""
        rows = ["| model | version | ROC AUC | accuracy | log loss |", "|---|---|---|---|---|"]
        for role, score in self.contenders():
            figures = (score.roc_auc, score.accuracy, score.log_loss) if score else (None,) * 3
            version = score.version if score else "-"
            rows.append(f"| {role} | {version} | " + " | ".join(map(_figure, figures)) + " |")
        rows.append(f"| majority-class guess | - | - | {_figure(self.base_rate_accuracy)} | - |")
        return "\n".join(rows)


def _figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


@dataclass(frozen=True)
class DeploymentStep:
    """What deployed_model does with a recorded standing, given what is deployed now."""

    action: Literal["promote", "record", "skip", "stale"]
    reason: str


def deployment_step(standing: Standing, deployed_now: str | None) -> DeploymentStep:
    """Promote, only record the history (the candidate is deployed already), skip a refused
    candidate, or call the standing stale when the deployed model changed since it was decided.

    A pointer that already names the candidate wins over the decision: that is a promotion whose
    history was not recorded yet (a crash after the flip), or a confirmed ``keep``.
    """
    candidate = standing.candidate.version
    if deployed_now == candidate:
        return DeploymentStep("record", f"{candidate} is the deployed model")
    if standing.decision.action == "refuse":
        return DeploymentStep("skip", f"{candidate} is not promoted: {standing.decision.reason}")
    decided_against = standing.deployed.version if standing.deployed else None
    if decided_against != deployed_now:
        return DeploymentStep(
            "stale",
            f"the standing of {candidate} was decided against deployed model "
            f"{decided_against or '(none)'}, but {deployed_now or 'no model'} is deployed now: "
            "materialize candidate_evaluation again",
        )
    return DeploymentStep("promote", standing.decision.reason)


def newest_version_trained_on(
    versions: Iterable[str], train_set_of, train_set_version: str
) -> str | None:
    """The newest of ``versions`` (ids sort oldest first) whose training record names this train
    set; ``train_set_of(version)`` reads that record's ``train_set_version``."""
    for version in sorted(versions, reverse=True):
        if train_set_of(version) == train_set_version:
            return version
    return None
