"""Alerts stage: a Slack message (or a log line, without a token) whenever a run fails."""

import dagster as dg

from mri_assets.core.notify import retry_to_come, run_failure_message
from mri_assets.resources import SlackAlerts


@dg.run_failure_sensor(
    name="slack_on_run_failure",
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=10,
    description=(
        "Posts each failed run (job, assets, first line of the error, a link to the run) to "
        "MRI_SLACK_CHANNEL, once no retry is to come (instance run retries, a landing sensor's "
        "backoff): a fault that heals sends nothing, one that persists sends one. A refused promotion is not a failed run: its one message comes from "
        "the promotion gate."
    ),
)
def slack_on_run_failure(context: dg.RunFailureSensorContext, alerts: SlackAlerts) -> None:
    run = context.dagster_run
    retry = retry_to_come(run.tags)
    if retry:
        context.log.info(f"run {run.run_id[:8]} failed; no alert yet: {retry}")
        return
    # The run's own failure message only lists the failed steps; the first step's error says why.
    step_errors = [
        root_cause(event.event_specific_data.error)
        for event in context.get_step_failure_events()
        if event.event_specific_data and event.event_specific_data.error
    ]
    error = step_errors[0] if step_errors else context.failure_event.message or ""
    text = run_failure_message(run.job_name, run.run_id, error, alerts.dagster_url(), run.tags)
    alerts.post(text, log=context.log)


def root_cause(error) -> str:
    """The innermost error's message: Dagster wraps the asset's own exception in its step error."""
    while error.cause is not None:
        error = error.cause
    return error.message


alert_sensors = [slack_on_run_failure]
