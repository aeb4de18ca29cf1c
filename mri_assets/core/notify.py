"""Alert texts: what a person reads in Slack (or the run log) about a model decision or a failed
run. Every message ends with a link to its run in the Dagster UI."""

from __future__ import annotations

from collections.abc import Mapping

from mri_assets.core.promotion import Standing


def run_url(dagster_url: str, run_id: str) -> str:
    """The run's page in the Dagster UI served at ``dagster_url`` (MRI_DAGSTER_URL)."""
    return f"{dagster_url.rstrip('/')}/runs/{run_id}"


def _run_line(dagster_url: str, run_id: str) -> str:
    return f"Run: <{run_url(dagster_url, run_id)}|{run_id[:8]}>"  # Slack mrkdwn link


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def comparison_lines(standing: Standing) -> list[str]:
    """One line per model plus the base rate: the comparison behind the decision."""
    lines = [f"Test set {standing.test_set_version} ({standing.n_test} images):"]
    for role, score in standing.contenders():
        if score is None:
            lines.append(f"• {role} (none)")
            continue
        lines.append(
            f"• {role} `{score.version}`: AUC {_number(score.roc_auc)}, "
            f"accuracy {_number(score.accuracy)}, log loss {_number(score.log_loss)}"
        )
    lines.append(
        f"• always guessing the majority class: accuracy {_number(standing.base_rate_accuracy)}"
    )
    return lines


def promotion_message(standing: Standing, dagster_url: str, run_id: str) -> str:
    head = f":white_check_mark: Promoted `{standing.candidate.version}` to deployed_model."
    return "\n".join([head, *comparison_lines(standing), _run_line(dagster_url, run_id)])


def refusal_message(standing: Standing, dagster_url: str, run_id: str) -> str:
    head = (
        f":no_entry: Candidate `{standing.candidate.version}` was not promoted: "
        f"{standing.decision.reason}"
    )
    return "\n".join([head, *comparison_lines(standing), _run_line(dagster_url, run_id)])


def retry_to_come(tags: Mapping[str, str] | None) -> str | None:
    """Why a failed run is not the end of the story, or None when nothing will retry it.

    Each retry that also fails is reported by its own run, so only the last failure alerts."""
    tags = tags or {}
    if tags.get("dagster/will_retry") == "true":
        return "the instance retries it (run_retries in dagster.yaml)"
    attempt, _, attempts = tags.get("mri/attempt", "").partition("/")
    if attempt.isdigit() and attempts.isdigit() and int(attempt) < int(attempts):
        return f"its landing sensor asks again with backoff (attempt {attempt} of {attempts})"
    return None


def run_failure_message(
    job: str,
    run_id: str,
    error: str,
    dagster_url: str,
    tags: Mapping[str, str] | None = None,
) -> str:
    assets = (tags or {}).get("dagster/asset_selection") or ""
    where = f" ({assets})" if assets else ""
    first_line = error.strip().splitlines()[0] if error.strip() else "no error message"
    head = f":rotating_light: Run `{run_id[:8]}` of `{job}`{where} failed: {first_line[:500]}"
    attempt = (tags or {}).get("mri/attempt")
    if attempt:
        head += f" (ingest attempt {attempt}; asked again when the landing zone changes)"
    return f"{head}\n{_run_line(dagster_url, run_id)}"
