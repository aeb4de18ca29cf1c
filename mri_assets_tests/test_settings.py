"""Settings: one definition per variable, validated with a message that names it."""

import pytest

from mri_assets.resources import MriSettingsResource
from mri_assets.settings import SETTINGS, Settings


def test_defaults_fill_in_an_empty_environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = Settings.from_env({})
    assert settings.home == tmp_path / ".mri" and settings.landing == str(tmp_path / ".mri/landing")
    assert settings.classes.names == ("glioma", "meningioma")
    assert settings.classes.positive == "meningioma"
    assert settings.promotion_margin == 0.005 and settings.max_image_pixels == 50_000_000
    assert settings.dagster_url == "http://127.0.0.1:3000" and settings.slack_api_url is None


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MRI_PROMOTION_MARGIN", "a lot"),
        ("MRI_MAX_IMAGE_PIXELS", "0"),
        ("MRI_DAGSTER_URL", "dagster.example.org"),
        ("MRI_SLACK_API_URL", "localhost:9000"),
        ("MRI_DEVICE", "gpu"),
        ("MRI_STORE", "/srv/mri"),
    ],
)
def test_a_bad_value_is_refused_naming_the_variable(name, value):
    with pytest.raises(ValueError, match=f"^{name}="):
        Settings.from_env({name: value})


def test_every_setting_read_here_changes_the_settings(tmp_path):
    """No setting is documented but ignored: each one read here moves some field."""
    changed = {
        "MRI_HOME": str(tmp_path),
        "MRI_LANDING": "s3://bucket/landing",
        "MRI_LANDING_QUEUE": "http://sqs.example.org/1/q",
        "MRI_LANDING_FULL_LISTING_SECONDS": "60",
        "MRI_STORE": "s3://bucket/state",
        "MRI_CATALOG": "postgres:host=db dbname=mri",
        "MRI_BASE_MODEL": "microsoft/resnet-50",
        "MRI_DEVICE": "auto",
        "MRI_CLASSES": "a,b",
        "MRI_POSITIVE_CLASS": "glioma",
        "MRI_PROMOTION_MARGIN": "0.1",
        "MRI_MAX_IMAGE_PIXELS": "7",
        "MRI_SLACK_CHANNEL": "#x",
        "MRI_DAGSTER_URL": "https://d.example.org",
        "MRI_SLACK_API_URL": "http://s:1/api",
        "MRI_OOD_DRIFT_SHARE": "0.5",
    }
    assert set(changed) == {s.name for s in SETTINGS if s.read_here}
    default = Settings.from_env({})
    for name, value in changed.items():
        env = {
            name: value,
            **({"MRI_CLASSES": "glioma,meningioma"} if name == "MRI_POSITIVE_CLASS" else {}),
        }
        assert Settings.from_env(env) != default, name


def test_the_resource_reads_the_environment_once_and_overrides_win(monkeypatch, tmp_path):
    monkeypatch.setenv("MRI_PROMOTION_MARGIN", "0.2")
    resource = MriSettingsResource(home=str(tmp_path))
    first = resource.resolve()
    assert first.home == tmp_path and first.promotion_margin == 0.2
    monkeypatch.setenv("MRI_PROMOTION_MARGIN", "0.3")
    assert resource.resolve() is first  # the same object: not rebuilt on each call
    assert MriSettingsResource(promotion_margin=-1.0).resolve().promotion_margin == -1.0
