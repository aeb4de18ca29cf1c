import dagster as dg
import pytest

from mri_assets.defs.alerts import slack_on_run_failure
from mri_assets.resources import MriSettingsResource, SlackAlerts


class Log:
    def __init__(self):
        self.lines = []

    def info(self, text):
        self.lines.append(("info", text))

    def warning(self, text):
        self.lines.append(("warning", text))


def alerts() -> SlackAlerts:
    return SlackAlerts(settings=MriSettingsResource(), channel="#models")


def test_post_goes_through_slack_sdk_to_the_endpoint(fake_slack):
    assert alerts().post("hello models", log=Log())
    [request] = fake_slack.requests
    assert request["path"] == "/api/chat.postMessage"
    assert request["auth"] == "Bearer xoxb-test-token"
    assert request["payload"]["channel"] == "#models"
    assert request["payload"]["text"] == "hello models"


def test_slack_errors_never_raise_and_never_log_the_token(fake_slack):
    fake_slack.ok = False
    log = Log()
    assert alerts().post("refused", log=log) is False
    assert log.lines and log.lines[0][0] == "warning" and "channel_not_found" in log.lines[0][1]
    assert "xoxb-test-token" not in str(log.lines)
    fake_slack.ok, fake_slack.status = True, 503
    assert alerts().post("outage", log=log) is False


def test_unreachable_slack_is_logged_not_raised(monkeypatch):
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-test-token")
    monkeypatch.setenv("MRI_SLACK_API_URL", "http://127.0.0.1:9/api/")  # discard port: refused
    log = Log()
    assert (
        SlackAlerts(settings=MriSettingsResource(), timeout_seconds=2).post("x", log=log) is False
    )
    assert log.lines[0][0] == "warning"


def test_without_a_token_messages_go_to_the_log(monkeypatch):
    monkeypatch.delenv("SLACK_BOT_TOKEN", raising=False)
    log = Log()
    assert alerts().post("no token here", log=log) is False
    assert "no token here" in log.lines[0][1]


def test_run_failure_sensor_posts_the_failed_run_with_a_link_to_it(fake_slack, monkeypatch):
    monkeypatch.setenv("MRI_DAGSTER_URL", "https://dagster.example.org/")

    @dg.asset
    def exploding_asset():
        raise ValueError("scanner caught fire")

    with dg.instance_for_test() as instance:
        result = dg.materialize([exploding_asset], instance=instance, raise_on_error=False)
        assert not result.success
        failure = next(e for e in result.all_events if e.event_type_value == "PIPELINE_FAILURE")
        with dg.build_run_status_sensor_context(
            sensor_name="slack_on_run_failure",
            dagster_instance=instance,
            dagster_run=result.dagster_run,
            dagster_event=failure,
            resources={"alerts": alerts()},
        ) as status_context:
            slack_on_run_failure(status_context.for_run_failure())
    [text] = fake_slack.texts()
    assert result.run_id[:8] in text and "failed" in text and "scanner caught fire" in text
    assert f"<https://dagster.example.org/runs/{result.run_id}|" in text


@pytest.mark.parametrize(
    ("tags", "alerted"),
    [
        ({"dagster/will_retry": "true"}, False),
        ({"mri/attempt": "2/5"}, False),
        ({"mri/attempt": "5/5"}, True),
        ({"dagster/will_retry": "false"}, True),
    ],
)
def test_a_failed_run_alerts_only_when_no_retry_is_to_come(fake_slack, tags, alerted):
    @dg.asset
    def flaky_asset():
        raise OSError("disk full")

    with dg.instance_for_test() as instance:
        result = dg.materialize([flaky_asset], instance=instance, raise_on_error=False, tags=tags)
        failure = next(e for e in result.all_events if e.event_type_value == "PIPELINE_FAILURE")
        run = instance.get_run_by_id(result.run_id)
        with dg.build_run_status_sensor_context(
            sensor_name="slack_on_run_failure",
            dagster_instance=instance,
            dagster_run=run,
            dagster_event=failure,
            resources={"alerts": alerts()},
        ) as status_context:
            slack_on_run_failure(status_context.for_run_failure())
    assert len(fake_slack.texts()) == int(alerted)
    if alerted and "mri/attempt" in tags:
        assert "ingest attempt 5/5" in fake_slack.texts()[0]
