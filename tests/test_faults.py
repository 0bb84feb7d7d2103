"""The short fault run: every kind of fault and a flood, nothing lost, nothing produced twice."""

from __future__ import annotations

from tests import faults


def test_short_fault_run_loses_nothing_and_duplicates_nothing():
    report = faults.run(jobs=12, faults=6, flood=300, flood_runs=1, seed=7, timeout=180)
    print(report.as_dict())
    assert report.faults == {"worker": 2, "agent": 2, "broker": 2}
    assert report.lost == 0
    assert report.duplicates == 0
    assert report.results_received == report.jobs_sent
    assert report.malformed_sent == 300
