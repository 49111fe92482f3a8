"""``edgeherd``: the operator command line.

Sub-commands live in their own modules and are imported lazily, so
``edgeherd --help`` stays fast and does not import torch.
"""

from __future__ import annotations

from typing import Annotated

import typer

from hardware.process import version_option
from server.cli._common import CliState
from server.cli.agent_ota import agent_app
from server.cli.alerts import alerts_app
from server.cli.build import build_command, bundle_app
from server.cli.demo import demo_command
from server.cli.diagnostics import device_cmd, device_logs
from server.cli.features import features_app
from server.cli.flash import flash_command, rotate_credentials_command
from server.cli.fleet import deploy_command, device_app, fleet_app, model_app, server_app
from server.cli.governance import audit_app, model_approve, model_promote, model_reject, model_retire
from server.cli.groups import device_set, group_app
from server.cli.keys import keys_app
from server.cli.operators import login_command, logout_command, operator_app, server_init
from server.cli.rollout import rollout_app
from server.cli.tui import tui_command

app = typer.Typer(
    name="edgeherd",
    help="edgeherd: train, quantize, sign and roll out models to a fleet of edge devices.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(keys_app, name="keys")
app.add_typer(bundle_app, name="bundle")
app.add_typer(server_app, name="server")
app.add_typer(device_app, name="device")
app.add_typer(model_app, name="model")
app.add_typer(fleet_app, name="fleet")
app.add_typer(audit_app, name="audit")
app.add_typer(rollout_app, name="rollout")
app.add_typer(features_app, name="features")
app.add_typer(operator_app, name="operator")
app.add_typer(alerts_app, name="alerts")
app.add_typer(group_app, name="group")
app.add_typer(agent_app, name="agent")
server_app.command("init")(server_init)
app.command("login")(login_command)
app.command("logout")(logout_command)
model_app.command("promote")(model_promote)
model_app.command("approve")(model_approve)
model_app.command("reject")(model_reject)
model_app.command("retire")(model_retire)
app.command("build")(build_command)
app.command("deploy")(deploy_command)
app.command("flash")(flash_command)
device_app.command("rotate-credentials")(rotate_credentials_command)
device_app.command("set")(device_set)
device_app.command("logs")(device_logs)
device_app.command("cmd")(device_cmd)
app.command("tui")(tui_command)
app.command("demo")(demo_command)


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[bool, version_option("edgeherd")] = False,
    as_user: Annotated[str | None, typer.Option(
        "--as", metavar="USER", help="On the server host, without a login: act as this operator (default: "
        "$EDGEHERD_OPERATOR, else your OS user name); roles come from operators.toml in the data directory. With a "
        "login (`edgeherd login`), commands go through the operator API as the token's operator.")] = None,
) -> None:
    """edgeherd operator CLI."""
    ctx.obj = CliState(as_user=as_user)


def main() -> None:
    app()
