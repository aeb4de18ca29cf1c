"""The promotion rule: a candidate replaces the deployed model only if it clearly beats it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    action: str  # promote | keep (candidate already deployed) | refuse
    reason: str

    @property
    def allowed(self) -> bool:
        """Whether deployed_model may proceed (promote, or confirm what is already deployed)."""
        return self.action != "refuse"


def decide_promotion(
    candidate_version: str,
    candidate_auc: float | None,
    baseline_auc: float | None,
    deployed_version: str | None,
    deployed_auc: float | None,
    margin: float,
) -> Decision:
    """Compare AUCs measured on the same test-set version.

    The candidate must beat the baseline's AUC, and the deployed model's if there is one, by at
    least ``margin``. An undefined AUC (single-class test set) never promotes.
    """
    if candidate_version == deployed_version:
        return Decision("keep", f"{candidate_version} is already the deployed model")
    if candidate_auc is None:
        return Decision("refuse", "the candidate's ROC AUC is undefined on this test set (one class only)")
    if baseline_auc is None:
        return Decision("refuse", "the baseline has no ROC AUC on this test set to compare against")
    if deployed_version is not None and deployed_auc is None:
        return Decision("refuse", f"the deployed model {deployed_version} has no ROC AUC on this test set")
    bars = [("baseline", baseline_auc)]
    if deployed_version is not None:
        bars.append(("deployed model", deployed_auc))
    for name, auc in bars:
        if candidate_auc < auc + margin:
            return Decision(
                "refuse",
                f"AUC {candidate_auc:.4f} does not beat the {name}'s {auc:.4f} by the margin {margin:g}",
            )
    beaten = " and ".join(f"the {name} ({auc:.4f})" for name, auc in bars)
    return Decision("promote", f"AUC {candidate_auc:.4f} beats {beaten} by at least {margin:g}")
