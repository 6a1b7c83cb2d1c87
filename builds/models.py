from django.conf import settings
from django.db import models

from builds.statuses import BUILD_LIVE, KEEPS_WORKSPACE, BuildStatus, RunStatus


class Pipeline(models.Model):
    name = models.CharField(max_length=100, unique=True)
    definition = models.TextField(help_text="YAML: variables, stages, jobs, steps.")
    # The validated, normalized definition; written only together with `definition`.
    spec = models.JSONField(editable=False)
    last_build_number = models.PositiveIntegerField(default=0, editable=False)
    policy = models.ForeignKey(
        "concurrency.ConcurrencyPolicy",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="pipelines",
        help_text="Concurrency policy; none means unlimited. `concurrency: NAME` in the YAML "
        "sets it.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def parameters(self) -> dict:
        """What a trigger may set, by name (builds.parameters); empty: the names of its
        `variables:`, with any value."""
        return (self.spec or {}).get("parameters", {})


class Build(models.Model):
    pipeline = models.ForeignKey(Pipeline, on_delete=models.PROTECT, related_name="builds")
    number = models.PositiveIntegerField()
    status = models.CharField(max_length=16, choices=BuildStatus.choices, db_index=True)
    attempt = models.PositiveIntegerField(default=1)
    # The pipeline's spec at trigger time: editing the pipeline never changes a build.
    spec = models.JSONField(editable=False)
    triggered_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    reason = models.TextField(blank=True, default="")
    # Admission: the policy the build was admitted by, its rendered group, and its place in
    # the group's queue (a build put back by a step retry waits at the head: priority 1).
    policy = models.ForeignKey(
        "concurrency.ConcurrencyPolicy", null=True, blank=True, on_delete=models.SET_NULL
    )
    concurrency_group = models.CharField(max_length=400, blank=True, default="", db_index=True)
    enqueued_at = models.DateTimeField(null=True, blank=True)
    queue_priority = models.PositiveSmallIntegerField(default=0)
    # Its priority (the pipeline's, or its trigger's up to the pipeline's max-priority): the
    # queue starts higher ones first, FIFO within one.
    priority = models.PositiveSmallIntegerField(default=0)
    cancel_requested_at = models.DateTimeField(null=True, blank=True)
    # A second cancel of a CANCELLING build: its cleanup steps are stopped too.
    cancel_forced_at = models.DateTimeField(null=True, blank=True)
    # Gets no secrets (the pipeline's `untrusted: true`, or a pull request from a fork).
    untrusted = models.BooleanField(default=False, editable=False)
    # The commit it builds, when a forge's webhook, a schedule or a run-now made it
    # (builds.source.Source); empty for a build of no commit.
    source = models.JSONField(default=dict, blank=True, editable=False)
    # Its status when the cancel came: only a build that was RUNNING (holding its slot) runs
    # the jobs whose condition holds after a cancel.
    cancelled_from = models.CharField(max_length=16, blank=True, default="", editable=False)
    cancel_requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    created_at = models.DateTimeField(db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # A client's key for the trigger that made the build: the same trigger again (a retry
    # after a lost answer) returns this build rather than making another. The fingerprint is
    # of the variables it was triggered with, to tell a retry from a reuse of the key.
    idempotency_key = models.CharField(max_length=200, blank=True, default="")
    idempotency_fingerprint = models.CharField(max_length=64, blank=True, default="")

    class Meta:
        ordering = ["-id"]
        constraints = [
            models.UniqueConstraint(fields=["pipeline", "number"], name="build_number_unique"),
            models.UniqueConstraint(
                fields=["pipeline", "idempotency_key"],
                condition=~models.Q(idempotency_key=""),
                name="build_idempotency_key_unique",
            ),
        ]
        indexes = [
            # A group's live builds, which admission counts with the group locked: the
            # finished ones, its whole history, are not in it.
            models.Index(
                fields=["concurrency_group", "status"],
                condition=models.Q(status__in=BUILD_LIVE),
                name="build_live_in_group",
            ),
        ]
        permissions = [
            ("cancel_build", "Can cancel builds"),
            ("retry_build", "Can retry builds and their steps"),
        ]

    def __str__(self) -> str:
        return f"{self.pipeline.name} #{self.number}"

    @property
    def duration(self):
        if self.started_at and self.finished_at:
            return self.finished_at - self.started_at
        return None


class JobRunQuerySet(models.QuerySet):
    # JobRun.bound, in SQL.
    BOUND = ~models.Q(reuse_of="") | (models.Q(takes_lease=True) & ~models.Q(agent=""))
    USES_LEASE = models.Q(takes_lease=True) | ~models.Q(reuse_of="")

    def using_lease(self):
        """The jobs that need their build to hold an agent's lease (see JobRun.uses_lease)."""
        return self.filter(self.USES_LEASE)

    def unbound(self):
        return self.exclude(self.BOUND)

    def bound_to(self, agent: str):
        """The jobs that may run on `agent` only."""
        reused = JobRun.objects.filter(
            build_id=models.OuterRef("build_id"), key=models.OuterRef("reuse_of"), agent=agent
        )
        return self.filter(
            models.Q(takes_lease=True, agent=agent)
            | (~models.Q(reuse_of="") & models.Exists(reused))
        )


class JobRun(models.Model):
    build = models.ForeignKey(Build, on_delete=models.CASCADE, related_name="jobs")
    stage_index = models.PositiveSmallIntegerField()
    stage_name = models.CharField(max_length=100)
    key = models.CharField(
        max_length=255,
        help_text="The job's id in the pipeline definition, or its matrix run's name.",
    )
    runs_on = models.CharField(max_length=64)
    # What it waits for (builds.dag): the ids of the jobs it needs; None, every job of the
    # earlier stages. Its `if:` ("": success()).
    needs = models.JSONField(null=True, blank=True)
    condition = models.CharField(max_length=1000, blank=True, default="")
    # A matrix run: its job's id and its values (MATRIX_* in its steps' environment).
    matrix_of = models.CharField(max_length=64, blank=True, default="")
    matrix = models.JSONField(null=True, blank=True)
    status = models.CharField(
        max_length=16, choices=RunStatus.choices, default=RunStatus.PENDING, db_index=True
    )
    attempt = models.PositiveIntegerField(default=1)
    agent = models.CharField(max_length=100, blank=True, default="")
    # Agent reuse: `reuse_of` is the key of the job whose agent (and workspace) this job
    # must run on; `takes_lease` marks that job, which leases its agent to the build.
    reuse_of = models.CharField(max_length=64, blank=True, default="")
    takes_lease = models.BooleanField(default=False)
    # Seconds for all its steps together, per attempt; None: only each step's own timeout.
    timeout = models.PositiveIntegerField(null=True, blank=True)
    # Its cleanup after a cancel (the steps whose condition runs them then: always(),
    # cancelled()): at most cleanup_timeout seconds, until cleanup_deadline (set by the
    # server when the agent begins it; the cancel watchdog waits for it).
    cleanup_timeout = models.PositiveIntegerField(default=300)
    cleanup_deadline = models.DateTimeField(null=True, blank=True)
    # The agent keeping this job's workspace since it failed there, for its step retry
    # (AGENT_KEEP_FAILED_WORKSPACE_SECONDS); cleared when the job starts again.
    kept_workspace_on = models.CharField(max_length=100, blank=True, default="")
    # The server stopped this attempt on its agent (fail-fast), which ends it CANCELED with
    # `reason`; cleared when the job runs again.
    stop_requested_at = models.DateTimeField(null=True, blank=True)
    reason = models.TextField(blank=True, default="")
    queued_at = models.DateTimeField(null=True, blank=True)
    # When the reconcile sweep last sent its message again (a lost message): at most once
    # per JOB_RESEND_AFTER_SECONDS.
    resent_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    objects = JobRunQuerySet.as_manager()

    class Meta:
        ordering = ["stage_index", "id"]
        constraints = [models.UniqueConstraint(fields=["build", "key"], name="job_key_unique")]

    def __str__(self) -> str:
        return f"{self.build} / {self.key}"

    @property
    def uses_lease(self) -> bool:
        """It takes its agent's lease for the build, or runs on a leased agent: its workspace
        is the build's, kept until the lease ends."""
        return self.takes_lease or bool(self.reuse_of)

    def keeps_workspace_after(self, status: str) -> bool:
        """Whether the agent keeps the workspace once the job ends so, for its step retry
        (a leased workspace is kept for the build anyway)."""
        return (
            status in KEEPS_WORKSPACE
            and not self.uses_lease
            and settings.AGENT_KEEP_FAILED_WORKSPACE_SECONDS > 0
        )

    @property
    def definition(self) -> dict:
        """The job's definition as its build has it (a matrix run's: its job's)."""
        wanted = self.matrix_of or self.key
        for stage in self.build.spec["stages"]:
            for spec in stage["jobs"]:
                if spec["id"] == wanted:
                    return spec
        raise LookupError(f"job {wanted!r} is not in the definition of {self.build}")

    def waits_for(self) -> models.QuerySet:
        """The jobs of its build it waits for directly (its `needs`, or without them every
        job of the earlier stages), a matrix job's runs each."""
        others = JobRun.objects.filter(build_id=self.build_id)
        if self.needs is None:
            return others.filter(stage_index__lt=self.stage_index)
        return others.filter(models.Q(key__in=self.needs) | models.Q(matrix_of__in=self.needs))

    @property
    def bound(self) -> bool:
        """The rule "this job runs on one agent only": it reuses another job's agent, or it
        is a lease-taking job that ran before (its workspace is on that agent)."""
        return bool(self.reuse_of) or (self.takes_lease and bool(self.agent))

    def bound_agent(self) -> str | None:
        """The agent a bound job must run on ("" if the job it reuses has not run); None
        for a job any agent with its label may run."""
        if self.reuse_of:
            owner = JobRun.objects.filter(build_id=self.build_id, key=self.reuse_of)
            return owner.values_list("agent", flat=True).first() or ""
        return self.agent if self.bound else None


class StepRun(models.Model):
    job = models.ForeignKey(JobRun, on_delete=models.CASCADE, related_name="steps")
    index = models.PositiveSmallIntegerField()
    name = models.CharField(max_length=100)
    command = models.TextField()
    condition = models.CharField(max_length=1000, blank=True, default="")  # `if:`; "": success()
    timeout = models.PositiveIntegerField()
    max_retries = models.PositiveSmallIntegerField(default=0)
    # What an automatic retry is for ({"on", "on_exit_codes", "backoff"}: builds.definition
    # RetrySpec); None: any failure or timeout, at once.
    retry_rule = models.JSONField(null=True, blank=True)
    continue_on_error = models.BooleanField(default=False)
    # Seconds from SIGTERM to SIGKILL when it is stopped; None: STEP_KILL_GRACE_SECONDS. A
    # fenced agent uses the shorter of the two (its fence arithmetic: ciproject.checks), and
    # the cancel watchdog waits for the longer one.
    kill_grace = models.PositiveSmallIntegerField(null=True, blank=True)
    # The step's own limits; None takes the agent's default (AGENT_STEP_MAX_*).
    max_processes = models.PositiveIntegerField(null=True, blank=True)
    max_memory = models.PositiveBigIntegerField(null=True, blank=True)  # bytes
    status = models.CharField(max_length=16, choices=RunStatus.choices, default=RunStatus.PENDING)
    attempt = models.PositiveIntegerField(default=1)
    exit_code = models.IntegerField(null=True, blank=True)
    reason = models.TextField(blank=True, default="")  # why it was skipped
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["job_id", "index"]
        constraints = [models.UniqueConstraint(fields=["job", "index"], name="step_index_unique")]

    def __str__(self) -> str:
        return f"{self.job} / {self.name}"


class StepLogChunk(models.Model):
    """A piece of a step attempt's output, appended in order by the agent."""

    step = models.ForeignKey(StepRun, on_delete=models.CASCADE, related_name="log_chunks")
    attempt = models.PositiveIntegerField()
    seq = models.PositiveIntegerField()
    text = models.TextField()

    class Meta:
        ordering = ["step_id", "attempt", "seq"]
        constraints = [
            models.UniqueConstraint(fields=["step", "attempt", "seq"], name="log_chunk_unique")
        ]

    def __str__(self) -> str:
        return f"step {self.step_id} attempt {self.attempt} #{self.seq}"


class BuildVariable(models.Model):
    """A build's variables. Keyed by the build's creation time as well as the build, so the
    table can be range-partitioned by time and one build's rows always share a partition."""

    pk = models.CompositePrimaryKey("build_created_at", "build", "name")
    build_created_at = models.DateTimeField()
    build = models.ForeignKey(Build, on_delete=models.DO_NOTHING, related_name="variables")
    name = models.CharField(max_length=128)
    value = models.TextField()
    source = models.CharField(
        max_length=16, choices=[("pipeline", "pipeline"), ("trigger", "trigger"), ("step", "step")]
    )
    # What a step overwrote: the value and source the build was triggered with, so a full
    # retry starts from them again.
    triggered_value = models.TextField(null=True, blank=True)
    triggered_source = models.CharField(max_length=16, blank=True, default="", db_default="")

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name}={self.value[:40]}"


class PartitionState(models.TextChoices):
    LIVE = "live"
    DETACHING = "detaching"
    DROPPED = "dropped"


class VariablePartition(models.Model):
    """A partition of the variable table, as PostgreSQL's catalog last showed it (see
    builds.partitions: the catalog is the truth, this row its mirror for the admin)."""

    name = models.CharField(max_length=100, unique=True)
    range_start = models.DateTimeField()
    range_end = models.DateTimeField()
    rows_estimate = models.BigIntegerField(default=0)
    state = models.CharField(max_length=16, choices=PartitionState.choices)
    dropped_at = models.DateTimeField(null=True, blank=True)
    dropped_by = models.CharField(max_length=200, blank=True, default="")

    class Meta:
        ordering = ["range_start"]

    def __str__(self) -> str:
        return self.name
