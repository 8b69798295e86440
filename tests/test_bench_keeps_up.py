"""benchmarks.streaming's keeps-up rule (pure Python: no Spark session is started)."""

from benchmarks.streaming import _keeps_up, _processing_rate


def _batches(*pairs):
    return [{"records": r, "seconds": s} for r, s in pairs]


# benchmarks/results/streaming.json, target 2 of 2026-12-02: sizes settle within 10% (239k after
# 222k) while 4,239 events/s are processed of 5,000 arriving
TARGET2 = _batches((25000, 28.17), (140849, 39.22), (196125, 44.41), (222056, 47.79), (238958, 56.85),
                   (107998, 39.75))


def test_settled_sizes_below_the_arrival_rate_do_not_keep_up():
    assert _processing_rate(TARGET2) == 4239
    assert not _keeps_up(TARGET2, True, 5000)
    assert _keeps_up(TARGET2, True, 4239)  # the sizes rule alone passes it


def test_rate_within_the_tolerance_keeps_up():
    # steady batches: 50,000 records in 10.1 s, 4,950 events/s (1% short of 5,000)
    batches = _batches((25000, 5.0), (25000, 5.05), (25000, 5.05), (10000, 2.0))
    assert _keeps_up(batches, True, 5000)
    assert not _keeps_up(batches, True, 5200)  # 4.8% short


def test_growing_or_incomplete_runs_do_not_keep_up():
    growing = _batches((5000, 1.0), (5000, 1.0), (6000, 0.5), (1000, 0.2))  # fast, but 20% bigger
    assert not _keeps_up(growing, True, 5000)
    settled = _batches((5000, 1.0), (5000, 1.0), (5000, 1.0), (1000, 0.2))
    assert _keeps_up(settled, True, 5000)
    assert not _keeps_up(settled, False, 5000)
    assert not _keeps_up(settled[:3], True, 5000)  # one steady batch: nothing to compare
