"""``avatar serve``'s application in this process (a real aiohttp server on loopback, real clients), where the
test can see its objects: a closed session is freed by reference counting alone, and the WebRTC peer contacts
no ICE server the operator did not give."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from typing import Any

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("aiortc")

from serve_process import free_port, recvonly_offer, tone

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from avatar.demo import build_demo
    from avatar.serve import AvatarSpec, Limits, ServeConfig, start_service

    paths = build_demo(tmp_path_factory.mktemp("release-demo"), tiny=True)
    spec = AvatarSpec("demo", paths["avatar"], paths["model"], "ave", {"encoder": str(paths["encoder"])})
    config = ServeConfig(avatars=(spec,), backend="cpu", max_sessions=3, limits=Limits(max_ahead_s=5))
    svc, capacity = start_service(config)
    yield config, svc, capacity


async def _serving(service: Any, fn: Any) -> Any:
    from aiohttp import web

    from avatar.serve.app import build_app

    config, svc, capacity = service
    app = build_app(config, svc, capacity)
    app.on_cleanup.clear()  # the module's service outlives this app
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        return await fn(app, f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()
        await app["api"].manager.stop()


def test_a_deleted_session_is_freed_without_the_cyclic_collector(service: Any) -> None:
    import aiohttp

    async def main(app: Any, url: str) -> list[list[bool]]:
        manager = app["api"].manager
        refs = []
        async with aiohttp.ClientSession() as c:
            for _ in range(3):
                async with c.post(url + "/v1/sessions", json={}) as r:
                    s = await r.json()
                server_session = manager.sessions[s["id"]]
                refs.append([weakref.ref(server_session), weakref.ref(server_session.live),
                             weakref.ref(server_session.live._s)])
                del server_session
                async with c.ws_connect(f"{url}/v1/sessions/{s['id']}/audio?token={s['token']}") as ws:
                    await ws.send_json({"type": "format", "sample_rate": 16000})
                    for _ in range(4):  # queued audio: frames in flight when it closes
                        await ws.send_bytes(tone(1.0).tobytes())
                    await asyncio.sleep(1.0)
                    async with c.delete(f"{url}/v1/sessions/{s['id']}",
                                        headers={"Authorization": f"Bearer {s['token']}"}) as r:
                        assert r.status == 200
                    assert (await ws.receive(timeout=5)).type.name in ("TEXT", "CLOSE", "CLOSED")
                await asyncio.sleep(0.5)
        await asyncio.sleep(0.5)
        return [[ref() is not None for ref in row] for row in refs], refs

    gc.collect()
    gc.disable()  # reference counting only: anything in a cycle stays
    try:
        alive, refs = asyncio.run(_serving(service, main))
        # the server's session and its engine wrapper, as soon as it is deleted
        assert all(row[:2] == [False, False] for row in alive), alive
        # the engine's session too, at the latest once the engine's threads have moved on (the server stopped)
        deadline = time.monotonic() + 5
        while any(row[2]() is not None for row in refs) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [row[2]() is None for row in refs] == [True] * len(refs), alive
    finally:
        gc.enable()


def test_no_ice_server_is_contacted_unless_configured(service: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """aiortc's default is a public STUN server; the server's peer gets exactly the ICE servers given (none)."""
    import aioice
    import aiohttp

    given: list[Any] = []
    real = aioice.Connection.__init__

    def spy(self: Any, *args: Any, **kw: Any) -> None:
        given.append((kw.get("stun_server"), kw.get("turn_server")))
        real(self, *args, **kw)

    monkeypatch.setattr(aioice.Connection, "__init__", spy)

    async def main(app: Any, url: str) -> dict[str, Any]:
        offer = await recvonly_offer()
        given.clear()  # only the server's own peer from here
        async with aiohttp.ClientSession() as c:
            async with c.post(url + "/v1/sessions", json={}) as r:
                s = await r.json()
            auth = {"Authorization": f"Bearer {s['token']}"}
            async with c.post(f"{url}/v1/sessions/{s['id']}/webrtc", json={"type": "offer", "sdp": offer},
                              headers=auth) as r:
                assert r.status == 200, await r.text()
            async with c.delete(f"{url}/v1/sessions/{s['id']}", headers=auth) as r:
                assert r.status == 200
        return s

    s = asyncio.run(_serving(service, main))
    assert s["ice_servers"] == []
    assert given and all(g == (None, None) for g in given), given
    # and a configured one is used, exactly
    from avatar.serve.webrtc import rtc_configuration

    assert [x.urls for x in rtc_configuration([{"urls": "stun:stun.example.org:3478"}]).iceServers] == \
        ["stun:stun.example.org:3478"]


def test_a_replaced_scheduler_thread_shows_in_metrics_and_health(service: Any) -> None:
    """A scheduler thread that dies is replaced (avatar.engine.scheduler); /metrics and /health count it."""
    import aiohttp

    async def main(app: Any, url: str) -> tuple[str, dict[str, Any]]:
        svc = app["api"].service
        async with aiohttp.ClientSession() as c:
            async with c.post(url + "/v1/sessions", json={}) as r:
                s = await r.json()
            sched = next(iter(svc._service._shared.values())).scheduler
            before = sched.stats.restarts
            real, once = sched.run_batch, [True]

            def broken(batch: Any) -> None:
                if once:
                    once.clear()
                    raise RuntimeError("a bug in the scheduler's loop")
                real(batch)

            sched.run_batch = broken
            try:
                async with c.ws_connect(f"{url}/v1/sessions/{s['id']}/audio?token={s['token']}") as ws:
                    await ws.send_json({"type": "format", "sample_rate": 16000})
                    await ws.send_bytes(tone(1.0).tobytes())
                    for _ in range(100):
                        if sched.stats.restarts > before:
                            break
                        await asyncio.sleep(0.05)
            finally:
                sched.run_batch = real
            async with c.get(url + "/metrics") as r:
                metrics = await r.text()
            async with c.get(url + "/health") as r:
                health = await r.json()
            async with c.delete(f"{url}/v1/sessions/{s['id']}", headers={"Authorization": f"Bearer {s['token']}"}):
                pass
        return metrics, health

    metrics, health = asyncio.run(_serving(service, main))
    restarts = next(float(x.split()[1]) for x in metrics.splitlines() if x.startswith("avatar_scheduler_restarts "))
    dead = next(float(x.split()[1]) for x in metrics.splitlines() if x.startswith("avatar_schedulers_dead "))
    assert restarts >= 1 and dead == 0, metrics
    assert any(x["restarts"] >= 1 and x["alive"] for x in health["engine"]["schedulers"]), health
