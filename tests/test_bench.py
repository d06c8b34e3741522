"""Helpers of the GPU benchmarks that run without a GPU."""

from bench.profile_decode import idle_gaps


def test_idle_gaps_split_launch_gaps_from_host_round_trips():
    ev = lambda ts, dur: {"ts": ts, "dur": dur}
    events = [ev(0, 10), ev(12, 5), ev(15, 3),  # a gap of 2, then an overlap (no gap)
              ev(16, 10),  # overlaps the one before: no gap
              ev(100, 4),  # 74 us after the last end (26): a host round trip
              ev(107, 1)]  # 3
    assert idle_gaps(list(reversed(events))) == (5.0, 2, 74.0, 1)
    assert idle_gaps([]) == (0.0, 0, 0.0, 0)
