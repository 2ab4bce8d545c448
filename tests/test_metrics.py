"""Metric math on hand-made timestamps (the README's definitions), and the cross-benchmark columns."""
import re

import pytest

from llm_bench.metrics import (
    MeasurementError,
    bandwidth_use,
    decode_bytes_per_step,
    derive_columns,
    request_timings,
    summarize,
)

MS = 1_000_000


def test_request_timings():
    r = request_timings(0, [10 * MS, 12 * MS, 15 * MS, 16 * MS])
    assert r["ttft_ms"] == 10 and r["e2e_ms"] == 16
    assert r["itl_ms"] == [2, 3, 1]
    assert r["tpot_ms"] == pytest.approx((16 - 10) / 3)


def test_one_token_output_has_no_tpot_or_itl():
    r = request_timings(5 * MS, [9 * MS])
    assert r["ttft_ms"] == 4 and r["tpot_ms"] is None and r["itl_ms"] == []
    s = summarize([[r]])
    assert s["ttft_ms_p50"] == 4 and "tpot_ms_mean" not in s and "itl_ms_p50" not in s
    assert s["tok_per_s"] == pytest.approx(1 / 0.004)


def test_batch_and_rounds_pool_requests():
    # Two rounds of a batch of 2: every request of a round sees the same step times.
    rnd1 = [request_timings(0, [10 * MS, 20 * MS, 30 * MS])] * 2
    rnd2 = [request_timings(0, [20 * MS, 24 * MS, 28 * MS])] * 2
    s = summarize([rnd1, rnd2])
    assert s["n_requests"] == 4
    assert s["ttft_ms_mean"] == 15 and s["ttft_ms_p50"] == 15
    assert s["itl_ms_mean"] == pytest.approx(7)  # pooled gaps 10,10,10,10,4,4,4,4
    assert s["tpot_ms_rounds"] == [10, 4]
    assert s["tok_per_s_rounds"] == [pytest.approx(6 / 0.030), pytest.approx(6 / 0.028)]
    assert s["decode_tok_per_s"] == pytest.approx(1e3 / 7 * 2)


def test_backwards_clock_is_caught():
    with pytest.raises(MeasurementError):
        request_timings(0, [5 * MS, 4 * MS])


def test_bandwidth_use_and_broken_measurement():
    per_step = decode_bytes_per_step(16e9, 131072, 1, 128, 128)
    assert per_step == 16e9 + 131072 * 192
    assert bandwidth_use(per_step, 5.0, 4.2e12) == pytest.approx(per_step / 5e-3 / 4.2e12)
    with pytest.raises(MeasurementError, match="> 1.0"):
        bandwidth_use(per_step, 1.0, 4.2e12)


def _row(name, **e):
    base = dict(engine="builtin", model="m", batch_size=1, prompt_len=8, output_len=8, overlap="none")
    return {"name": name, "extra_info": {**base, **e}}


def test_scaling_efficiency_and_missing_base():
    rows = [_row("test_tensor_parallel[tp1-bs1]", tp=1, tpot_ms_p50=10.0, tok_per_s=100.0),
            _row("test_tensor_parallel[tp2-bs1]", tp=2, tpot_ms_p50=6.0, tok_per_s=160.0),
            _row("test_tensor_parallel[tp4-bs1]", tp=4, tpot_ms_p50=4.0, tok_per_s=240.0),
            _row("test_tensor_parallel[tp4-bs16]", tp=4, tpot_ms_p50=5.0, batch_size=16)]
    derive_columns(rows)
    e = [r["extra_info"] for r in rows]
    assert e[0]["speedup"] == 1 and e[0]["scaling_efficiency"] == 1
    assert e[1]["speedup"] == pytest.approx(10 / 6) and e[1]["scaling_efficiency"] == pytest.approx(10 / 6 / 2)
    assert e[2]["scaling_efficiency"] == pytest.approx(0.625) and e[2]["throughput_ratio"] == 2.4
    # Only TP=4 measured at batch 16: it is its own base (efficiency relative to TP=4).
    assert e[3]["scaling_base_tp"] == 4 and e[3]["scaling_efficiency"] == 1
    before = [dict(x) for x in e]
    derive_columns(rows)  # idempotent: update_json can run twice
    assert [r["extra_info"] for r in rows] == before


def test_overlap_gain_and_hidden_share():
    rows = [_row("test_overlap[none-tp2-bs16]", tp=2, overlap="none", tpot_ms_p50=10.0, tpot_ms_comm_free=8.0),
            _row("test_overlap[full-tp2-bs16]", tp=2, overlap="full", tpot_ms_p50=9.0, tpot_ms_comm_free=8.0)]
    derive_columns(rows)
    n, f = rows[0]["extra_info"], rows[1]["extra_info"]
    assert n["comm_share"] == pytest.approx(0.2) and n["overlap_gain"] == 0
    assert "comm_hidden_share" not in n  # none hides nothing by definition: no row of its own
    assert f["overlap_gain"] == pytest.approx(10 / 9 - 1)
    assert f["comm_hidden_share"] == pytest.approx(0.5)  # exposed 1 ms of none's 2 ms


@pytest.mark.parametrize("mode, mode_cf, why", [
    (12.0, 8.0, "exposes more communication"),       # a mode slower than none: hidden share would be < 0
    (9.0, 9.5, "faster .* than its own comm-free"),  # mode faster than its comm-free variant: > 1
])
def test_hidden_share_outside_0_1_is_not_stored(mode, mode_cf, why):
    rows = [_row("test_overlap[none-tp2-bs8]", tp=2, overlap="none", tpot_ms_p50=10.0, tpot_ms_comm_free=8.0),
            _row("test_overlap[pipeline-tp2-bs8]", tp=2, overlap="pipeline", tpot_ms_p50=mode,
                 tpot_ms_comm_free=mode_cf)]
    derive_columns(rows)
    e = rows[1]["extra_info"]
    assert "comm_hidden_share" not in e
    assert re.search(why, e["comm_hidden_share_note"])


def test_comm_share_of_a_slower_comm_free_variant_is_not_stored():
    rows = [_row("test_overlap[pipeline-tp2-bs8]", tp=2, overlap="pipeline", tpot_ms_p50=10.0, tpot_ms_comm_free=12.5,
                 ttft_ms_p50=100.0, ttft_ms_comm_free=90.0)]
    derive_columns(rows)
    e = rows[0]["extra_info"]
    assert "comm_share" not in e and "slower than the real run" in e["comm_share_note"]
    assert e["prefill_comm_share"] == pytest.approx(0.1)


def test_prefill_gain_and_hidden_share_come_from_ttft():
    rows = [_row("test_overlap[none-tp2-bs8]", tp=2, overlap="none", ttft_ms_p50=110.0, ttft_ms_comm_free=96.0),
            _row("test_overlap[pipeline-tp2-bs8]", tp=2, overlap="pipeline", ttft_ms_p50=100.0, ttft_ms_comm_free=93.0)]
    derive_columns(rows)
    e = rows[1]["extra_info"]
    assert e["prefill_overlap_gain"] == pytest.approx(110 / 100 - 1)
    assert e["prefill_comm_hidden_share"] == pytest.approx(1 - 7 / 14)


@pytest.mark.parametrize("bad", [0.0, -5.0, float("inf"), float("nan"), "5", None, 10 ** 400])
def test_derived_columns_from_broken_inputs_are_notes_not_numbers(bad):
    """The plugin derives columns from live data: a TPOT or comm-free time that is 0, negative, not
    finite or not a number gives a note, never a ZeroDivisionError, a TypeError or a share outside [0, 1]."""
    rows = [_row("test_tensor_parallel[tp1-bs1]", tp=1, tpot_ms_p50=bad, tpot_ms_comm_free=8.0),
            _row("test_tensor_parallel[tp2-bs1]", tp=2, tpot_ms_p50=6.0, tpot_ms_comm_free=bad),
            _row("test_overlap[none-tp2-bs8]", tp=2, overlap="none", tpot_ms_p50=bad, tpot_ms_comm_free=8.0),
            _row("test_overlap[full-tp2-bs8]", tp=2, overlap="full", tpot_ms_p50=9.0, tpot_ms_comm_free=bad)]
    derive_columns(rows)
    e = [r["extra_info"] for r in rows]
    assert "comm_share" not in e[0] and "not both finite and above 0" in e[0]["comm_share_note"]
    assert "comm_share" not in e[1] and "comm_share_note" in e[1]
    assert "scaling_efficiency" not in e[0] and "no speedup" in e[0]["scaling_efficiency_note"]
    assert e[1]["scaling_efficiency"] == 1.0  # TP=2 is its own base: the broken TP=1 is no base
    assert "overlap_gain" not in e[3] and "overlap_gain_note" in e[3]
    assert "comm_hidden_share" not in e[3] and "not all finite and above 0" in e[3]["comm_hidden_share_note"]


def test_derived_columns_with_unhashable_lengths_do_not_raise():
    rows = [_row("test_tensor_parallel[tp1-bs1]", tp=1, tpot_ms_p50=10.0, prompt_len=[8]),
            _row("test_tensor_parallel[tp2-bs1]", tp=[2], tpot_ms_p50=6.0),
            _row("test_overlap[none-tp2-bs8]", tp=[2], overlap="none", tpot_ms_p50=10.0, output_len={"a": 1})]
    derive_columns(rows)
    assert rows[0]["extra_info"]["scaling_efficiency"] == 1.0
    assert "no speedup" in rows[1]["extra_info"]["scaling_efficiency_note"]


def test_shares_of_broken_times_are_notes():
    from llm_bench.metrics import comm_share, hidden_share

    assert comm_share("10", 8.0)[0] is None and comm_share(float("inf"), 8.0)[0] is None
    assert comm_share(10.0, 0.0)[0] is None and comm_share(10.0, 8.0) == (pytest.approx(0.2), None)
    assert hidden_share(9.0, 8.0, float("inf"), 8.0)[0] is None and hidden_share(9.0, 8.0, 10.0, "8")[0] is None


def test_bandwidth_use_of_a_zero_tpot_is_a_broken_measurement():
    with pytest.raises(MeasurementError, match="both must be finite and above 0"):
        bandwidth_use(1e9, 0.0, 4.2e12)


def test_every_token_in_one_chunk_has_no_tpot():
    """A stream that delivered 4 tokens in one chunk: E2E = TTFT, no time to divide: TPOT undefined, not 0."""
    r = request_timings(0, [10 * MS], n_out=4)
    assert r["tpot_ms"] is None and r["ttft_ms"] == r["e2e_ms"] == 10
