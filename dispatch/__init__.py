"""Placing jobs on agents: the one layer between builds.services and the broker.

- messages: every message the server publishes (jobs to label and agent queues, the
  controller's advance and finish-cancel, the agents' stop, revoke and sync commands);
- leases: agent leases and lease waits (agent reuse), PostgreSQL the arbiter;
- placement: where a queued job goes (its label's queue, or the one agent it is bound to),
  resending lost messages.

It depends on the models (with builds.statuses), the Celery app and the message protocol
only, never on builds.services or on the agent
process: what to do with a job that cannot be placed (fail it, advance its build) is for
builds.services to decide, from what these functions return. (DESIGN.md principle 8.)"""
