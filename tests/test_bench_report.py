"""bench's report (formatting only: benchmarks never run in `make test`)."""
from bench.__main__ import rounds_table


def test_rounds_compare_pyworker_with_each_peer_round_by_round():
    rows = []
    for r, (mine, peer) in enumerate([(0.28, 0.31), (0.38, 0.33), (0.36, 0.36)]):
        rows += [{"backend": "pyworker", "workload": "W5", "round": r, "p50_ms": mine},
                 {"backend": "ProcessPoolExecutor", "workload": "W5", "round": r, "p50_ms": peer},
                 {"backend": "pyworker", "workload": "W1", "round": r, "tasks_per_s": 3e6},
                 {"backend": "ProcessPoolExecutor", "workload": "W1", "round": r,
                  "tasks_per_s": 1.5e6}]
    out = rounds_table(rows, ["pyworker", "ProcessPoolExecutor"], ["W1", "W2", "W5"])
    assert out.splitlines()[0] == "| workload | ProcessPoolExecutor |"
    assert "| W1 tasks_per_s | ahead in 3 of 3 (2.00×, 2.00×, 2.00×) |" in out
    # a time: below 1× is ahead; a tie is not
    assert "| W5 p50_ms | ahead in 1 of 3 (0.90×, 1.15×, 1.00×) |" in out
    assert "W2" not in out  # no ahead-of-peers target
    assert rounds_table([r for r in rows if r["round"] == 0],
                        ["pyworker", "ProcessPoolExecutor"], ["W5"]) is None


def test_w3_breakdown_splits_a_job_into_its_parts():
    from bench.w3parts import breakdown
    ms = 1e-3
    # Two workers, chunks of 2 items (0-1, 2-3, 4-5); each item used 4 ms of CPU.
    # Worker 1 runs chunks 0 and 2, worker 2 chunk 1; times in seconds after the call at 0.
    out = [None] * 6
    out[0] = (4 * ms, 1 * ms, 5 * ms, 1)    # w1 starts 1 ms after the call
    out[1] = (4 * ms, 6 * ms, 11 * ms, 1)   # inside a chunk: 1 ms gap; 1 ms preempted
    out[4] = (4 * ms, 14 * ms, 18 * ms, 1)  # its first gap between chunks: 3 ms
    out[5] = (4 * ms, 18 * ms, 22 * ms, 1)
    out[2] = (4 * ms, 2 * ms, 6 * ms, 2)    # w2 starts 2 ms after the call
    out[3] = (4 * ms, 6 * ms, 10 * ms, 2)
    parts = breakdown(0.0, 23 * ms, out, 2)
    expect = {"start": 3, "gap1": 3, "gaps": 0, "inner": 1, "preempted": 1,
              "imbalance": 12, "return": 1, "start gap": 1}
    assert {k: round(parts[k], 6) for k in expect} == expect
    assert round(parts["efficiency"], 6) == round(24 / (2 * 23), 6)
