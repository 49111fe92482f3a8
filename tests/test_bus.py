"""The server's MQTT seam (server/bus.py) against a real Mosquitto: what the broker refuses is said as a BusError,
not taken for success."""

from __future__ import annotations

import pytest

from server.bus import Bus, BusError

pytestmark = pytest.mark.integration


def test_a_refused_login_is_a_bus_error_naming_the_refusal(mosquitto):
    with pytest.raises(BusError, match=f"refused {mosquitto.server_user}"):
        Bus.connect(mosquitto.server_url, mosquitto.server_user, "not-the-password", timeout=10)


def test_a_granted_subscription_is_confirmed(mosquitto):
    bus = Bus.connect(mosquitto.server_url, mosquitto.server_user, mosquitto.server_password, timeout=10)
    try:
        assert bus.subscribe("edgeherd/v1/devices/pi-1/ack", wait=10) is True
    finally:
        bus.close()


def test_a_refused_subscription_is_not_taken_as_granted():
    """Mosquitto grants every filter and filters on delivery, so the refusal is played here: a SUBACK with "not
    authorized" (what EMQX answers for an ACL it refuses) reads as not granted; a client that is not connected
    cannot be granted anything."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    from server.bus import new_client

    bus = Bus(new_client("edgeherd-test", "u", "p"), "mqtt://127.0.0.1:1")
    bus._subscribed(bus._client, None, 7, [ReasonCode(PacketTypes.SUBACK, identifier=0x87)], None)
    bus._subscribed(bus._client, None, 8, [ReasonCode(PacketTypes.SUBACK, identifier=1)], None)
    assert bus._subacks == {7: False, 8: True}
    assert bus.subscribe("edgeherd/v1/devices/pi-1/ack", wait=1) is False
