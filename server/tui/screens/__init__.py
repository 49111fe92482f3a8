"""The screens: Fleet, Device, Alerts, Rollouts, Models, Drift, Audit, Help, one module each.

Each live screen is a :class:`Loading` (screens/loading.py): it loads its data in a thread worker (never on the
event loop), drops a refresh while the previous one still runs or while a dialog is open, and updates its tables
in place by row key. What a screen needs from outside is :class:`Host` and :class:`Fleet` (screens/host.py), so no
screen imports the app; what it shows is computed by server/tui/render.py.
"""

from server.tui.screens.alerts import AlertsScreen
from server.tui.screens.audit import AuditScreen
from server.tui.screens.device import DeviceScreen
from server.tui.screens.drift import DriftScreen
from server.tui.screens.fleet import FleetScreen
from server.tui.screens.help import HelpScreen
from server.tui.screens.host import Fleet, Host
from server.tui.screens.loading import Loading
from server.tui.screens.models import ModelsScreen
from server.tui.screens.rollouts import RolloutsScreen

__all__ = ["AlertsScreen", "AuditScreen", "DeviceScreen", "DriftScreen", "Fleet", "FleetScreen", "HelpScreen",
           "Host", "Loading", "ModelsScreen", "RolloutsScreen"]
