"""Shared fixtures: small image files, a moto S3 server over real HTTP, a fake Slack API."""

import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import numpy as np
import pytest
from PIL import Image


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png_bytes(seed: int = 0, size: int = 32, mode: str = "L") -> bytes:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 255, (size, size), dtype=np.uint8)
    image = Image.fromarray(array, "L")
    if mode != "L":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(seed: int = 0, size: int = 32) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="session", autouse=True)
def cores_shared_between_xdist_workers():
    """Under pytest-xdist, each worker (and every process it starts) computes on its share of the
    cores. torch's default of one thread per core in each of the workers oversubscribes them, and
    OpenMP threads spinning at their barriers then slow training several times over (measured:
    core/test_train.py and test_model.py with -n 2 on 2 cores, 46 s against 18 s)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers < 2:
        yield
        return
    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", str(threads))  # read by processes the tests start
        torch = sys.modules.get("torch")  # already imported by the collected test modules
        previous = torch.get_num_threads() if torch else None
        if torch:
            torch.set_num_threads(threads)
        yield
        if torch:
            torch.set_num_threads(previous)


@pytest.fixture
def mri_env(tmp_path, monkeypatch) -> Path:
    """A private MRI_HOME for one test, with settings read from it."""
    home = tmp_path / "mri_home"
    monkeypatch.setenv("MRI_HOME", str(home))
    for name in (
        "MRI_LANDING",
        "MRI_STORE",
        "MRI_LANDING_QUEUE",
        "MRI_BASE_MODEL",
        "MRI_CLASSES",
        "MRI_POSITIVE_CLASS",
        "SLACK_BOT_TOKEN",
    ):
        monkeypatch.delenv(name, raising=False)
    return home


def start_moto_server(serial: bool = False) -> tuple[subprocess.Popen, str]:
    """moto's standalone S3 server on a free loopback port: (its process, its endpoint URL).
    ``serial``: one request at a time, so conditional writes are atomic as on S3 (see
    serial_moto_server)."""
    port = free_port()
    module = "mri_assets_tests.serial_moto_server" if serial else "moto.server"
    process = subprocess.Popen(
        [sys.executable, "-m", module, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return process, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("moto server did not start")


@pytest.fixture(scope="session")
def moto_server():
    """One moto S3 server for the session; yields its endpoint URL."""
    process, endpoint = start_moto_server()
    yield endpoint
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def s3_bucket(moto_server, monkeypatch, request):
    """A fresh bucket on the moto server, with the AWS environment pointing at it."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    name = f"landing-{abs(hash(request.node.nodeid)) % 10**10}-{os.getpid()}"
    client = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    return name


class FakeSlack:
    """A local HTTP server that answers like Slack's Web API and remembers every request."""

    def __init__(self, status: int = 200, ok: bool = True) -> None:
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import parse_qs

        self.requests: list[dict] = []
        self.status, self.ok = status, ok
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
                if self.headers.get("Content-Type", "").startswith("application/json"):
                    payload = json.loads(body or "{}")
                else:
                    payload = {k: v[0] for k, v in parse_qs(body).items()}
                fake.requests.append(
                    {
                        "path": self.path,
                        "auth": self.headers.get("Authorization"),
                        "payload": payload,
                    }
                )
                reply = {"ok": fake.ok} if fake.ok else {"ok": False, "error": "channel_not_found"}
                data = json.dumps(reply).encode()
                self.send_response(fake.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def texts(self) -> list[str]:
        return [r["payload"].get("text", "") for r in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_slack(monkeypatch):
    """Slack posts from this test go to a local server; yields the server."""
    server = FakeSlack()
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-test-token")
    monkeypatch.setenv("MRI_SLACK_API_URL", server.url)
    yield server
    server.close()


def pytest_collection_modifyitems(config, items):
    """The grouped tests (each group one real `dagster dev` session, minutes long) first: under
    `-n 2 --dist loadgroup` each worker then starts on one of those groups at once and the short
    tests fill in around them, instead of a group starting last and running on alone."""
    items.sort(key=lambda item: item.get_closest_marker("xdist_group") is None)
