"""Collapse monitor: a plateau at log K with collapsed keys is reported once, after a stretch; the end state
is judged on the last row; warm-up rows and spread keys never count."""

from __future__ import annotations

import math

from ressl.monitor import COLLAPSED_FRACTION, LOSS_TOLERANCE, SPREAD_FRACTION, CollapseMonitor

K, D = 128, 128
LOG_K, SPREAD = math.log(K), 1 / math.sqrt(D)


def monitor(total: int = 1000, log_every: int = 10, warmup: int = 0) -> CollapseMonitor:
    return CollapseMonitor(queue_size=K, proj_dim=D, total_steps=total, log_every=log_every,
                           warmup_infonce_epochs=warmup)


def feed(m: CollapseMonitor, rows) -> list[tuple[int, str]]:
    out = []
    for step, loss, std, *w in rows:
        msg = m.observe(step, loss, std, *w)
        if msg:
            out.append((step, msg))
    return out


def test_plateau_is_reported_once_after_a_stretch_and_names_cause_and_remedy():
    m = monitor()  # stretch: 10% of 1000 steps
    stuck = [(s, LOG_K * 0.998, 0.9 * SPREAD_FRACTION * SPREAD) for s in range(10, 600, 10)]
    warnings = feed(m, [(5, 3.0, SPREAD)] + stuck + [(600, LOG_K * 0.9, 0.5 * SPREAD)])
    assert [s for s, _ in warnings] == [110]  # first stuck row at 10, reported 100 steps later, once
    msg = warnings[0][1]
    assert "log K = 4.852" in msg and "nearly identical" in msg and "small queue" in msg
    assert "warmup_infonce_epochs=4" in msg
    v = m.verdict()
    assert v["plateau"]["from_step"] == 10 and v["plateau"]["to_step"] == 590 and v["plateau"]["left_at"] == 600
    assert not v["collapsed"] and v["message"] is None  # it left the plateau with spread keys


def test_no_report_for_spread_keys_for_a_loss_away_from_log_k_or_for_warm_up_rows():
    m = monitor()
    assert not feed(m, [(s, LOG_K, 0.5 * SPREAD) for s in range(10, 500, 10)])  # keys spread
    assert not feed(m, [(s, LOG_K * (1 - 2 * LOSS_TOLERANCE), 0.1 * SPREAD) for s in range(500, 990, 10)])
    m = monitor()
    assert not feed(m, [(s, LOG_K, 0.1 * SPREAD, 1.0) for s in range(10, 990, 10)])  # InfoNCE warm-up rows
    m = monitor()
    assert not feed(m, [(s, LOG_K, 0.1 * SPREAD, 0.0, False) for s in range(10, 990, 10)])  # w_rel = 0
    # an interrupted plateau starts its stretch again
    m = monitor()
    rows = [(s, LOG_K, 0.1 * SPREAD) for s in range(10, 100, 10)] + [(100, LOG_K, SPREAD)]
    rows += [(s, LOG_K, 0.1 * SPREAD) for s in range(110, 220, 10)]
    assert [s for s, _ in feed(m, rows)] == [210]


def test_end_state_is_judged_on_the_last_row_and_a_warm_up_already_set_is_lengthened():
    m = monitor(total=6, log_every=10, warmup=3)
    assert not feed(m, [(6, 2.08, 0.002)])  # too short for a plateau, but the keys ended collapsed
    v = m.verdict()
    assert v["collapsed"] and v["key_std"] == 0.002 and v["threshold"] == COLLAPSED_FRACTION * SPREAD
    assert "ended collapsed" in v["message"] and "warmup_infonce_epochs=6" in v["message"]
    assert not monitor().verdict()["collapsed"]  # nothing logged: no verdict of collapse
    m = monitor()
    feed(m, [(10, 1.0, 0.5 * (SPREAD_FRACTION + COLLAPSED_FRACTION) * SPREAD)])  # narrow, not collapsed
    assert not m.verdict()["collapsed"]


def test_state_survives_a_resume():
    a = monitor()
    feed(a, [(s, LOG_K, 0.1 * SPREAD) for s in range(10, 80, 10)])
    b = monitor()
    b.load_state_dict(a.state_dict())
    assert [s for s, _ in feed(b, [(s, LOG_K, 0.1 * SPREAD) for s in range(80, 200, 10)])] == [110]
