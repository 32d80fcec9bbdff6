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
