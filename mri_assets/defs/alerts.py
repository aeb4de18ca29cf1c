"""Alerts stage: a Slack message (or a log line, without a token) whenever a run fails."""

import dagster as dg

from mri_assets.core.notify import run_failure_message
from mri_assets.resources import SlackAlerts


@dg.run_failure_sensor(
    name="slack_on_run_failure",
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=10,
    description="Posts each failed run (job, assets, first line of the error) to MRI_SLACK_CHANNEL.",
)
def slack_on_run_failure(context: dg.RunFailureSensorContext, alerts: SlackAlerts) -> None:
    run = context.dagster_run
    error = context.failure_event.message or ""
    alerts.post(run_failure_message(run.job_name, run.run_id, error, run.tags), log=context.log)


alert_sensors = [slack_on_run_failure]
