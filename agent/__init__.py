"""The edgeherd device agent.

Runs on a Raspberry Pi, a Jetson or any Linux box with the core dependencies
only (numpy, paho-mqtt, pydantic, cryptography, typer); inference runtimes are
imported lazily, and torch, textual, sqlmodel and the server never are.
numpy and the runtime load with the first model; the MQTT session (paho,
TLS, X.509) and the local API's HTTP stack when an ``Agent`` is constructed.
"""
