"""moto's S3 server answering one request at a time: ``python -m
mri_assets_tests.serial_moto_server -H HOST -p PORT``.

moto checks ``If-Match``/``If-None-Match`` and then stores the object in two steps, and its
standard server answers each request on a thread of its own, so two conditional writes that
arrive together can both pass the check: a race S3 itself does not have (a conditional
PutObject is atomic there). Tests of racing writers run against this server, which has S3's
one-winner behaviour, so a lost update they see is the project's and not moto's.
"""

from __future__ import annotations

import moto.server

_run_threaded = moto.server.run_simple


def _run_one_request_at_a_time(*args, **kwargs):
    kwargs["threaded"] = False
    return _run_threaded(*args, **kwargs)


if __name__ == "__main__":
    moto.server.run_simple = _run_one_request_at_a_time
    moto.server.main()
