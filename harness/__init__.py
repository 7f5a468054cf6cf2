"""The measurement harness behind ``tools/bench.py`` and ``tools/gpucheck.py``.

Kept out of the two tools so that neither imports the other: the bench set (:mod:`harness.benchdata`),
machine facts (:mod:`harness.machine`), timed windows (:mod:`harness.timing`), the rows and the report
(:mod:`harness.measure`, :mod:`harness.report`), and the GPU check's plan, host setup and report
(:mod:`harness.gpuplan`, :mod:`harness.gpuhost`, :mod:`harness.gpureport`).
"""
