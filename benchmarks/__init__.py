"""Benchmarks of the mri-assets pipeline, run by ``make bench`` (``python -m benchmarks.run``).

Every figure is a ratio against a reference measured in the same process (or the same run on
the same machine), because absolute times on a shared machine mean little. Each benchmark is a
module with ``run(quick, scratch) -> dict`` and can be run alone: ``python -m benchmarks.ingest``.
"""
