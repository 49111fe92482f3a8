"""The agent updates itself: install a signed agent release beside the running agent, switch, and be restarted.

The layout, in the data directory (the one place the hardened service may write; docs/agent.md)::

    <data>/agent/envs/<version>-<sha12>/   a virtual environment per release
    <data>/agent/current -> envs/…         what the launcher starts (absent: the flashed environment)
    <data>/agent/trial                     a switch not yet proven: version, from, deadline, max_starts
    <data>/agent/trial.starts              one line per start the launcher made of the trial
    <data>/agent/rolledback                the launcher switched back: version, reason
    <data>/agent/update.json               the last release asked for and how it went (reported in state)

On a release in the desired state (:meth:`SelfUpdate.on_release`): verify its signature against the keys the
device trusts, check its Python, fetch its tar over MQTT with the model downloader, check its sha256, unpack
``wheelhouse/`` and ``requirements.txt`` (regular files only, size-capped), make a fresh environment with
``python -m venv`` (with system site packages when the running one has them) and install it with pip from the
wheelhouse alone, every wheel pinned by hash. Then write the trial record, switch ``current`` with one atomic
rename, and ask to be restarted: the agent stops and exits with :data:`RESTART_EXIT`; the service manager
starts the launcher (hardware/templates/edgeherd-launch.sh) again, which starts the new agent.

The new agent marks the trial healthy once it is on the broker and has published its state (:meth:`healthy`).
If it does not within :data:`TRIAL_S`, or crashes :data:`MAX_STARTS` times, the launcher switches back and
writes ``rolledback``; the old agent, started again, reports the release as rolled back
(:class:`protocol.AgentUpdate`) and never tries that release again.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

from agent.download import Download
from agent.downloader import Downloader
from agent.errors import AgentError, InstallFailure
from agent.trust import Trust
from hardware.files import atomic_write
from protocol import (
    AgentRelease,
    AgentUpdate,
    AgentUpdateStep,
    InvalidMessage,
    SignatureError,
    SignedAgentRelease,
    decode_model,
    encode_model,
    verify_agent_release,
)
from protocol.version import __version__

__all__ = ["MAX_STARTS", "RESTART_EXIT", "TRIAL_S", "SelfUpdate", "read_record"]

log = logging.getLogger(__name__)
#: The exit status that asks the service manager to start the launcher again (EX_TEMPFAIL).
RESTART_EXIT = 75
#: How long a new agent has to report healthy, and how many starts it gets, before the launcher switches back.
TRIAL_S = 300
MAX_STARTS = 3
#: Limits on what a release's tar may hold.
MAX_MEMBERS = 2000
MAX_UNPACKED = 1024**3
_STEPS_DONE = (AgentUpdateStep.FAILED, AgentUpdateStep.ROLLED_BACK)


def read_record(path: Path) -> dict[str, str]:
    """A ``key=value`` record as the launcher (a POSIX sh script) reads and writes them; {} when absent."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return {}
    return dict(line.split("=", 1) for line in lines if "=" in line)


class SelfUpdate:
    """Agent releases on the worker thread: install, switch, restart; the trial's outcome in :attr:`status`."""

    def __init__(self, data_dir: Path, trust: Trust, downloader: Downloader, chunk_size: int,
                 publish_state: Callable[[], None], *, trial_s: int = TRIAL_S, max_starts: int = MAX_STARTS,
                 python: str = sys.executable, restart: Callable[[], None] | None = None) -> None:
        self.data = data_dir
        self.home = data_dir / "agent"
        self.home.mkdir(parents=True, exist_ok=True)
        self.trust = trust
        self.downloader = downloader
        self.chunk_size = chunk_size
        self._publish_state = publish_state
        self.trial_s, self.max_starts, self.python = trial_s, max_starts, python
        self._restart = restart or (lambda: os.kill(os.getpid(), signal.SIGTERM))
        #: Set once this agent switched to a new one and wants the service manager to restart it.
        self.restart_wanted = False
        self.status = self._load_status()
        self.on_trial = False

    # -- records ---------------------------------------------------------------------------------

    def _load_status(self) -> AgentUpdate | None:
        try:
            return decode_model(AgentUpdate, (self.home / "update.json").read_bytes())
        except (OSError, InvalidMessage):
            return None

    def _set(self, version: str, step: AgentUpdateStep, error: str | None = None) -> None:
        self.status = AgentUpdate(version=version, step=step, error=error[:1000] if error else None)
        atomic_write(self.home / "update.json", encode_model(self.status))

    def start(self) -> None:
        """At agent start: take the launcher's word on a switch back, and see whether this run is a trial."""
        rolled = read_record(self.home / "rolledback")
        if rolled.get("version"):
            reason = rolled.get("reason") or "the new agent did not report healthy"
            log.error("agent %s was rolled back by the launcher: %s", rolled["version"], reason)
            try:
                self._set(rolled["version"], AgentUpdateStep.ROLLED_BACK, reason)
            except InvalidMessage:  # a hand-edited record: the version is not one
                log.warning("ignored %s: not a rollback record", self.home / "rolledback")
            (self.home / "rolledback").unlink(missing_ok=True)
        trial = read_record(self.home / "trial")
        self.on_trial = trial.get("version") == __version__
        if self.on_trial:
            log.info("agent %s runs on trial: it is kept once it is on the broker", __version__)

    def healthy(self) -> None:
        """On the broker and its state published: a trial is over, this agent stays."""
        if not self.on_trial:
            return
        for name in ("trial", "trial.starts"):
            (self.home / name).unlink(missing_ok=True)
        self.on_trial = False
        self._set(__version__, AgentUpdateStep.DONE)
        log.info("agent %s reported healthy: the update is done", __version__)
        self._publish_state()

    # -- a release ---------------------------------------------------------------------------------

    def on_release(self, signed: SignedAgentRelease) -> None:
        """Act on the desired state's agent release: nothing when it runs already or failed before."""
        wanted = signed.release.version
        if wanted == __version__ or self.on_trial or self.restart_wanted:
            return
        if self.status is not None and self.status.version == wanted and self.status.step in _STEPS_DONE:
            return  # tried and failed: never again (the operator pushes a new version)
        try:
            release = verify_agent_release(signed, self.trust.trusted())
        except SignatureError as exc:
            self._fail(wanted, f"verify: {exc}")
            return
        here = f"{sys.version_info.major}.{sys.version_info.minor}"
        if release.python != here:
            self._fail(wanted, f"preflight: the release is for Python {release.python}, this agent runs {here}")
            return
        self._set(wanted, AgentUpdateStep.INSTALLING)
        self._publish_state()
        try:
            env = self._install(release)
            self._switch(release, env)
        except (AgentError, OSError, tarfile.TarError, subprocess.SubprocessError) as exc:
            self._fail(wanted, str(exc))
            return
        self._set(wanted, AgentUpdateStep.TRIAL)
        self._publish_state()
        log.info("switched to agent %s in %s; restarting", wanted, env)
        self.restart_wanted = True
        self._restart()

    def _fail(self, version: str, error: str) -> None:
        log.error("agent release %s refused: %s", version, error)
        self._set(version, AgentUpdateStep.FAILED, error)
        self._publish_state()

    def _install(self, release: AgentRelease) -> Path:
        env = self.home / "envs" / f"{release.version}-{release.sha256[:12]}"
        if (env / ".edgeherd-complete").is_file():
            return env
        dl = Download(self.data / "downloads", release.sha256, release.size, self.chunk_size)
        try:
            if not dl.complete:
                self.downloader.fetch(dl)
            if not dl.verify():
                dl.remove()
                raise InstallFailure(f"verify: the agent release tar does not match its sha256 {release.sha256}")
            staging = self.home / "staging"
            shutil.rmtree(staging, ignore_errors=True)
            _unpack(dl.part, staging)
        finally:
            if dl.part.exists():
                dl.remove()
        shutil.rmtree(env, ignore_errors=True)
        cmd = [self.python, "-m", "venv"]
        if _system_site(Path(sys.prefix)):
            cmd.append("--system-site-packages")
        _run([*cmd, str(env)], "venv")
        _run([str(env / "bin" / "python"), "-m", "pip", "--isolated", "--disable-pip-version-check", "--no-input",
              "install", "--no-index", "--find-links", str(staging / "wheelhouse"), "--no-deps", "--require-hashes",
              "--only-binary=:all:", "--no-cache-dir", "--quiet", "-r", str(staging / "requirements.txt")], "pip")
        if not (env / "bin" / "edgeherd-agent").is_file():
            raise InstallFailure(f"install: the release installed no edgeherd-agent into {env}")
        (env / ".edgeherd-complete").touch()
        shutil.rmtree(staging, ignore_errors=True)
        return env

    def _switch(self, release: AgentRelease, env: Path) -> None:
        """Trial record first, then ``current`` by one rename: a crash between leaves the old agent running."""
        deadline = int(time.time()) + self.trial_s
        record = (f"version={release.version}\nfrom={sys.prefix}\nfrom_version={__version__}\n"
                  f"deadline={deadline}\nmax_starts={self.max_starts}\n")
        (self.home / "trial.starts").unlink(missing_ok=True)
        atomic_write(self.home / "trial", record)
        tmp = self.home / ".current.new"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(env)
        os.replace(tmp, self.home / "current")


def _system_site(prefix: Path) -> bool:
    try:
        cfg = (prefix / "pyvenv.cfg").read_text()
    except OSError:
        return False
    return any(line.replace(" ", "").lower() == "include-system-site-packages=true" for line in cfg.splitlines())


def _run(cmd: list[str], step: str) -> None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False,  # noqa: S603
                              env={**os.environ, "PIP_CONFIG_FILE": os.devnull})
    except subprocess.TimeoutExpired:
        raise InstallFailure(f"install: {step} did not finish within 900 s") from None
    if done.returncode != 0:
        raise InstallFailure(f"install: {step} failed ({done.returncode}): {(done.stderr or done.stdout)[-600:]}")


def _unpack(tar: Path, dest: Path) -> None:
    """Unpack ``requirements.txt`` and ``wheelhouse/*.whl`` only: regular files, no links, no other paths."""
    dest.mkdir(parents=True)
    (dest / "wheelhouse").mkdir()
    total = 0
    with tarfile.open(tar, "r:*") as tf:
        members = tf.getmembers()
        if len(members) > MAX_MEMBERS:
            raise InstallFailure(f"install: the release tar holds {len(members)} entries, more than {MAX_MEMBERS}")
        for m in members:
            name = m.name.removeprefix("./")
            if m.isdir() and name in ("", ".", "wheelhouse"):
                continue
            parts = name.split("/")
            ok = m.isreg() and (name == "requirements.txt" or (
                len(parts) == 2 and parts[0] == "wheelhouse" and parts[1].endswith(".whl")
                and not parts[1].startswith(".")))
            if not ok:
                raise InstallFailure(f"install: the release tar holds {m.name!r}; it may hold only requirements.txt "
                                     f"and wheelhouse/*.whl as regular files")
            total += m.size
            if total > MAX_UNPACKED:
                raise InstallFailure(f"install: the release tar unpacks to more than {MAX_UNPACKED} bytes")
            src = tf.extractfile(m)
            assert src is not None  # noqa: S101 - a regular file
            with src, (dest / name).open("wb") as out:
                shutil.copyfileobj(src, out)
    if not (dest / "requirements.txt").is_file():
        raise InstallFailure("install: the release tar has no requirements.txt")
