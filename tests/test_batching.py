"""The shared audio-encoder front: concurrent requests run as one call, each caller gets its own rows."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from avatar.batching import CallBatcher
from avatar.errors import ConfigError


def _pair_calls(batcher: CallBatcher, xs: list[np.ndarray]) -> list[np.ndarray]:
    """Each x from its own thread: a solo call first (so each thread counts as active), then all at once."""
    out: list[np.ndarray | None] = [None] * len(xs)
    gate = threading.Barrier(len(xs))

    def work(i: int) -> None:
        batcher(xs[i][:1], deadline=time.monotonic())  # due now: it never waits for the others
        gate.wait()
        out[i] = batcher(xs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return [o for o in out if o is not None]


def test_concurrent_requests_share_one_call_and_get_their_own_rows() -> None:
    calls: list[int] = []

    def fn(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        return x * 2.0 + 1.0

    b = CallBatcher(fn, max_batch=7, max_wait_s=5.0)  # the batch fills long before 5 s
    xs = [np.full((3, 2), i, np.float32) + np.arange(3, dtype=np.float32)[:, None] for i in range(2)]
    xs.append(np.full((1, 2), 9, np.float32))
    got = _pair_calls(b, xs)
    assert len(got) == 3
    for x, y in zip(xs, got):
        np.testing.assert_array_equal(y, x * 2.0 + 1.0)
    # 3 solo warm-up rows (some may have ridden together) + the 7 rows of the concurrent requests in one call
    assert 7 in b.stats.batch_sizes and b.stats.shared_calls >= 1
    assert sum(calls) == 3 + 7 and b.stats.items == 10


def test_a_lone_caller_never_waits_and_zero_wait_does_not_gather() -> None:
    b = CallBatcher(lambda x: x + 1, max_batch=64, max_wait_s=5.0)
    t = time.monotonic()
    for _ in range(5):
        b(np.zeros((1, 4), np.float32))
    assert time.monotonic() - t < 2.0  # 5 s per call if a lone caller waited
    assert b.stats.calls == 5 and b.stats.shared_calls == 0

    # max_wait_s=0: a leader takes what is already there, so concurrent callers mostly go alone
    started = threading.Event()
    release = threading.Event()

    def slow(x: np.ndarray) -> np.ndarray:
        started.set()
        release.wait(5)
        return x

    b0 = CallBatcher(slow, max_batch=64, max_wait_s=0.0)
    tA = threading.Thread(target=b0, args=(np.zeros((2, 1), np.float32),))
    tA.start()
    started.wait(5)  # A is inside its call, alone: it did not wait for B
    tB = threading.Thread(target=b0, args=(np.ones((3, 1), np.float32),))
    tB.start()
    time.sleep(0.05)
    release.set()
    tA.join(5)
    tB.join(5)
    assert b0.stats.batch_sizes == {2: 1, 3: 1}


def test_deadline_cuts_the_wait_and_errors_reach_every_caller() -> None:
    b = CallBatcher(lambda x: x, max_batch=64, max_wait_s=30.0)
    other = threading.Thread(target=b, args=(np.zeros((1, 1)),))
    other.start()
    other.join(5)  # another thread is now active: a partial batch would wait up to 30 s ...
    t = time.monotonic()
    b(np.zeros((1, 1)), deadline=time.monotonic() + 0.05)  # ... but not past its deadline
    assert time.monotonic() - t < 5.0

    def broken(x: np.ndarray) -> np.ndarray:
        raise ConfigError("encoder failed")

    bad = CallBatcher(broken, max_batch=8, max_wait_s=0.0)
    with pytest.raises(ConfigError, match="encoder failed"):
        bad(np.zeros((1, 1)))
    assert bad.stats.calls == 0


# --------------------------------------------------------------------------- the AVE encoder, shared by sessions

ort = pytest.importorskip("onnxruntime")


def _speechish(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    voiced = sum(np.sin(2 * np.pi * k * (110 + 30 * seed) * t) / k for k in range(1, 8))
    return (0.2 * np.clip(np.sin(2 * np.pi * 3 * t), 0, None) * voiced + 0.01 * rng.standard_normal(n)).astype(np.float32)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from avatar.models.synthetic import make_audio_encoder

    return make_audio_encoder(tmp_path_factory.mktemp("enc") / "enc.onnx", seed=3, tiny=True)


def _rows(stream, pcm: np.ndarray, chunk: int, pace: float = 0.0) -> np.ndarray:  # type: ignore[no-untyped-def]
    parts = []
    for i in range(0, len(pcm), chunk):
        parts.append(stream.push(pcm[i : i + chunk]))
        if pace:
            time.sleep(pace)
    parts.append(stream.finish())
    return np.concatenate(parts)


def test_ave_sessions_share_encoder_calls_with_exact_features(encoder) -> None:  # type: ignore[no-untyped-def]
    from avatar.plugins import get_plugin_manager

    pm = get_plugin_manager()
    pcms = [_speechish(16000 * 2, seed) for seed in range(3)]
    alone = pm.feature_source("ave", encoder=encoder, batch_wait_s=0)
    try:
        expected = [_rows(alone.open_stream(), p, 320) for p in pcms]
        solo_calls, solo_items = alone.batcher.stats.calls, alone.batcher.stats.items
    finally:
        alone.close()

    shared = pm.feature_source("ave", encoder=encoder, batch_wait_s=0.05)
    try:
        got: list[np.ndarray | None] = [None] * 3
        gate = threading.Barrier(3)

        def session(i: int) -> None:
            s = shared.open_stream()
            gate.wait()
            got[i] = _rows(s, pcms[i], 320, pace=0.002)  # 20 ms chunks, as a live client sends them

        threads = [threading.Thread(target=session, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        st = shared.batcher.stats
    finally:
        shared.close()
    for e, g in zip(expected, got):
        assert g is not None and g.shape == e.shape
        np.testing.assert_allclose(g, e, atol=1e-5, rtol=0)
    # the same windows in far fewer calls, several sessions' windows per call
    assert st.items == solo_items
    assert st.shared_calls > 0 and max(st.batch_sizes) >= 2
    assert st.calls < solo_calls * 3 * 0.75


def test_ave_batch_wait_option_is_checked(encoder) -> None:  # type: ignore[no-untyped-def]
    from avatar.plugins import get_plugin_manager

    with pytest.raises(ConfigError, match="batch_wait_s"):
        get_plugin_manager().feature_source("ave", encoder=encoder, batch_wait_s=-1)
