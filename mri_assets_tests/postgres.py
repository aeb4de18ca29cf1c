"""A real PostgreSQL server for tests: Debian's `postgresql` package, a cluster made with initdb in
a temporary folder, on a free loopback port, with password authentication.

The server runs as the `postgres` user when the tests run as root (initdb refuses root), else as
the current user. A missing PostgreSQL install fails the test that asked for it: CI installs the
package (`.ci/run`), so a skip would only hide a broken CI.
"""

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg2
import pytest

from mri_assets_tests.conftest import free_port

# Debian installs the server binaries outside PATH, one folder per major version.
DEBIAN_BIN_GLOB = "/usr/lib/postgresql/*/bin"
USERNAME = "dagster"
DATABASE = "dagster"


def server_binaries() -> Path:
    """The folder holding initdb and pg_ctl: on PATH, else Debian's newest version's."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).resolve().parent
    found = sorted(glob.glob(DEBIAN_BIN_GLOB), key=lambda p: int(Path(p).parent.name))
    if not found:
        pytest.fail(
            "PostgreSQL is not installed (no pg_ctl on PATH nor under /usr/lib/postgresql): "
            "`apt-get install postgresql` (.ci/run installs it)"
        )
    return Path(found[-1])


class PostgresServer:
    """One initdb'd cluster in a temporary folder; `start`, `stop` (any mode), `query`."""

    def __init__(self) -> None:
        self.bin = server_binaries()
        # Not under pytest's tmp_path: that folder is private to root, and the server runs as
        # `postgres`, which must reach its data folder.
        self.root = Path(tempfile.mkdtemp(prefix="mri-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "socket"
        self.log_path = self.root / "server.log"
        self.port = free_port()
        self.password = secrets.token_urlsafe(16)
        self.run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _as_server_user(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self.run_as, *args], check=True, capture_output=True, text=True, cwd=self.root
        )

    def init(self) -> None:
        self.socket_dir.mkdir()
        password_file = self.root / "password"
        password_file.write_text(self.password + "\n")
        if self.run_as:
            owner = pwd.getpwnam("postgres")
            for path in (self.root, self.socket_dir, password_file):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        self._as_server_user(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            USERNAME,
            "--auth=scram-sha-256",
            f"--pwfile={password_file}",
            "--encoding=UTF8",
            "--locale=C",
        )
        password_file.unlink()

    def start(self) -> None:
        options = f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1"
        self._as_server_user(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.log_path),
            "-w",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        """`mode` is pg_ctl's: `fast` (clean), `immediate` (a crash: recovery on next start)."""
        self._as_server_user(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "stop")

    def create_database(self) -> None:
        with contextlib.closing(self.connect("postgres")) as conn:
            conn.autocommit = True
            conn.cursor().execute(f"CREATE DATABASE {DATABASE}")

    def connect(self, database: str = DATABASE):
        return psycopg2.connect(
            host="127.0.0.1",
            port=self.port,
            user=USERNAME,
            password=self.password,
            dbname=database,
            connect_timeout=5,
        )

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with contextlib.closing(self.connect()) as conn, conn.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall()

    def environment(self) -> dict[str, str]:
        """The variables dagster.postgres.yaml reads."""
        return {
            "DAGSTER_PG_HOST": "127.0.0.1",
            "DAGSTER_PG_PORT": str(self.port),
            "DAGSTER_PG_USERNAME": USERNAME,
            "DAGSTER_PG_PASSWORD": self.password,
            "DAGSTER_PG_DB": DATABASE,
        }

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no server log)"

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def running_postgres():
    """A started server with an empty `dagster` database; removed, data and all, afterwards."""
    server = PostgresServer()
    try:
        server.init()
        server.start()
        server.create_database()
        yield server
    finally:
        server.remove()
