#!/bin/sh
# Starts the edgeherd agent the device should run, and switches back when a new one does not come up.
#
#   edgeherd-launch HOME FALLBACK [edgeherd-agent arguments...]
#
# HOME is the agent's environments directory (DATA_DIR/agent, written by the agent: agent/selfupdate.py);
# FALLBACK the environment install.sh made. Starts HOME/current/bin/edgeherd-agent, or FALLBACK's when there
# is no current. While HOME/trial exists the agent there is on trial: if it has not marked itself healthy
# (removed the trial) by the trial's deadline, or has been started max_starts times, this switches current back
# to the environment the trial came from and writes HOME/rolledback (version, reason) for the old agent to
# report. Lives outside every agent environment (PREFIX/bin), so a broken agent cannot break it. The service
# manager restarts it (Restart=always): exit status 75 asks for that. Written by install.sh (docs/agent.md).
set -u
[ $# -ge 2 ] || { echo "usage: edgeherd-launch HOME FALLBACK [agent arguments...]" >&2; exit 2; }
HOME_DIR=$1
FALLBACK=$2
shift 2
RESTART=75
TRIAL=$HOME_DIR/trial

say() { printf 'edgeherd-launch: %s\n' "$*" >&2; }
field() { sed -n "s/^$1=//p" "$TRIAL" 2>/dev/null | head -n 1; }
number() { case $1 in ''|*[!0-9]*) echo 0 ;; *) echo "$1" ;; esac; }

rollback() {
  version=$(field version)
  from=$(field from)
  if [ -n "$from" ] && [ "$from" != "$FALLBACK" ] && [ -x "$from/bin/edgeherd-agent" ]; then
    ln -sfn "$from" "$HOME_DIR/.current.new" && mv -fT "$HOME_DIR/.current.new" "$HOME_DIR/current"
  else
    rm -f "$HOME_DIR/current"
  fi
  printf 'version=%s\nreason=%s\n' "$version" "$1" > "$HOME_DIR/.rolledback.tmp"
  mv -f "$HOME_DIR/.rolledback.tmp" "$HOME_DIR/rolledback"
  rm -f "$TRIAL" "$TRIAL.starts"
  say "switched back from agent $version: $1"
}

trial=no
deadline=0
if [ -f "$TRIAL" ]; then
  deadline=$(number "$(field deadline)")
  max=$(number "$(field max_starts)")
  starts=0
  if [ -f "$TRIAL.starts" ]; then starts=$(wc -l < "$TRIAL.starts" | tr -d ' '); fi
  now=$(date +%s)
  if [ "$starts" -ge "$max" ]; then
    rollback "it did not report healthy in $starts starts"
  elif [ "$now" -ge "$deadline" ]; then
    rollback "it did not report healthy by its deadline"
  else
    echo "$now" >> "$TRIAL.starts"
    trial=yes
  fi
fi

env=$HOME_DIR/current
[ -x "$env/bin/edgeherd-agent" ] || env=$FALLBACK
"$env/bin/edgeherd-agent" "$@" &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null' TERM INT
if [ "$trial" = yes ]; then
  while kill -0 "$pid" 2>/dev/null && [ -f "$TRIAL" ]; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      kill -TERM "$pid" 2>/dev/null
      wait "$pid"
      rollback "it did not report healthy by its deadline"
      exit $RESTART
    fi
    sleep 1
  done
fi
rc=0
wait "$pid" || rc=$?
while kill -0 "$pid" 2>/dev/null; do  # a signal interrupted wait: the agent is still stopping
  rc=0
  wait "$pid" || rc=$?
done
exit $rc
