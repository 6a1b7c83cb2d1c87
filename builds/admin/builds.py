"""The admin's build pages: read-only history (builds change only through the services:
trigger, retry, cancel), with the variables, the stage/job/step tree and each step's log.
The page's tables are its template's (admin/builds/build/change_form.html); what changes
while a build runs is read once per page (BuildAdmin.live_context) and again by its live
view, which renders the same parts as a fragment the page's script polls while the build is
not final (admin/builds/build/live.html): one set of rules for the page and its updates."""

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from urllib.parse import urlencode

from django.contrib import admin, messages
from django.contrib.admin.utils import display_for_field, lookup_field
from django.db.models import F, Prefetch
from django.http import Http404, HttpResponseNotAllowed
from django.shortcuts import get_object_or_404, redirect
from django.template.defaultfilters import linebreaksbr
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import conditional_escape, format_html

from access import rules as access
from access.admin_mixins import PipelineScoped
from builds import services
from builds.admin.cancelling import CancelsBuilds
from builds.errors import StepNotRetryable
from builds.models import Build, BuildVariable, JobRun, StepRun
from builds.services import retry as retry_service
from builds.source import Source
from builds.stages import group_stages
from builds.statuses import BUILD_FINAL, BuildStatus, RunStatus, build_allowed_from
from ciproject.admin_mixins import ReadOnlyAdmin
from ciproject.errors import CIError
from ciproject.formatting import human_duration

LOG_TAIL_LINES = 200
LIVE_LOG_LINES = 2000  # the build page's live log keeps this many lines of its tail
EMPTY = "-"  # the admin's empty value display
# The build's read-only fields that change while it runs: the live view sends them again.
LIVE_FIELDS = ["status", "attempt", "reason", "started_at", "finished_at", "duration_display"]


@dataclass(frozen=True)
class Duration:
    """How long something ran, for the page: from its start to its end, or to now while it
    runs (`ticking`: the page's script counts on from its ends in epoch milliseconds). One
    that has no end and no longer runs has none to show."""

    started: datetime | None
    finished: datetime | None
    ticking: bool = False

    @classmethod
    def of(cls, started, finished, running: bool) -> "Duration":
        return cls(started, finished, bool(started and running and not finished))

    @property
    def html(self):
        if self.started is None or not (self.finished or self.ticking):
            return EMPTY
        ends = format_html(' data-finished-ms="{}"', _epoch_ms(self.finished))
        # A clock a little behind the one that stamped the start shows 0s, not less.
        lasted = max((self.finished or timezone.now()) - self.started, timedelta(0))
        return format_html(
            '<span class="ci-duration{}" data-started-ms="{}"{}>{}</span>',
            " ci-ticking" if self.ticking else "",
            _epoch_ms(self.started),
            ends if self.finished else "",
            human_duration(lasted),
        )


@dataclass(frozen=True)
class TreeStep:
    """A step of the build page's tree, with its log links (the admin's page, the API's
    text) and, if this user may retry it now, the form its Retry button submits."""

    step: StepRun
    log_url: str
    api_log_url: str = ""
    duration: Duration | None = None
    retry_form_id: str = ""
    retry_url: str = ""


@dataclass(frozen=True)
class TreeJob:
    job: JobRun
    duration: Duration
    steps: list[TreeStep] = field(default_factory=list)


@admin.register(Build)
class BuildAdmin(CancelsBuilds, ReadOnlyAdmin, PipelineScoped, admin.ModelAdmin):
    """Builds change only through the services (trigger, retry, cancel)."""

    change_action = None

    list_display = ["pipeline", "number", "status", "attempt", "triggered_by", "created_at"]
    list_display += ["duration_display"]
    list_filter = ["status", "pipeline", "created_at"]
    list_select_related = ["pipeline", "triggered_by"]
    search_fields = ["pipeline__name"]
    date_hierarchy = "created_at"
    # The variables and the stage/job/step tree follow, from the template.
    fields = readonly_fields = [
        "pipeline",
        "number",
        "status",
        "attempt",
        "triggered_by",
        "commit",
        "reason",
        "created_at",
        "started_at",
        "finished_at",
        "duration_display",
    ]

    actions = ["cancel_builds"]

    def get_queryset(self, request):
        # Annotated so the duration column can be sorted on.
        return super().get_queryset(request).annotate(run_time=F("finished_at") - F("started_at"))

    @admin.display(description="duration", ordering="run_time")
    # The read-only fields of the change page show None as "None": give the admin's "-".
    def duration_display(self, obj):
        if obj.duration is None:
            return self.get_empty_value_display()
        return human_duration(obj.duration)

    @admin.display(description="commit")
    def commit(self, obj):
        source = Source.of(obj.source)
        if source is None:
            return self.get_empty_value_display()
        on = source.tag or source.branch or source.ref
        pull = f", pull request #{source.pull_request}" if source.pull_request else ""
        fork = " from a fork (untrusted)" if source.fork else ""
        return f"{source.sha[:12]} on {on} ({source.event}{pull}{fork})"

    def has_retry_permission(self, request, build: Build) -> bool:
        return self.may(request, access.RETRY, build)

    def _variables(self, build) -> list[tuple[str, str, str]]:
        """(name, value, source) of the build's variables, by name."""
        # build_created_at is part of the key so the lookup is pruned to one partition.
        rows = BuildVariable.objects.filter(build_created_at=build.created_at, build=build)
        return list(rows.order_by("name").values_list("name", "value", "source"))

    def _tree(self, request, build) -> list:
        """The build's stages as [(stage, [TreeJob, ...]), ...]: its jobs and their steps
        read once, a Retry form for each step this user may retry now."""
        steps = StepRun.objects.order_by("index")
        jobs = JobRun.objects.filter(build=build).order_by("stage_index", "id")
        jobs = jobs.prefetch_related(Prefetch("steps", steps))
        # A finished build's steps run again only within its retry window: the same rule.
        can_retry = self.has_retry_permission(request, build) and (
            build.status not in BUILD_FINAL
            or services.can_retry(build, include_succeeded=True).allowed
        )
        return [
            (
                stage,
                [
                    TreeJob(
                        job,
                        Duration.of(
                            job.started_at, job.finished_at, job.status == RunStatus.RUNNING
                        ),
                        [self._tree_step(build, job, step, can_retry) for step in job.steps.all()],
                    )
                    for job in stage.jobs
                ],
            )
            for stage in group_stages(jobs)
        ]

    def _tree_step(self, build, job, step, can_retry) -> TreeStep:
        url = f"{self.admin_site.name}:builds_build_step_log"
        log_url = reverse(url, args=(build.pk, step.pk))
        api_log_url = reverse("build-log", kwargs={"pk": build.pk, "step_id": step.pk})
        running = step.status == RunStatus.RUNNING
        duration = Duration.of(step.started_at, step.finished_at, running)
        # The tree sits inside the change form, where a form may not be nested: the button
        # submits a form of its own, rendered outside (the template's object-tools block).
        if not (can_retry and _step_retryable(build, job, step)):
            return TreeStep(step, log_url, api_log_url, duration)
        retry_url = reverse(
            f"{self.admin_site.name}:builds_build_step_retry", args=(build.pk, step.pk)
        )
        return TreeStep(step, log_url, api_log_url, duration, f"retry-step-{step.pk}", retry_url)

    def live_context(self, request, build) -> dict:
        """What the build page shows that changes while the build runs, read now: its fields,
        its Cancel and Retry buttons (by the same rules as their views), its variables,
        artifacts and tree, and the step whose log the page follows. The change page renders
        it once; the live view again, for the page's script."""
        tree = self._tree(request, build)
        steps = [entry for _, jobs in tree for job in jobs for entry in job.steps]
        context = {
            "live_url": reverse(f"{self.admin_site.name}:builds_build_live", args=(build.pk,)),
            "live_final": build.status in BUILD_FINAL,
            "live_now_ms": _epoch_ms(timezone.now()),
            "live_fields": self._live_fields(build),
            "followed": _followed_step(steps),
            "log_tail_lines": LIVE_LOG_LINES,
            "can_cancel": build.status in build_allowed_from(BuildStatus.CANCELLING)
            and self.has_cancel_permission(request, build),
            "cancel_url": reverse(f"{self.admin_site.name}:builds_build_cancel", args=(build.pk,)),
            "variables": self._variables(build),
            "artifacts": build.artifacts.select_related("job"),
            "tree": tree,
            "retry_forms": [(e.retry_form_id, e.retry_url) for e in steps if e.retry_form_id],
            "empty_value_display": self.get_empty_value_display(),
        }
        if self.has_retry_permission(request, build) and build.status in BUILD_FINAL:
            rerun_all = build.status == BuildStatus.SUCCEEDED
            decision = services.can_retry(build, include_succeeded=rerun_all)
            context["build_retry"] = {
                "allowed": decision.allowed,
                "reason": decision.reason,
                "all": rerun_all,
                "url": reverse(f"{self.admin_site.name}:builds_build_retry", args=(build.pk,)),
            }
        return context

    def _live_fields(self, build) -> list[tuple[str, str]]:
        """(name, HTML) of the read-only fields that change while the build runs, as the
        admin renders a read-only field (AdminReadonlyField.contents), but the status as a
        badge and a running build's duration counting."""
        empty = self.get_empty_value_display()
        shown = []
        for name in LIVE_FIELDS:
            if name == "status":
                html = _status_badge(build.status, build.get_status_display())
            elif name == "duration_display":
                running = build.status in (BuildStatus.RUNNING, BuildStatus.CANCELLING)
                html = Duration.of(build.started_at, build.finished_at, running).html
            else:
                f, _, value = lookup_field(name, build, self)
                html = conditional_escape(linebreaksbr(display_for_field(value, f, empty)))
            shown.append((name, html))
        return shown

    def render_change_form(self, request, context, add=False, change=False, form_url="", obj=None):
        if obj is not None:
            context.update(self.live_context(request, obj))
        return super().render_change_form(request, context, add, change, form_url, obj)

    def live_view(self, request, build_id):
        """The build page's live parts (LIVE_FIELDS, buttons, variables, artifacts, tree),
        rendered afresh as one fragment: the page's script swaps them in."""
        build = get_object_or_404(Build.objects.select_related("pipeline"), pk=build_id)
        access.require(request.user, access.VIEW_BUILDS, build.pipeline)
        context = {"opts": self.model._meta, "original": build, **self.live_context(request, build)}
        # Never cached: admin_view's never_cache.
        return TemplateResponse(request, "admin/builds/build/live.html", context)

    @admin.action(description="Cancel selected builds", permissions=["cancel"])
    def cancel_builds(self, request, queryset):
        for build in queryset.select_related("pipeline"):
            if self.has_cancel_permission(request, build):
                self.cancel_build(request, build)
            else:
                self.message_user(request, f"Build {build}: you may not cancel it", messages.ERROR)

    def cancel_view(self, request, build_id):
        next_url = reverse(f"{self.admin_site.name}:builds_build_change", args=(build_id,))
        return self.cancel_build_response(request, Build.objects.all(), build_id, next_url)

    def retry_view(self, request, build_id):
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        build = get_object_or_404(Build.objects.select_related("pipeline"), pk=build_id)
        access.require(request.user, access.RETRY, build.pipeline)  # 404 to who sees nothing
        try:  # the server asks can_retry again: the page may be stale
            build = services.retry_build(build.pk, request.POST.get("all") != "1", request.user)
        except CIError as exc:
            self.message_user(request, f"Build {build}: {exc.code}: {exc.detail}", messages.ERROR)
        else:
            self.message_user(
                request, f"Build {build}: retried, attempt {build.attempt}, {build.status}"
            )
        return redirect(reverse(f"{self.admin_site.name}:builds_build_change", args=(build_id,)))

    def get_urls(self):
        # Before the defaults: their "<path:object_id>/" would swallow this URL.
        return [
            path(
                "<int:build_id>/cancel/",
                self.admin_site.admin_view(self.cancel_view),
                name="builds_build_cancel",
            ),
            path(
                "<int:build_id>/retry/",
                self.admin_site.admin_view(self.retry_view),
                name="builds_build_retry",
            ),
            path(
                "<int:build_id>/steps/<int:step_id>/retry/",
                self.admin_site.admin_view(self.step_retry_view),
                name="builds_build_step_retry",
            ),
            path(
                "<int:build_id>/steps/<int:step_id>/log/",
                self.admin_site.admin_view(self.step_log_view),
                name="builds_build_step_log",
            ),
            path(
                "<int:build_id>/live/",
                self.admin_site.admin_view(self.live_view),
                name="builds_build_live",
            ),
            *super().get_urls(),
        ]

    def step_retry_view(self, request, build_id, step_id):
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        build = get_object_or_404(Build.objects.select_related("pipeline"), pk=build_id)
        access.require(request.user, access.RETRY, build.pipeline)
        try:
            step = services.retry_step(build.pk, step_id)
        except CIError as exc:
            self.message_user(request, f"Build {build}: {exc.code}: {exc.detail}", messages.WARNING)
        else:
            self.message_user(
                request,
                f"Build {build}: step '{step.name}' retried, attempt {step.attempt}",
                messages.SUCCESS,
            )
        return redirect(reverse(f"{self.admin_site.name}:builds_build_change", args=(build_id,)))

    def step_log_view(self, request, build_id, step_id):
        step = get_object_or_404(
            StepRun.objects.select_related("job__build__pipeline"),
            pk=step_id,
            job__build_id=build_id,
        )
        build = step.job.build
        access.require(request.user, access.VIEW_BUILDS, build.pipeline)
        attempt = request.GET.get("attempt", str(step.attempt))
        if not attempt.isdecimal() or not 1 <= int(attempt) <= step.attempt:
            raise Http404(f"step {step.pk} has attempts 1 to {step.attempt}")
        attempt = int(attempt)
        full = request.GET.get("full") == "1"
        text = services.step_log(step, attempt)
        # A log may be 1 MiB: by default show its tail only.
        lines = text.splitlines(keepends=True)
        hidden = 0 if full else max(0, len(lines) - LOG_TAIL_LINES)
        if hidden:
            text = "".join(lines[hidden:])
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": f"{build} / {step.job.key} / {step.name}: log, attempt {attempt}",
            "build": build,
            "step": step,
            "attempt": attempt,
            "attempts": [(n, "?" + urlencode({"attempt": n})) for n in range(1, step.attempt + 1)],
            "log": text,
            "hidden_lines": hidden,
            "full_url": "?" + urlencode({"attempt": attempt, "full": 1}),
            "build_url": reverse(f"{self.admin_site.name}:builds_build_change", args=(build.pk,)),
        }
        return TemplateResponse(request, "admin/builds/build/step_log.html", context)


def _step_retryable(build, job, step) -> bool:
    """The retry service's own rule, so the button and the service never disagree."""
    try:
        retry_service.check_step_retryable(build, job, step)
    except StepNotRetryable:
        return False
    return True


def _followed_step(steps: list[TreeStep]) -> TreeStep | None:
    """The step whose log the build page follows: the first running one (in the tree's
    order), else the one that started last (the failed step of a failed build, mostly)."""
    for entry in steps:
        if entry.step.status == RunStatus.RUNNING:
            return entry
    started = [entry for entry in steps if entry.step.started_at]
    return max(started, key=lambda entry: entry.step.started_at, default=None)


def _epoch_ms(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp() * 1000)


def _status_badge(status: str, text: str):
    """A status in its colour and icon (the page's style: .ci-status[data-status])."""
    return format_html('<span class="ci-status" data-status="{}">{}</span>', status, text)
