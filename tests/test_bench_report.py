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


def test_sign_test_is_the_two_sided_binomial_tail():
    from bench.duel import sign_test
    assert sign_test(0, 0) == 1.0
    assert sign_test(5, 5) == 1.0
    assert sign_test(4, 0) == 2 / 16           # all 4 one way: 2 x (1/2)^4
    assert sign_test(0, 4) == 2 / 16
    # 21 of 30: p = 0.043 (the smallest lead of 30 turns that counts); 20 of 30 does not
    assert 0.04 < sign_test(21, 9) < 0.045 < 0.09 < sign_test(20, 10) < 0.1


def test_duel_pairs_turns_and_says_ahead_only_when_significant():
    from bench.duel import report
    rows = []
    for s in range(2):
        for i in range(10):
            rows += [  # W5: pyworker quicker in every turn; W3: level (5 of 10)
                {"session": s, "pair": i, "workload": "W5", "backend": "pyworker",
                 "value": 0.25},
                {"session": s, "pair": i, "workload": "W5", "backend": "ProcessPoolExecutor",
                 "value": 0.30},
                {"session": s, "pair": i, "workload": "W3", "backend": "pyworker",
                 "value": 0.99},
                {"session": s, "pair": i, "workload": "W3", "backend": "ProcessPoolExecutor",
                 "value": 0.98 if i % 2 else 0.995}]
    # a turn the peer missed (its session ended) is left out, not paired with another
    rows.append({"session": 2, "pair": 0, "workload": "W5", "backend": "pyworker", "value": 9})
    rows.append({"session": 0, "backend": "multiprocessing.Pool",
                 "unavailable": "unavailable: OSError: no"})
    out = report(rows, ["ProcessPoolExecutor", "multiprocessing.Pool"], ["W5", "W3"])
    lines = out.splitlines()
    assert lines[2].startswith("| W5 p50_ms | ProcessPoolExecutor | 0.250 | 0.300 | 0.833× "
                               "| 20 of 20 | 1.9e-06 | **ahead** |"), lines[2]
    assert ("| W5 p50_ms | multiprocessing.Pool | — | — | — | — | — | multiprocessing.Pool: "
            "unavailable: OSError: no |") in out
    w3 = [x for x in lines if x.startswith("| W3 efficiency | ProcessPoolExecutor |")][0]
    assert "| 10 of 20 | 1 | **level** |" in w3
    assert "ratios to Pool" not in out  # Pool never ran


def test_duel_checks_pools_ratio_against_the_core_issues_target():
    from bench.duel import report
    rows = [{"session": 0, "pair": i, "workload": "W5", "backend": b, "value": v}
            for i in range(6) for b, v in (("pyworker", 0.5), ("multiprocessing.Pool", 0.2))]
    out = report(rows, ["multiprocessing.Pool"], ["W5"])
    assert "0 of 6 | 0.031 | **behind** |" in out
    assert "W5 2.50× (p50 ≤ 2× Pool: NOT met)" in out
    rows.append({"session": 0, "backend": "pyworker", "workload": "W4", "error": "E: numpy"})
    assert "| W4 mb_per_s | multiprocessing.Pool | — | — | — | — | — | pyworker: E: numpy |" \
        in report(rows, ["multiprocessing.Pool"], ["W5", "W4"])


def test_duel_refuses_what_it_cannot_compare(capsys):
    import pytest
    from bench.duel import main
    for argv in (["--workloads", "W2"], ["--peers", "pyworker"], ["--peers", "nope"],
                 ["--pairs", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2, argv
    err = capsys.readouterr().err
    assert "W2 sleeps" in err and "unknown peer(s) ['nope']" in err
