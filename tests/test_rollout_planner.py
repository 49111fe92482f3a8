"""The rollout planner, table-driven: wave sizes, gates, failure threshold, commands, joins and leaves."""

from __future__ import annotations

from dataclasses import replace

import pytest

from server.rollouts import (
    Assign,
    Baseline,
    DeviceView,
    Gates,
    Metrics,
    Observation,
    Revert,
    RolloutSpec,
    RolloutView,
    State,
    apply_command,
    evaluate_gates,
    plan,
    wave_sizes,
)

NEW, OLD = "a" * 64, "b" * 64
SPEC = RolloutSpec(soak_s=10, install_timeout_s=60, gates=Gates(min_requests=10, min_drift_windows=0))
GOOD = Metrics(requests=100, errors=1, p95_ms=5.0)
BASE = Metrics(requests=1000, errors=10, p95_ms=5.0)


@pytest.mark.parametrize(("waves", "n", "expected"), [
    (("1", "10%", "50%", "100%"), 0, [0]),
    (("1", "10%", "50%", "100%"), 1, [1]),
    (("1", "10%", "50%", "100%"), 2, [1, 2]),
    (("1", "10%", "50%", "100%"), 7, [1, 2, 4, 7]),
    (("1", "10%", "50%", "100%"), 20, [1, 2, 10, 20]),
    (("1", "10%", "50%", "100%"), 1000, [1, 100, 500, 1000]),
    (("5", "100%"), 3, [3]),
    (("50%",), 3, [2, 3]),
    (("33.3%", "66.6%"), 10, [4, 7, 10]),
    (("2", "1", "100%"), 10, [2, 3, 10]),
    (("100%",), 13, [13]),
])
def test_wave_sizes(waves, n, expected):
    assert wave_sizes(waves, n) == expected


@pytest.mark.parametrize("bad", [(), ("0",), ("-1",), ("10 %",), ("101%",), ("abc",), tuple(["1"] * 21)])
def test_bad_wave_specs_are_refused(bad):
    with pytest.raises(ValueError, match="wave"):
        RolloutSpec(waves=bad)


def test_all_at_once_is_one_wave():
    assert RolloutSpec(strategy="all-at-once").effective_waves() == ("100%",)


def fleet(n: int, *, online: bool = True, running: str | None = OLD) -> dict[str, DeviceView]:
    return {f"d{i:02d}": DeviceView(f"d{i:02d}", online, running, "art" if running else None, "done", None, running)
            for i in range(n)}


def obs(devices: dict[str, DeviceView], *, target=None, new: Metrics = GOOD, baseline: Metrics | None = BASE):
    return Observation(tuple(sorted(devices) if target is None else target), devices, new, baseline)


def start(n: int = 20, spec: RolloutSpec = SPEC, devices=None):
    devices = devices or fleet(n)
    view = RolloutView("r", State.PENDING, 0, None, spec, NEW, None)
    return plan(view, obs(devices), 1000.0), devices


def installed(devices: dict[str, DeviceView], ids) -> dict[str, DeviceView]:
    return {**devices, **{i: replace(devices[i], running_manifest=NEW, desired_manifest=NEW, install_step="done")
                          for i in ids}}


def drive(view, devices, now, metrics=GOOD, baseline=BASE):
    """Step until nothing changes any more at ``now``: devices install what they are assigned at once."""
    for _ in range(10):
        devices = installed(devices, [d for d, a in view.assignments.items() if a.state == "assigned"])
        p = plan(view, obs(devices, new=metrics, baseline=baseline), now)
        if p.rollout == view:
            return p, devices
        view = p.rollout
    return p, devices


def test_a_good_version_goes_through_every_wave_and_completes():
    p, devices = start(20)
    assert p.rollout.state is State.RUNNING and [a.device_id for a in p.actions] == ["d00"]
    assert [e[0] for e in p.events] == ["rollout.started", "rollout.wave_started"]
    view, now = p.rollout, 1000.0
    sizes = []
    while view.state is State.RUNNING:
        p, devices = drive(view, devices, now)
        view = p.rollout
        sizes.append(len(view.assignments))
        now += 11  # past the soak
    assert view.state is State.COMPLETED
    assert sorted(set(sizes)) == [1, 2, 10, 20]
    assert all(a.state == "installed" for a in view.assignments.values())


def test_no_gate_is_judged_before_the_soak_ends_and_then_all_are_recorded():
    p, devices = start(20)
    devices = installed(devices, ["d00"])
    soaking = plan(p.rollout, obs(devices), 1001.0)
    assert soaking.rollout.wave == 0 and soaking.gates == [] and soaking.rollout.assignments["d00"].state == "installed"
    judged = plan(soaking.rollout, obs(devices), 1012.0)
    assert judged.rollout.wave == 1 and {g.gate for g in judged.gates} == {"installed", "error_rate", "latency"}
    assert all(g.verdict == "pass" and g.wave == 0 for g in judged.gates)
    assert [a.device_id for a in judged.actions if isinstance(a, Assign)] == ["d01"]


@pytest.mark.parametrize(("new", "baseline", "gates", "verdicts"), [
    (GOOD, BASE, Gates(min_requests=10, min_drift_windows=0), {"error_rate": "pass", "latency": "pass"}),
    # a doubled error rate: 2 % against 1 %, margin 0.5 point
    (Metrics(100, 2, 5.0), BASE, Gates(error_margin=0.005, min_requests=10, min_drift_windows=0),
     {"error_rate": "fail", "latency": "pass"}),
    (Metrics(5, 0, 5.0), BASE, Gates(min_requests=10, min_drift_windows=0),
     {"error_rate": "insufficient", "latency": "insufficient"}),
    # no baseline: compared with zero errors, and with the budget only
    (Metrics(100, 1, 5.0), None, Gates(error_margin=0.02, min_requests=10, min_drift_windows=0),
     {"error_rate": "pass", "latency": "pass"}),
    (Metrics(100, 5, 5.0), None, Gates(error_margin=0.02, min_requests=10, min_drift_windows=0),
     {"error_rate": "fail", "latency": "pass"}),
    (Metrics(100, 0, 12.0), None, Gates(latency_budget_ms=10, min_requests=10, min_drift_windows=0),
     {"error_rate": "pass", "latency": "fail"}),
    (Metrics(100, 0, 6.5), BASE, Gates(latency_margin=0.2, min_requests=10, min_drift_windows=0),
     {"error_rate": "pass", "latency": "fail"}),
    (Metrics(100, 0, 5.9), BASE, Gates(latency_margin=0.2, min_requests=10, min_drift_windows=0),
     {"error_rate": "pass", "latency": "pass"}),
    (Metrics(100, 0, None), BASE, Gates(min_requests=10, min_drift_windows=0),
     {"error_rate": "pass", "latency": "insufficient"}),
    # drift: the share of drifting windows against the baseline's
    (Metrics(100, 0, 5.0, drift_windows=10, drifted_windows=6), Metrics(1000, 0, 5.0, 10, 0),
     Gates(min_requests=10, min_drift_windows=5, drift_margin=0.1), {"drift": "fail"}),
    (Metrics(100, 0, 5.0, drift_windows=10, drifted_windows=1), Metrics(1000, 0, 5.0, 10, 0),
     Gates(min_requests=10, min_drift_windows=5, drift_margin=0.1), {"drift": "pass"}),
    (Metrics(100, 0, 5.0, drift_windows=2, drifted_windows=0), None,
     Gates(min_requests=10, min_drift_windows=5), {"drift": "insufficient"}),
    # predictions: a model that answers wrongly without erroring shows in its class distribution
    (Metrics(100, 0, 5.0, 10, 0, output_windows=10, output_drifted=9), Metrics(1000, 0, 5.0, 10, 0, 10, 0),
     Gates(min_requests=10, min_drift_windows=5, drift_margin=0.1), {"drift": "pass", "predictions": "fail"}),
    (Metrics(100, 0, 5.0, 10, 0, output_windows=10, output_drifted=1), Metrics(1000, 0, 5.0, 10, 0, 10, 0),
     Gates(min_requests=10, min_drift_windows=5, drift_margin=0.1), {"predictions": "pass"}),
    (Metrics(100, 0, 5.0, 10, 0, output_windows=3, output_drifted=3), None,
     Gates(min_requests=10, min_drift_windows=5), {"predictions": "insufficient"}),
])
def test_gates(new, baseline, gates, verdicts):
    spec = RolloutSpec(gates=gates)
    results = {g.gate: g for g in evaluate_gates(spec, Observation((), {}, new, baseline))}
    assert {k: results[k].verdict for k in verdicts} == verdicts
    assert all(isinstance(g.numbers, dict) and g.numbers for g in results.values())  # the numbers are kept


def test_a_failing_gate_rolls_the_canary_back_with_its_numbers():
    p, devices = start(20)
    devices = installed(devices, ["d00"])
    soaked = plan(plan(p.rollout, obs(devices), 1001.0).rollout, obs(devices, new=Metrics(100, 10, 5.0)), 1012.0)
    assert soaked.rollout.state is State.ROLLING_BACK and "error_rate" in soaked.rollout.reason
    assert soaked.actions == [Revert("d00", OLD, "art")]
    failed = next(d for e, d in soaked.events if e == "rollout.wave_failed")
    assert any(g["gate"] == "error_rate" and g["verdict"] == "fail" and g["new_error_rate"] == 0.1
               for g in failed["gates"])
    # the device comes back to the old version: rolled back, and nothing more happens
    back = {**devices, "d00": replace(devices["d00"], running_manifest=OLD)}
    done = plan(soaked.rollout, obs(back), 1013.0)
    assert done.rollout.state is State.ROLLED_BACK and done.rollout.assignments["d00"].state == "reverted"
    assert plan(done.rollout, obs(back), 2000.0).actions == []


def test_a_failing_gate_pauses_when_the_policy_says_so():
    p, devices = start(20, SPEC.model_copy(update={"on_failure": "pause"}))
    devices = installed(devices, ["d00"])
    soaked = plan(plan(p.rollout, obs(devices), 1001.0).rollout, obs(devices, new=Metrics(100, 0, 50.0)), 1012.0)
    assert soaked.rollout.state is State.PAUSED and soaked.actions == []


def test_not_enough_data_waits_then_fails_after_the_longest_soak():
    p, devices = start(20)
    devices = installed(devices, ["d00"])
    view = plan(p.rollout, obs(devices), 1001.0).rollout
    thin = Metrics(3, 0, 5.0)
    waiting = plan(view, obs(devices, new=thin), 1015.0)
    assert waiting.rollout.state is State.RUNNING and waiting.rollout.wave == 0
    assert {g.verdict for g in waiting.gates if g.gate != "installed"} == {"insufficient"}
    still = plan(waiting.rollout, obs(devices, new=thin), 1001.0 + 3 * 10 + 1)  # 3 soaks, but under a minute
    assert still.rollout.state is State.RUNNING
    gave_up = plan(waiting.rollout, obs(devices, new=thin), 1001.0 + 10 + 60 + 1)
    assert gave_up.rollout.state is State.ROLLING_BACK and "not enough data" in gave_up.rollout.reason


@pytest.mark.parametrize(("threshold", "failures", "stops"), [
    (0.0, 0, False), (0.0, 1, True), (10.0, 1, False), (10.0, 2, True), (50.0, 5, False), (50.0, 6, True),
])
def test_failure_threshold_of_a_wave(threshold, failures, stops):
    spec = RolloutSpec(waves=("10", "100%"), soak_s=10, install_timeout_s=60, failure_threshold_pct=threshold,
                       gates=Gates(min_requests=10, min_drift_windows=0))
    p, devices = start(20, spec)
    bad = [f"d{i:02d}" for i in range(failures)]
    devices = installed(devices, [f"d{i:02d}" for i in range(failures, 10)])
    devices.update({d: replace(devices[d], install_step="failed", install_error="smoke test failed",
                               desired_manifest=NEW) for d in bad})
    after = plan(p.rollout, obs(devices), 1001.0)
    assert (after.rollout.state is State.ROLLING_BACK) == stops
    assert sum(a.error == "smoke test failed" for a in after.rollout.assignments.values()) == failures


def test_a_device_offline_throughout_times_out_and_counts_as_failed():
    devices = fleet(20)
    devices["d00"] = replace(devices["d00"], online=False)
    p, devices = start(20, devices=devices)
    assert [a.device_id for a in p.actions] == ["d01"]  # online devices are picked first
    # a one-device fleet has no choice: its only device is offline
    lone = {"d00": replace(fleet(1)["d00"], online=False)}
    first = plan(RolloutView("r", State.PENDING, 0, None, SPEC, NEW, None), obs(lone), 0.0)
    assert first.actions == [Assign("d00", 0)]
    assert plan(first.rollout, obs(lone), 59.0).rollout.state is State.RUNNING
    late = plan(first.rollout, obs(lone), 61.0)
    assert late.rollout.state is State.ROLLING_BACK
    assert late.rollout.assignments["d00"].error == "install timed out (device offline)"


def test_pause_stops_new_assignments_and_resume_restarts_the_soak():
    p, devices = start(20)
    devices = installed(devices, ["d00"])
    view = plan(p.rollout, obs(devices), 1001.0).rollout
    paused = apply_command(view, "pause", 1002.0)
    assert paused.rollout.state is State.PAUSED
    assert plan(paused.rollout, obs(devices), 1100.0).actions == []  # long past the soak: still nothing
    resumed = apply_command(paused.rollout, "resume", 1100.0).rollout
    assert resumed.state is State.RUNNING
    assert plan(resumed, obs(devices), 1105.0).rollout.wave == 0  # the soak counts from the resume
    assert plan(resumed, obs(devices), 1111.0).rollout.wave == 1


@pytest.mark.parametrize(("state", "command", "ok"), [
    (State.RUNNING, "pause", True), (State.PAUSED, "pause", False), (State.RUNNING, "resume", False),
    (State.PAUSED, "resume", True), (State.COMPLETED, "abort", False), (State.RUNNING, "abort", True),
    (State.COMPLETED, "rollback", True), (State.ROLLED_BACK, "rollback", False), (State.ABORTED, "resume", False),
    (State.RUNNING, "explode", False),
])
def test_commands_are_allowed_only_in_some_states(state, command, ok):
    view = RolloutView("r", state, 0, 0.0, SPEC, NEW, None)
    if ok:
        assert apply_command(view, command, 1.0).rollout.state is not state
    else:
        with pytest.raises(ValueError):
            apply_command(view, command, 1.0)


def test_abort_leaves_devices_as_they_are_and_nothing_happens_after():
    p, devices = start(20)
    aborted = apply_command(p.rollout, "abort", 1001.0)
    assert aborted.rollout.state is State.ABORTED and aborted.actions == []
    assert plan(aborted.rollout, obs(devices), 5000.0).actions == []


def test_an_operator_rollback_reverts_every_changed_device_even_after_completion():
    p, devices = start(3, SPEC.model_copy(update={"waves": ("100%",)}))
    p, devices = drive(p.rollout, devices, 1000.0)
    done, devices = drive(p.rollout, devices, 1011.0)
    assert done.rollout.state is State.COMPLETED
    rb = apply_command(done.rollout, "rollback", 1020.0, "operator said so")
    assert rb.rollout.state is State.ROLLING_BACK
    assert sorted(a.device_id for a in rb.actions) == ["d00", "d01", "d02"]
    assert all(isinstance(a, Revert) and a.manifest == OLD for a in rb.actions)


def test_a_device_without_a_previous_version_is_left_running_the_new_one_on_rollback():
    p, devices = start(1, devices=fleet(1, running=None))
    rb = apply_command(p.rollout, "rollback", 1001.0)
    assert rb.actions == [Revert("d00", None, None)]
    assert plan(rb.rollout, obs(devices), 1002.0).rollout.state is State.ROLLED_BACK


def test_devices_joining_the_target_mid_rollout_get_the_version():
    p, devices = start(10)
    p, devices = drive(p.rollout, devices, 1000.0)
    p, devices = drive(p.rollout, devices, 1011.0)  # wave 1: 10 % of 10 → 2 devices in all
    assert p.rollout.wave == 1 and len(p.rollout.assignments) == 2
    grown = {**devices, **fleet(30)}  # 20 more join the target: 10 % of 30 is 3, so one more now
    joined = plan(p.rollout, obs(grown), 1012.0)
    assert [a.device_id for a in joined.actions] == ["d02"] and joined.events[0][0] == "rollout.devices_joined"
    view, now, devices = joined.rollout, 1012.0, grown
    while view.state is State.RUNNING:
        now += 11
        p, devices = drive(view, devices, now)
        view = p.rollout
    assert view.state is State.COMPLETED and len(view.assignments) == 30


def test_devices_leaving_the_target_are_never_assigned_and_assigned_ones_stay():
    p, devices = start(10)
    shrunk = obs(devices, target=tuple(sorted(devices))[:5])
    view, now = p.rollout, 1000.0
    while view.state is State.RUNNING and now < 2000:
        devices = installed(devices, [d for d, a in view.assignments.items() if a.state == "assigned"])
        view = plan(view, replace(shrunk, devices=devices), now).rollout
        now += 11
    assert view.state is State.COMPLETED and sorted(view.assignments) == ["d00", "d01", "d02", "d03", "d04"]


def test_a_device_leaving_the_target_after_it_was_assigned_keeps_its_place():
    p, devices = start(10)
    devices = installed(devices, ["d00"])
    left = plan(p.rollout, obs(devices, target=tuple(f"d{i:02d}" for i in range(1, 10))), 1001.0)
    # it keeps the version; the wave, counted over the target, takes another device in its place
    assert left.rollout.assignments["d00"].state == "installed" and left.actions == [Assign("d01", 0)]


def test_the_last_wave_is_judged_against_the_baseline_of_an_earlier_wave():
    """A fleet that always runs at 3 % errors: with no device left on the old version, the last wave is
    compared with the 3 % measured earlier, not with zero."""
    busy = Metrics(1000, 30, 5.0)
    prior = Baseline(0.03, 5.0, None, "wave 2")
    alone = Observation((), {}, busy, None)
    assert {g.gate: g.verdict for g in evaluate_gates(SPEC, alone)}["error_rate"] == "fail"
    judged = {g.gate: g for g in evaluate_gates(SPEC, replace(alone, prior=prior))}
    assert judged["error_rate"].verdict == "pass" and judged["error_rate"].numbers["baseline"] == "wave 2"
    thin_fleet = replace(alone, baseline=Metrics(3, 0, 1.0), prior=prior)  # too few requests: the prior wins
    assert {g.gate: g.verdict for g in evaluate_gates(SPEC, thin_fleet)}["error_rate"] == "pass"


def test_a_failed_device_that_installs_after_all_recovers():
    spec = SPEC.model_copy(update={"failure_threshold_pct": 50.0, "waves": ("2", "100%")})
    p, devices = start(4, spec)
    devices = installed(devices, ["d00"])
    late = plan(p.rollout, obs(devices), 1061.0)  # d01 never reported: timed out
    assert late.rollout.assignments["d01"].state == "failed" and late.rollout.state is State.RUNNING
    back = plan(late.rollout, obs(installed(devices, ["d01"])), 1062.0)
    assert back.rollout.assignments["d01"].state == "installed" and back.events[0][0] == "rollout.device_recovered"


def test_resume_gives_the_waves_failed_devices_another_try():
    spec = SPEC.model_copy(update={"on_failure": "pause"})
    p, devices = start(3, spec)
    timed_out = plan(p.rollout, obs(devices), 1061.0)
    assert timed_out.rollout.state is State.PAUSED and timed_out.rollout.assignments["d00"].state == "failed"
    resumed = apply_command(timed_out.rollout, "resume", 2000.0)
    assert resumed.actions == [Assign("d00", 0)]
    again = resumed.rollout.assignments["d00"]
    assert again.state == "assigned" and again.assigned_at == 2000.0
    assert plan(resumed.rollout, obs(devices), 2001.0).rollout.state is State.RUNNING  # not re-paused at once


def test_a_device_revoked_before_it_installed_is_not_a_failure():
    p, devices = start(5)
    gone = plan(p.rollout, obs(devices, target=("d01", "d02", "d03", "d04")), 1061.0)
    assert gone.rollout.assignments["d00"].state == "left" and gone.rollout.state is State.RUNNING
    assert [a.device_id for a in gone.actions] == ["d01"]  # the wave takes another device instead


def test_a_device_still_installing_the_new_version_is_not_counted_as_reverted():
    p, devices = start(3)
    rb = apply_command(p.rollout, "rollback", 1001.0)
    mid_install = {**devices, "d00": replace(devices["d00"], install_step="download")}  # old still running
    assert plan(rb.rollout, obs(mid_install), 1002.0).rollout.assignments["d00"].state == "reverting"
    assert plan(rb.rollout, obs(devices), 1003.0).rollout.assignments["d00"].state == "reverted"


def test_without_a_budget_of_its_own_the_latency_gate_holds_devices_to_their_hardware_profile():
    slow = Observation((), {}, Metrics(100, 0, 40.0), Metrics(1000, 0, 35.0), profile_budget_ms=30.0)
    latency = next(g for g in evaluate_gates(SPEC, slow) if g.gate == "latency")
    assert latency.verdict == "fail" and latency.numbers["budget_from"] == "profile"
    own = SPEC.model_copy(update={"gates": SPEC.gates.model_copy(update={"latency_budget_ms": 50.0})})
    latency = next(g for g in evaluate_gates(own, slow) if g.gate == "latency")
    assert latency.verdict == "pass" and latency.numbers["budget_ms"] == 50.0


# -- which devices a wave takes: the artifact policy's verdicts ---------------------------------------------


@pytest.mark.parametrize(("views", "canary"), [
    # the demo's Jetson, enrolled first but not yet heard from, is not the canary while a device that has
    # reported its runtimes can be
    ({"a-jetson": {"runtimes_known": False}, "b-pi": {}, "c-x86": {"online": False}}, "b-pi"),
    ({"a-jetson": {"runtimes_known": False}, "b-pi": {"online": False}}, "b-pi"),
    # nobody has reported yet: one is assigned anyway, and gets the bundle when its hello arrives
    ({"a": {"runtimes_known": False}, "b": {"runtimes_known": False, "online": False}}, "a"),
    # a device no artifact suits is taken last
    ({"a": {"unsuitable": "no artifact suits it"}, "b": {"runtimes_known": False, "online": False}}, "b"),
])
def test_the_canary_is_a_device_an_artifact_can_be_chosen_for(views, canary):
    devices = {d: replace(DeviceView(d, True, OLD, "art", "done", None, OLD), **kw) for d, kw in views.items()}
    p, _ = start(devices=devices, spec=SPEC.model_copy(update={"waves": ("1", "100%")}))
    assert [a.device_id for a in p.actions] == [canary]
    assert p.rollout.assignments[canary].state == "assigned"


def test_a_device_no_artifact_suits_fails_when_its_wave_takes_it_and_is_sent_nothing():
    devices = fleet(2)
    devices["d01"] = replace(devices["d01"], unsuitable="no artifact of m:2 suits it: ...")
    p, _ = start(devices=devices, spec=SPEC.model_copy(update={"strategy": "all-at-once", "failure_threshold_pct": 50}))
    assert [a.device_id for a in p.actions] == ["d00"]
    failed = p.rollout.assignments["d01"]
    assert (failed.state, failed.error) == ("failed", "no artifact of m:2 suits it: ...")
    assert ("rollout.device_failed", {"device": "d01", "error": "no artifact of m:2 suits it: ..."}) in p.events
    # with no failure allowed, that stops the rollout at once
    p, _ = start(devices=devices, spec=SPEC.model_copy(update={"strategy": "all-at-once"}))
    assert p.rollout.state is State.ROLLING_BACK and "1 of 2 devices failed to install" in (p.rollout.reason or "")
