"""The autoscaling policy of the live replicas (``avatar.scale.policy``), driven with Serve's own context object."""

from __future__ import annotations

from typing import Any

import pytest

from avatar.scale.policy import SessionPolicy, desired_replicas


def test_desired_replicas_keep_a_spare_slot() -> None:
    # capacity 2 per replica, one spare slot: a replica is added when the last one fills up
    assert [desired_replicas(n, [2.0], None, 1) for n in range(6)] == [1, 1, 2, 2, 3, 3]
    # no spare: scale on demand only; an explicit target overrides the capacity
    assert [desired_replicas(n, [2.0], None, 0) for n in range(5)] == [0, 1, 1, 2, 2]
    assert [desired_replicas(n, [8.0], 3, 0) for n in (3, 4, 7)] == [1, 2, 3]
    # averaged counts with float noise do not add a replica
    assert desired_replicas(1.0000000001, [2.0], None, 1) == 1


def test_policy_reads_the_replicas_reports_from_serves_context() -> None:
    serve_config = pytest.importorskip("ray.serve.config")

    def ctx(sessions: dict[str, float], capacity: dict[str, float], current: int) -> Any:
        return serve_config.AutoscalingContext(
            deployment_id=None, deployment_name="avatar-replica", app_name="avatar", current_num_replicas=current,
            target_num_replicas=current, running_replicas=list(sessions), total_num_requests=0.0,
            total_queued_requests=0.0, aggregated_metrics={"sessions": sessions, "capacity": capacity},
            raw_metrics=None, capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=4, policy_state={},
            last_scale_up_time=None, last_scale_down_time=None, current_time=None, config=None)

    policy = SessionPolicy(spare_sessions=1)
    assert policy(ctx({"a": 1.0}, {"a": 2.0}, 1))[0] == 1
    assert policy(ctx({"a": 2.0}, {"a": 2.0}, 1))[0] == 2
    assert policy(ctx({"a": 2.0, "b": 2.0}, {"a": 2.0, "b": 2.0}, 2))[0] == 3
    assert policy(ctx({"a": 0.0, "b": 0.0}, {"a": 2.0, "b": 2.0}, 2))[0] == 1
    assert SessionPolicy(sessions_per_replica=1, spare_sessions=0)(ctx({"a": 3.0}, {"a": 8.0}, 1))[0] == 3
    # replicas that have not reported yet: keep the count
    assert policy(ctx({}, {}, 2))[0] == 2
