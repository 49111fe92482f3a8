from __future__ import annotations

import pytest

from protocol import TOPICS, Direction, TopicError, TopicKind, device_topic, parse_device_topic, server_subscriptions


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("edgeherd/v1/devices/pi-1/state", ("pi-1", TopicKind.STATE)),
        ("edgeherd/v1/devices/pi-1/artifact/req", ("pi-1", TopicKind.ARTIFACT_REQUEST)),
        ("edgeherd/v1/devices/pi-1/artifact/chunk", ("pi-1", TopicKind.ARTIFACT_CHUNK)),
        ("edgeherd/v1/devices/0/cmd", ("0", TopicKind.COMMAND)),
    ],
)
def test_parse_valid(topic, expected):
    assert parse_device_topic(topic) == expected


@pytest.mark.parametrize(
    "topic",
    [
        "edgeherd/v2/devices/pi-1/state",
        "edgeherd/v1/devices/pi-1",
        "edgeherd/v1/devices/pi-1/",
        "edgeherd/v1/devices/Pi-1/state",
        "edgeherd/v1/devices/+/state",
        "edgeherd/v1/devices/pi-1/state/extra",
        "edgeherd/v1/devices/pi-1/artifact",
        "edgeherd/v1/devices//state",
        "",
    ],
)
def test_parse_rejects(topic):
    with pytest.raises(TopicError):
        parse_device_topic(topic)


def test_every_kind_round_trips_through_device_topic():
    for kind in TopicKind:
        assert parse_device_topic(device_topic("jetson-7", kind)) == ("jetson-7", kind)


@pytest.mark.parametrize("bad", ["", "a/b", "#", "+", "UPPER", "-leading", "x" * 64])
def test_device_topic_rejects_bad_ids(bad):
    with pytest.raises(TopicError):
        device_topic(bad, TopicKind.STATE)


def test_server_subscriptions_are_shared_and_cover_device_to_server_kinds():
    subs = server_subscriptions()
    assert all(t.startswith("$share/edgeherd/edgeherd/v1/devices/+/") for t, _ in subs)
    kinds = {t.rsplit("+/", 1)[1] for t, _ in subs}
    assert kinds == {s.kind.value for s in TOPICS.values() if s.direction is Direction.DEVICE_TO_SERVER}
    assert all(q == 1 for _, q in subs)
    assert all(not t.startswith("$share") for t, _ in server_subscriptions(shared=False))


def test_only_state_and_desired_are_retained():
    assert {k for k, s in TOPICS.items() if s.retain} == {TopicKind.STATE, TopicKind.DESIRED}
