"""Which artifact of a bundle a device gets: one policy for rollouts, ``deploy`` and every other path. Pure but for
reading the hardware profiles (hardware/profiles, packaged TOML files, cached).

A bundle carries one model compiled several ways (``onnx-int8``, ``tflite-int8``,
``tensorrt-fp16``, …); a device must be sent one it can load. The rule:

1. The device must have told the server which runtimes it has (``runtimes`` in
   its hello, with versions). Until it has, nothing is chosen: the device
   *waits* (:attr:`Outcome.WAITING`), and is assigned when its hello arrives.
   Guessing from the hardware profile is what sent a Jetson without TensorRT a
   TensorRT engine it then refused.
2. Only artifacts whose runtime requirement (name, minimum and maximum version)
   the reported runtimes meet qualify: the same check the agent's pre-flight
   makes (:meth:`protocol.RuntimeRequirement.unmet`).
3. Among those, the device's hardware profile orders them by (target,
   precision), best first (``[rollout] artifacts`` in its profile). A device
   whose profile edgeherd does not know (a custom board) uses
   :data:`DEFAULT_ORDER`.
4. An operator may name the artifact (``deploy --artifact``, ``rollout start
   --artifact``): it is taken when the device can load it, whatever the
   profile's order says.
5. Nothing qualifies: :attr:`Outcome.UNSUITABLE`, with the reason, naming what
   the bundle has and what the device reported.

docs/protocol.md §5 states this for device authors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from hardware.profiles import ArtifactChoice, Profile, ProfileError, first_in_order, load
from protocol import Manifest, Precision, Target

__all__ = ["DEFAULT_ORDER", "Choice", "Outcome", "choose", "runtimes_of"]


class Outcome(str, Enum):
    CHOSEN = "chosen"
    #: The device has not reported its runtimes yet: it is assigned once it has.
    WAITING = "waiting"
    #: No artifact of the bundle can run on the device (or the one asked for cannot).
    UNSUITABLE = "unsuitable"


#: The order for a device whose hardware profile edgeherd does not know.
DEFAULT_ORDER: tuple[ArtifactChoice, ...] = tuple(
    ArtifactChoice(target=t, precision=p) for t, p in [
        (Target.ONNX, Precision.INT8), (Target.ONNX, Precision.FP32), (Target.TFLITE, Precision.INT8),
        (Target.TFLITE, Precision.FP32), (Target.ONNX, Precision.FP16), (Target.TFLITE, Precision.FP16),
        (Target.TENSORRT, Precision.INT8), (Target.TENSORRT, Precision.FP16), (Target.TENSORRT, Precision.FP32)])


@dataclass(frozen=True)
class Choice:
    outcome: Outcome
    #: The chosen artifact's name (CHOSEN only).
    artifact: str | None = None
    #: Why none was chosen (WAITING, UNSUITABLE).
    reason: str = ""


def runtimes_of(fingerprint: Mapping[str, object] | None) -> dict[str, str] | None:
    """The runtimes a device reported in its hello (``{name: version}``), or None when it has not said."""
    if not fingerprint or "runtimes" not in fingerprint:
        return None
    reported = fingerprint["runtimes"]
    return {str(k): str(v) for k, v in reported.items()} if isinstance(reported, Mapping) else None


def _profile(name: str | None) -> Profile | None:
    if not name:
        return None
    try:
        return load(name)
    except ProfileError:
        return None  # a board edgeherd has no profile for: the default order


def choose(manifest: Manifest, profile: str | None, runtimes: Mapping[str, str] | None,
           requested: str | None = None) -> Choice:
    """The artifact of ``manifest`` for a device with hardware ``profile`` that reported ``runtimes``
    (None: not yet), or ``requested`` when the operator named one. See the module's docstring."""
    arts = list(manifest.artifacts)
    ref = f"{manifest.model}:{manifest.version}"
    if requested is not None and requested not in {a.name for a in arts}:
        return Choice(Outcome.UNSUITABLE, reason=f"{ref} has no artifact {requested!r} "
                                                 f"(it has {', '.join(a.name for a in arts)})")
    if runtimes is None:
        return Choice(Outcome.WAITING, reason="has not reported its runtimes yet (it has not connected since "
                                              "it was enrolled)")
    if requested is not None:
        art = next(a for a in arts if a.name == requested)
        problem = art.runtime.unmet(runtimes)
        return Choice(Outcome.CHOSEN, art.name) if problem is None else Choice(
            Outcome.UNSUITABLE, reason=f"cannot load {ref} {art.name}: it {problem}")
    known = _profile(profile)
    order = known.artifact_order if known is not None else DEFAULT_ORDER
    chosen = first_in_order(order, arts, lambda art: art.runtime.unmet(runtimes) is None)
    if chosen is not None:
        return Choice(Outcome.CHOSEN, chosen.name)
    have = ", ".join(f"{k} {v}" for k, v in sorted(runtimes.items())) or "no runtime"
    wanted = ", ".join(str(c) for c in order)
    return Choice(Outcome.UNSUITABLE, reason=(
        f"no artifact of {ref} suits it: the bundle has {', '.join(a.name for a in arts)}; the device "
        f"({profile or 'no profile'}) takes {wanted} and reported {have}"))
