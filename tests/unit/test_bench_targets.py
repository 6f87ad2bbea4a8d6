"""What the benchmark claims: bench.run.evaluate_targets on hand-made results."""

from __future__ import annotations

from typing import Any

from bench.run import evaluate_targets

MiB = 1 << 20
LOOP = {"gb_per_s": 4.0}


def run(anchor: str, status: str = "ok", **fields: Any) -> dict[str, Any]:
    return {"anchor": anchor, "status": status, "params": {"mib": 1024}, **fields}


def fl_large(**fields: Any) -> dict[str, Any]:
    base = {
        "seconds_per_round": 10.0,
        "bytes_moved_per_round": 4 * 1024 * MiB,
        "peak_server_rss_bytes": 1300 * MiB,
        "final_check": {"exact": True},
    }
    return run("fl", **{**base, **fields})


def by_target(targets: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {t["target"].split(": ", 1)[1]: t for t in targets}


SPEED = "fl at least 5x faster per round than the faster anchor that finishes"


def test_speed_is_against_the_faster_anchor_that_finished() -> None:
    runs = [fl_large(), run("nvflare", seconds_per_round=36.0), run("flower", "did not finish", seconds_per_round=5.0)]
    t = by_target(evaluate_targets({"large --mib 1024": runs}, LOOP))
    assert t[SPEED]["holds"] is False
    assert "nvflare 36.00 s: 3.6x" in t[SPEED]["figures"]
    assert by_target(evaluate_targets({"large --mib 1024": [fl_large(seconds_per_round=7.0), runs[1]]}, LOOP))[SPEED][
        "holds"
    ]


def test_anchors_that_all_failed_count_for_fl_but_no_anchors_claim_nothing() -> None:
    failed = [fl_large(), run("nvflare", "did not finish: memory cap"), run("flower", "did not finish: memory cap")]
    t = by_target(evaluate_targets({"large --mib 1024": failed}, LOOP))
    assert t[SPEED]["holds"] is True and "no anchor finished" in t[SPEED]["figures"]
    alone = by_target(evaluate_targets({"large --mib 1024": [fl_large()]}, LOOP))
    assert SPEED not in alone  # fl alone (--anchors ""): not measured, so not claimed
    assert "server peak RSS under 3x the model" in alone


def test_loopback_and_memory_targets() -> None:
    t = by_target(evaluate_targets({"large --mib 1024": [fl_large()]}, LOOP))
    loop = t["fl within 3x of the loopback limit"]
    assert loop["holds"] is False and "9.3x" in loop["figures"]  # 10 s vs 4 GiB / 4 GB/s = 1.07 s
    assert t["server peak RSS under 3x the model"]["holds"] is True
    fat = by_target(evaluate_targets({"large --mib 1024": [fl_large(peak_server_rss_bytes=3100 * MiB)]}, LOOP))
    assert fat["server peak RSS under 3x the model"]["holds"] is False


def test_a_wrong_result_is_never_a_success() -> None:
    wrong = fl_large(final_check={"exact": False})
    t = evaluate_targets({"large --mib 1024": [wrong, run("nvflare", seconds_per_round=36.0)]}, LOOP)
    assert [x["holds"] for x in t] == [False]
    assert t[0]["target"].endswith("fl finishes with exact values")


def test_overhead_targets() -> None:
    runs = [
        run("fl", wall_s=6.0, framework_seconds_per_round=0.03),
        run("nvflare", wall_s=35.0),
        run("flower", wall_s=24.0),
    ]
    t = by_target(evaluate_targets({"overhead": runs}, LOOP))
    assert t["fl wall time <= 1/3 of the faster anchor's"]["holds"] is True
    assert "flower 24.0 s: 0.25x" in t["fl wall time <= 1/3 of the faster anchor's"]["figures"]
    assert t["under 0.5 s of framework time per round"]["holds"] is True
    runs[0]["wall_s"] = 9.0
    assert not by_target(evaluate_targets({"overhead": runs}, LOOP))["fl wall time <= 1/3 of the faster anchor's"][
        "holds"
    ]
