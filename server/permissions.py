"""Roles and what each may do: pure, so the rollout planner (server/rollouts.py) can name the permission each of
its commands needs, and server/governance.py checks operators against it.

Roles are ordered: each has every right of the ones before it (viewer < operator < approver < admin); a
:class:`Permission` names the least role that has it.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["Permission", "Role", "allowed"]


class Role(str, Enum):
    """Ordered: each role has every right of the ones before it."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    APPROVER = "approver"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return list(Role).index(self)

    @property
    def with_article(self) -> str:
        return ("an " if self.value[0] in "aeiou" else "a ") + self.value


class Permission(Enum):
    """What an operator may be asked to do; the value is how a message names it."""

    READ = "reading the registry"
    PUSH_MODEL = "pushing a model"
    DEPLOY = "deploying a model"
    ENROLL_DEVICE = "enrolling a device"
    REVOKE_DEVICE = "revoking a device"
    START_ROLLOUT = "starting a rollout"
    PAUSE_ROLLOUT = "pausing a rollout"
    RESUME_ROLLOUT = "resuming a rollout"
    ABORT_ROLLOUT = "aborting a rollout"
    ROLLBACK_ROLLOUT = "rolling back a rollout"
    PROMOTE = "promoting a version to candidate"
    APPROVE = "approving a version"
    REJECT = "rejecting a version"
    RETIRE = "retiring a version"
    ROTATE_CA = "rotating the certificate authority"
    MANAGE_OPERATORS = "managing operators and their tokens"
    ACK_ALERT = "acknowledging or resolving an alert"
    COMMAND_DEVICE = "sending a device a command or reading its logs"
    ROTATE_SIGNING_KEY = "rotating the bundle-signing key"

    @property
    def min_role(self) -> Role:
        return _MIN_ROLE[self]


_MIN_ROLE: dict[Permission, Role] = {p: Role.OPERATOR for p in Permission} | {
    Permission.READ: Role.VIEWER,
    Permission.APPROVE: Role.APPROVER,
    Permission.REJECT: Role.APPROVER,
    Permission.RETIRE: Role.ADMIN,
    Permission.ROTATE_CA: Role.ADMIN,
    Permission.ROTATE_SIGNING_KEY: Role.ADMIN,
    Permission.MANAGE_OPERATORS: Role.ADMIN,
}


def allowed(role: Role, permission: Permission) -> bool:
    return role.rank >= permission.min_role.rank
