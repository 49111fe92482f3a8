"""The agent's Prometheus text (``/metrics`` of the local API): a pure function of what it is given."""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.install import Step

if TYPE_CHECKING:
    from agent.predictor import Predictor

__all__ = ["metrics_text"]


def metrics_text(*, connected: bool, outbox: int, step: Step, pred: Predictor | None, slot: str | None) -> str:
    """Metrics in the Prometheus text format: the connection, the outbox, the install step and, while a
    model is served (``pred``, from ``slot``), its request counters and latency histogram."""
    lines = [
        "# HELP edgeherd_agent_connected 1 while connected to the broker.",
        "# TYPE edgeherd_agent_connected gauge",
        f"edgeherd_agent_connected {int(connected)}",
        "# HELP edgeherd_agent_outbox_messages Reports waiting to be sent.",
        "# TYPE edgeherd_agent_outbox_messages gauge",
        f"edgeherd_agent_outbox_messages {outbox}",
        "# HELP edgeherd_agent_install_step Current step of the install state machine.",
        "# TYPE edgeherd_agent_install_step gauge",
        f'edgeherd_agent_install_step{{step="{step.value}"}} 1',
    ]
    if pred is not None:
        from agent.window import LATENCY_EDGES_MS  # loaded with the model (agent.predictor)

        s = pred.stats
        m = pred.manifest
        lines += [
            "# HELP edgeherd_agent_model_info The model being served.",
            "# TYPE edgeherd_agent_model_info gauge",
            f'edgeherd_agent_model_info{{model="{m.model}",version="{m.version}",'
            f'artifact="{pred.artifact.name}",slot="{slot}"}} 1',
            "# HELP edgeherd_agent_requests_total Inference requests served.",
            "# TYPE edgeherd_agent_requests_total counter",
            f"edgeherd_agent_requests_total {s.lifetime_requests}",
            "# HELP edgeherd_agent_request_errors_total Inference requests refused or failed.",
            "# TYPE edgeherd_agent_request_errors_total counter",
            f"edgeherd_agent_request_errors_total {s.lifetime_errors}",
            "# HELP edgeherd_agent_stats_dropped_rows_total Rows left out of statistics under overload.",
            "# TYPE edgeherd_agent_stats_dropped_rows_total counter",
            f"edgeherd_agent_stats_dropped_rows_total {pred.stats_dropped_rows}",
            "# HELP edgeherd_agent_latency_ms Inference latency in milliseconds.",
            "# TYPE edgeherd_agent_latency_ms histogram",
        ]
        cumulative = 0
        for edge, count in zip(LATENCY_EDGES_MS[1:], s.lifetime_latency_counts, strict=True):
            cumulative += count
            lines.append(f'edgeherd_agent_latency_ms_bucket{{le="{edge}"}} {cumulative}')
        lines += [f'edgeherd_agent_latency_ms_bucket{{le="+Inf"}} {cumulative}',
                  f"edgeherd_agent_latency_ms_sum {s.lifetime_latency_sum}",
                  f"edgeherd_agent_latency_ms_count {cumulative}"]
    return "\n".join(lines) + "\n"
