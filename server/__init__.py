"""The edgeherd server: registry, MQTT bridge, rollouts, governance, CLI and TUI."""
