"""Prometheus metrics of events, defined once and observed where things happen. They live in
prometheus-client's multiprocess files (settings.METRICS_DIR), so /metrics on web also sums
what the controller and beat observed. The state metrics are read from PostgreSQL at each
scrape: ciproject.monitoring."""

from prometheus_client import Counter, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 15, 30, 60, 120)

CANCEL_REQUEST_SECONDS = Histogram(
    "ciproject_cancel_request_seconds",
    "Time to answer a cancel request (the compare-and-set to CANCELLING).",
    buckets=LATENCY_BUCKETS,
)
CANCEL_TO_CANCELED = Histogram(
    "ciproject_cancel_to_canceled_seconds",
    "Time from a cancel request to the build's CANCELED.",
    buckets=DURATION_BUCKETS,
)
PURGE_SECONDS = Histogram(
    "ciproject_partition_purge_seconds",
    "Time to purge expired variable partitions.",
    buckets=DURATION_BUCKETS,
)
BUILD_RETRIES_REFUSED = Counter(
    "ciproject_build_retries_refused",
    "Build retries refused, by reason (the error code).",
    ["reason"],
)
ADMISSIONS = Counter(
    "ciproject_admissions",
    "Builds admitted by a concurrency policy, by result: running, queued, rejected (queue"
    " full), evicted (an older queued build cancelled to make room).",
    ["result"],
)
STEP_RETRIES = Counter("ciproject_step_retries", "Steps retried by hand (API, admin, CLI).")
AGENTS_LOST = Counter(
    "ciproject_agents_lost", "Agents marked offline because their heartbeats stopped."
)

# Observed on the agents, served by each build node itself (AGENT_METRICS_PORT):
# agents.process.metrics.
AGENT_STEPS = Counter(
    "ciproject_agent_steps", "Step attempts run by an agent, by result.", ["agent", "status"]
)
AGENT_STEP_SECONDS = Histogram(
    "ciproject_agent_step_seconds",
    "How long a step attempt ran on an agent.",
    ["agent"],
    buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600),
)
