"""The ping-pong frame schedule."""

from __future__ import annotations

import numpy as np
import pytest

from avatar.errors import ConfigError
from avatar.schedule import pingpong, schedule


def test_pingpong_walks_forward_then_back_without_repeating_the_ends() -> None:
    assert [pingpong(i, 4) for i in range(13)] == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3, 2, 1, 0]
    assert [pingpong(i, 2) for i in range(5)] == [0, 1, 0, 1, 0]


def test_single_frame_avatar_is_always_frame_zero() -> None:
    assert {pingpong(i, 1) for i in range(50)} == {0}
    assert schedule(7, 1).tolist() == [0] * 7


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17])
def test_schedule_matches_pingpong_and_moves_by_one(n: int) -> None:
    s = schedule(100, n)
    assert s.dtype == np.int64
    assert s.tolist() == [pingpong(i, n) for i in range(100)]
    assert s.min() == 0 and s.max() == n - 1
    if n > 1:
        assert set(np.abs(np.diff(s)).tolist()) == {1}  # the motion never jumps


def test_schedule_start_continues_the_walk() -> None:
    whole = schedule(40, 6)
    assert np.array_equal(np.concatenate([schedule(13, 6), schedule(27, 6, start=13)]), whole)
    assert not np.array_equal(schedule(10, 6, start=3), schedule(10, 6))  # start has an effect


def test_schedule_of_nothing_is_empty() -> None:
    assert schedule(0, 5).shape == (0,)


@pytest.mark.parametrize("args", [(3, 0), (-1, 3), (3, 5, -1)])
def test_bad_arguments_raise_config_error(args: tuple[int, ...]) -> None:
    with pytest.raises(ConfigError):
        schedule(*args)


def test_pingpong_rejects_empty_avatar_and_negative_index() -> None:
    with pytest.raises(ConfigError):
        pingpong(0, 0)
    with pytest.raises(ConfigError):
        pingpong(-1, 3)
