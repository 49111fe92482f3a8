"""``edgeherd-agent run`` with a fault armed: ``python -m tests.agent_launcher --kill-at STEP[@ARTIFACT] --config
agent.toml`` SIGKILLs the agent process on entry to install step STEP (``download-mid``: half-way through a
download, once what it has is persisted), for any artifact or only for ARTIFACT. The crash tests use it to
leave a device as a power cut would."""

from __future__ import annotations

import argparse
import logging
import os
import signal
from pathlib import Path

import typer

from agent.cli import serve
from agent.installer import InstallHook

log = logging.getLogger(__name__)


def kill_at(step: str, artifact: str = "") -> InstallHook:
    """An ``on_step`` hook that kills this process with SIGKILL at ``step`` (of ``artifact``, when given)."""

    def hook(at: str, installing: str) -> None:
        if at == step and (not artifact or artifact == installing):
            log.warning("fault injection: SIGKILL at %s", step)
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.agent_launcher")
    parser.add_argument("--kill-at", required=True, metavar="STEP[@ARTIFACT]")
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    step, _, artifact = args.kill_at.partition("@")
    try:
        serve(args.config, args.log_level, on_step=kill_at(step, artifact))
    except typer.Exit as exc:  # as the console script exits
        raise SystemExit(exc.exit_code) from None


if __name__ == "__main__":
    main()
