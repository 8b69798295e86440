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
    # the sizes alone: 239k is within 10% of the 222k before it, not of the 196k median before it
    assert not _keeps_up(TARGET2, True, 4239)


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


# benchmarks/results/streaming.json, target 1 of session 40: sizes hover around 10k records after the
# ramp from the first batch; the last full batch is 12% bigger than the one before it (a quicker
# batch before that), 5.5% above the median
TARGET1 = _batches((5000, 14.07), (14071, 11.88), (11885, 10.41), (10411, 9.7), (9704, 9.96), (9957, 9.54),
                   (9540, 9.98), (9984, 9.69), (9687, 9.52), (9516, 10.4), (10397, 10.25), (10247, 10.22),
                   (10225, 9.82), (9817, 9.67), (9666, 10.12), (10116, 9.29), (9290, 10.44), (10444, 10.33),
                   (9602, 10.61))


def test_sizes_that_hover_keep_up():
    assert _processing_rate(TARGET1) == 1022
    assert _keeps_up(TARGET1, True, 1000)
    grown = TARGET1[:-2] + _batches((12000, 12.0), (9602, 10.61))  # 21% above the median
    assert not _keeps_up(grown, True, 1000)
