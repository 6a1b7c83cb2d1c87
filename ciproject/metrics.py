"""Prometheus metrics, defined once and observed where things happen."""

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
