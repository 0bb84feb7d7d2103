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


def test_a_fleet_loses_nothing_duplicates_nothing_and_does_not_churn_across_a_kill():
    report = faults.run_fleet(jobs=8, kills=1, seed=3, timeout=240)
    print(report.as_dict())
    assert report.lost == 0
    assert report.duplicates == 0
    assert report.out_of_order == 0  # each agent runs the jobs it holds in arrival order
    assert report.results_received == report.jobs_sent
    assert report.republished <= report.jobs_sent  # at most one pass-back per job on average
    assert sum(report.split.values()) >= report.jobs_sent
