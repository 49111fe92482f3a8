"""A minimal device session in its own process: connect with a last will,
publish a retained online state, then idle until killed.

Usage: python -m tests._device_process HOST PORT DEVICE_ID PASSWORD SESSION
(PASSWORD ``tls:CERT,KEY,CA``: log in with that certificate over TLS instead)
"""

from __future__ import annotations

import sys
import threading
import time
from datetime import datetime, timezone

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from protocol import DeviceState, TopicKind, device_topic, encode, will_message


def main() -> None:
    host, port, device_id, password, session = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{device_id}-proc", protocol=mqtt.MQTTv5)
    if password.startswith("tls:"):
        import ssl

        cert, key, ca = password[4:].split(",")
        ctx = ssl.create_default_context(cafile=ca)
        ctx.load_cert_chain(cert, key)
        client.tls_set_context(ctx)
    else:
        client.username_pw_set(device_id, password)
    will_topic, will_payload = will_message(device_id, session)
    client.will_set(will_topic, will_payload, qos=1, retain=True)
    connected = threading.Event()
    client.on_connect = lambda c, u, f, rc, p: connected.set()
    client.connect(host, port, keepalive=5)
    client.loop_start()
    if not connected.wait(10):
        sys.exit("no CONNACK")
    online = DeviceState(device_id=device_id, status="online", session=session, seq=0,
                         ts=datetime.now(timezone.utc), reason="connected")
    client.publish(device_topic(device_id, TopicKind.STATE), encode(online), qos=1, retain=True).wait_for_publish(10)
    print("READY", flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
