"""What the server and the agents say to each other through the broker, in one place: the
queues, the task names, the id of a job's message, an agent's Celery node name and the
remote-control commands. The sending side is dispatch; the receiving side is the agent
process (agents.process) and the controller's tasks."""

CONTROLLER_QUEUE = "controller"

# Tasks, by the names their modules give them (agents.tasks, builds.tasks).
RUN_JOB = "agents.tasks.run_job"
ADVANCE_BUILD = "builds.tasks.advance_build"
SEAL_SECRETS = "vault.tasks.seal_secrets"
FINISH_CANCEL = "builds.tasks.finish_cancel"

# Remote-control commands an agent answers (agents.process.control).
STOP_JOB = "stop_job"  # {job_id, attempt}: stop that attempt's steps
REVOKE_JOBS = "revoke_jobs"  # {task_ids}: drop those job messages when they arrive
SYNC_CONSUMERS = "sync_consumers"  # re-read what the server says of this agent


def job_queue(label: str) -> str:
    """Where new jobs for a label wait for any agent that has it."""
    return f"jobs.{label}"


def retry_queue(label: str) -> str:
    """Where retried jobs wait: agents consume it beside jobs.<label>, so a retry is never
    stuck behind a backlog of new builds."""
    return f"retry.{label}"


def agent_queue(name: str) -> str:
    """Work pinned to one agent (agent reuse)."""
    return f"agent.{name}"


def job_task_id(job_id: int, attempt: int) -> str:
    """A job attempt's message id: a new attempt is a new message, so a revoked or late one
    of an earlier attempt never stands for it."""
    return f"job-{job_id}-{attempt}"


def node_name(agent: str, hostname: str) -> str:
    """The Celery node name of an agent (`runagent` starts its worker with it)."""
    return f"{agent}@{hostname}"
