#!/bin/sh
# Installs the edgeherd agent of device @@DEVICE@@ (hardware profile @@PROFILE@@) from this bundle.
#
#   sudo ./install.sh [--prefix DIR] [--config-dir DIR] [--data-dir DIR] [--unit-dir DIR]
#                     [--user NAME] [--python PATH] [--systemd auto|yes|no] [--firstboot]
#
# Offline: pip installs only this bundle's wheels, pinned by sha256. Idempotent: running it again, or a
# newer bundle's, upgrades in place and keeps the data directory. Written by `edgeherd flash` (docs/hardware.md).
set -eu
umask 022

DEVICE=@@DEVICE@@
PROFILE=@@PROFILE@@
BUNDLE_ID=@@BUNDLE_ID@@
VERSION=@@VERSION@@
PY_VERSION=@@PYTHON@@
SYSTEM_SITE=@@SYSTEM_SITE@@
GROUPS_WANTED=@@GROUPS@@
OS_PACKAGES=@@OS_PACKAGES@@
UNIT=edgeherd-agent.service
FIRSTBOOT_UNIT=edgeherd-firstboot.service

PREFIX=/opt/edgeherd
CONFIG_DIR=/etc/edgeherd
DATA_DIR=/var/lib/edgeherd
UNIT_DIR=/etc/systemd/system
AGENT_USER=edgeherd
PYTHON=${EDGEHERD_PYTHON:-@@PYTHON_COMMAND@@}
SYSTEMD=auto
if [ "${EDGEHERD_INSTALL_NO_SYSTEMD:-}" = 1 ]; then SYSTEMD=no; fi
FIRSTBOOT=no

say() { printf 'edgeherd install: %s\n' "$*"; }
die() { printf 'edgeherd install: error: %s\n' "$*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case $1 in
    --firstboot) FIRSTBOOT=yes; shift; continue ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --prefix|--config-dir|--data-dir|--unit-dir|--user|--python|--systemd)
      [ $# -ge 2 ] || die "$1 needs a value"
      opt=$1; val=$2; shift 2 ;;
    --prefix=*|--config-dir=*|--data-dir=*|--unit-dir=*|--user=*|--python=*|--systemd=*)
      opt=${1%%=*}; val=${1#*=}; shift ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
  case $opt in
    --prefix) PREFIX=$val ;;
    --config-dir) CONFIG_DIR=$val ;;
    --data-dir) DATA_DIR=$val ;;
    --unit-dir) UNIT_DIR=$val ;;
    --user) AGENT_USER=$val ;;
    --python) PYTHON=$val ;;
    --systemd) case $val in auto|yes|no) SYSTEMD=$val ;; *) die "--systemd takes auto, yes or no" ;; esac ;;
  esac
done

check_path() {
  case $2 in /*) ;; *) die "$1 must be an absolute path, not '$2'" ;; esac
  case $2 in *[!A-Za-z0-9._/-]*|*/../*|*/..) die "$1 may hold only letters, digits and . _ / - (got '$2')" ;; esac
}
check_path --prefix "$PREFIX"
check_path --config-dir "$CONFIG_DIR"
check_path --data-dir "$DATA_DIR"
check_path --unit-dir "$UNIT_DIR"
case $AGENT_USER in ''|-*|*[!a-z0-9_-]*) die "--user takes a user name (a-z, 0-9, _ and -), not '$AGENT_USER'" ;; esac

HERE=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd)
[ -f "$HERE/bundle.json" ] && [ -f "$HERE/requirements.txt" ] && [ -d "$HERE/wheelhouse" ] \
  && [ -f "$HERE/bin/edgeherd-launch" ] \
  || die "run install.sh from its unpacked bundle (bundle.json, requirements.txt, wheelhouse/ and bin/ beside it)"
ROOT=no
if [ "$(id -u)" = 0 ]; then ROOT=yes; fi

# 1. The Python the wheels are for, able to make a virtual environment.
command -v "$PYTHON" >/dev/null 2>&1 \
  || die "$PYTHON is not installed: this bundle needs Python $PY_VERSION (OS packages: $OS_PACKAGES), or pass --python PATH"
have=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])') || die "$PYTHON does not run"
[ "$have" = "$PY_VERSION" ] \
  || die "$PYTHON is Python $have; this bundle's wheels are for Python $PY_VERSION (pass --python PATH, or flash again with --python $have)"
"$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1 \
  || die "$PYTHON cannot make virtual environments: install python$PY_VERSION-venv (OS packages: $OS_PACKAGES)"

# 2. The agent's own user.
if ! id -u "$AGENT_USER" >/dev/null 2>&1; then
  [ "$ROOT" = yes ] || die "user $AGENT_USER does not exist and only root can create it (or pass --user)"
  useradd --system --user-group --home-dir "$DATA_DIR" --no-create-home --shell /usr/sbin/nologin "$AGENT_USER"
  say "created the system user $AGENT_USER"
fi
AGENT_GROUP=$(id -gn "$AGENT_USER")
AGENT_UID=$(id -u "$AGENT_USER")
AGENT_GID=$(id -g "$AGENT_USER")
OWN=
if [ "$ROOT" = yes ]; then OWN="-o $AGENT_UID -g $AGENT_GID"; fi

# 3. A virtual environment per bundle, made aside and switched to at the end.
VENV_NAME=$VERSION-$BUNDLE_ID
VENV=$PREFIX/venvs/$VENV_NAME
mkdir -p "$PREFIX/venvs"
chmod 0755 "$PREFIX" "$PREFIX/venvs"
if [ -f "$VENV/.edgeherd-complete" ]; then
  say "$VENV is installed already"
else
  rm -rf "$VENV"
  site=
  if [ "$SYSTEM_SITE" = yes ]; then site=--system-site-packages; fi
  say "making $VENV"
  "$PYTHON" -m venv $site "$VENV"
  say "installing edgeherd $VERSION and its dependencies from the bundle's wheelhouse (no network)"
  PIP_CONFIG_FILE=/dev/null "$VENV/bin/python" -m pip --isolated --disable-pip-version-check --no-input \
    install --no-index --find-links "$HERE/wheelhouse" --no-deps --require-hashes --only-binary=:all: \
    --no-cache-dir --no-warn-script-location --quiet -r "$HERE/requirements.txt" \
    || die "pip could not install the wheelhouse into $VENV"
  PIP_CONFIG_FILE=/dev/null "$VENV/bin/python" -m pip --isolated --disable-pip-version-check check >/dev/null 2>&1 \
    || say "warning: pip check reports unmet requirements in $VENV (see: $VENV/bin/python -m pip check)"
  touch "$VENV/.edgeherd-complete"
fi

render() {
  sed -e "s|@PREFIX@|$PREFIX|g" -e "s|@CONFIG_DIR@|$CONFIG_DIR|g" -e "s|@DATA_DIR@|$DATA_DIR|g" \
      -e "s|@USER@|$AGENT_USER|g" -e "s|@GROUP@|$AGENT_GROUP|g" -e "s|@SUPPLEMENTARY_GROUPS@|$groups|g" "$1"
}
groups=
for g in $GROUPS_WANTED; do
  if getent group "$g" >/dev/null 2>&1; then groups="${groups:+$groups }$g"; fi
done

# 4. Configuration: agent.toml readable by the agent, not writable by it (it pins the server key); the device's
#    credentials (its certificate, key and pinned CA, or its broker password) its own, 0600, in a directory it
#    may write (credential rotation).
install -d -m 0755 "$CONFIG_DIR"
install -d -m 0700 $OWN "$CONFIG_DIR/credentials"
render "$HERE/config/agent.toml" > "$CONFIG_DIR/.agent.toml.tmp"
if [ "$ROOT" = yes ]; then
  chown "0:$AGENT_GID" "$CONFIG_DIR/.agent.toml.tmp"
  chmod 0640 "$CONFIG_DIR/.agent.toml.tmp"
else
  chmod 0600 "$CONFIG_DIR/.agent.toml.tmp"
fi
CRED=$CONFIG_DIR/credentials
if [ -f "$HERE/config/credentials/device.pem" ]; then
  CRED_FILES="device.pem device.key ca.pem"
  STALE_FILES="broker-password"
  WHAT="certificate, key and pinned CA"
else
  CRED_FILES="broker-password"
  STALE_FILES="device.pem device.key ca.pem"
  WHAT="broker password"
fi
for f in $CRED_FILES; do
  [ -s "$HERE/config/credentials/$f" ] || die "the bundle has no config/credentials/$f: flash the device again"
done
installed_from=$(cat "$CRED/bundle-id" 2>/dev/null || true)
complete=yes
for f in $CRED_FILES; do [ -s "$CRED/$f" ] || complete=no; done
if [ "$complete" = no ] || [ "$installed_from" != "$BUNDLE_ID" ]; then
  for f in $CRED_FILES; do install -m 0600 $OWN "$HERE/config/credentials/$f" "$CRED/.$f.tmp"; done
  for f in $CRED_FILES; do mv -f "$CRED/.$f.tmp" "$CRED/$f"; done
  # what the agent kept of earlier credentials (rotations) and the other kind's files are of no use now
  for f in $STALE_FILES; do rm -f "$CRED/$f"; done
  for f in "$CRED"/*.previous; do rm -f "$f"; done
  printf '%s\n' "$BUNDLE_ID" > "$CRED/.bundle-id.tmp"
  mv -f "$CRED/.bundle-id.tmp" "$CRED/bundle-id"
  say "installed the $WHAT of $DEVICE in $CRED"
else
  say "kept the $WHAT in $CRED (installed from this bundle before, and perhaps rotated since)"
fi
mv -f "$CONFIG_DIR/.agent.toml.tmp" "$CONFIG_DIR/agent.toml"
if [ -f "$HERE/config/ca.crt" ]; then
  install -m 0644 "$HERE/config/ca.crt" "$CONFIG_DIR/ca.crt"
else
  rm -f "$CONFIG_DIR/ca.crt"
fi

# 5. The data directory: made once, never emptied.
install -d -m 0750 $OWN "$DATA_DIR"
# Agent updates live in DATA_DIR/agent (docs/agent.md); what this bundle installs replaces what they switched to.
install -d -m 0750 $OWN "$DATA_DIR/agent"
rm -f "$DATA_DIR/agent/current" "$DATA_DIR/agent/trial" "$DATA_DIR/agent/trial.starts"

# 6. Switch to the new environment; keep it and the one before it.
current=$(readlink "$PREFIX/venv" 2>/dev/null || true)
if [ -n "$current" ] && [ "$current" != "venvs/$VENV_NAME" ]; then
  printf '%s\n' "$current" > "$PREFIX/previous"
fi
ln -sfn "venvs/$VENV_NAME" "$PREFIX/.venv.new"
mv -fT "$PREFIX/.venv.new" "$PREFIX/venv"
previous=$(cat "$PREFIX/previous" 2>/dev/null || true)
for d in "$PREFIX"/venvs/*; do
  [ -d "$d" ] || continue
  case "venvs/${d##*/}" in "venvs/$VENV_NAME"|"$previous") ;; *) rm -rf "$d"; say "removed the old ${d##*/}" ;; esac
done

# 7. The service, started by the launcher, which lives outside every agent environment.
install -d -m 0755 "$PREFIX/bin"
install -m 0755 "$HERE/bin/edgeherd-launch" "$PREFIX/bin/.edgeherd-launch.tmp"
mv -f "$PREFIX/bin/.edgeherd-launch.tmp" "$PREFIX/bin/edgeherd-launch"
install -d -m 0755 "$UNIT_DIR"
render "$HERE/systemd/$UNIT" > "$UNIT_DIR/.$UNIT.tmp"
chmod 0644 "$UNIT_DIR/.$UNIT.tmp"
mv -f "$UNIT_DIR/.$UNIT.tmp" "$UNIT_DIR/$UNIT"
EXEC="$PREFIX/bin/edgeherd-launch $DATA_DIR/agent $PREFIX/venv run --config $CONFIG_DIR/agent.toml"
if [ "$SYSTEMD" = auto ]; then
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then SYSTEMD=yes; else SYSTEMD=no; fi
fi
if [ "$SYSTEMD" = yes ]; then
  systemctl daemon-reload
  systemctl enable "$UNIT"
  if [ "$FIRSTBOOT" = yes ]; then systemctl start --no-block "$UNIT"; else systemctl restart "$UNIT"; fi
  say "$UNIT is enabled and running"
else
  say "systemd does not manage services here (or --systemd no): $UNIT_DIR/$UNIT is written but not started;"
  say "run the agent as $AGENT_USER with: $EXEC"
fi

# 8. After a first boot: the bundle held the device's credentials; remove it, and stop this from running again.
if [ "$FIRSTBOOT" = yes ]; then
  if [ "$SYSTEMD" = yes ]; then systemctl disable "$FIRSTBOOT_UNIT" || true; fi
  rm -f "/etc/systemd/system/multi-user.target.wants/$FIRSTBOOT_UNIT"
  rm -rf "$HERE"
  say "removed the bundle from $HERE"
fi
say "edgeherd $VERSION is installed for $DEVICE ($PROFILE): $PREFIX/venv, $CONFIG_DIR, data in $DATA_DIR"
