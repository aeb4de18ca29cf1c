import subprocess
import sys
import time

import duckdb

from mri_assets.core.catalog import exclusive_lock

WRITER = """
import sys
from mri_assets.resources import MriSettingsResource, WarehouseResource
warehouse = WarehouseResource(database=sys.argv[1], settings=MriSettingsResource())
with warehouse.connection() as conn:
    conn.execute("CREATE TABLE IF NOT EXISTS t (x INTEGER)")
    conn.execute("INSERT INTO t VALUES (1)")
"""


def test_a_second_writer_waits_for_the_first_instead_of_failing(tmp_path):
    database = tmp_path / "mri.duckdb"
    with exclusive_lock(database), duckdb.connect(str(database)) as holder:
        holder.execute("CREATE TABLE t (x INTEGER)")
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(database)])
        time.sleep(2)
        assert writer.poll() is None, "the second writer should be queued on the lock"
        holder.execute("INSERT INTO t VALUES (0)")
    assert writer.wait(timeout=60) == 0
    with duckdb.connect(str(database), read_only=True) as conn:
        assert sorted(conn.execute("SELECT x FROM t").fetchall()) == [(0,), (1,)]
