"""The admin's build pages: read-only history (builds change only through the services:
trigger, retry, cancel), with the variables, the stage/job/step tree and each step's log.
The page's tables are its template's (admin/builds/build/change_form.html); the tree is read
once per page, in render_change_form."""

from dataclasses import dataclass
from urllib.parse import urlencode

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import F, Prefetch
from django.http import Http404, HttpResponseNotAllowed
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse

from builds import services
from builds.admin.cancelling import CancelsBuilds
from builds.errors import StepNotRetryable
from builds.models import Build, BuildVariable, JobRun, StepRun
from builds.services import retry as retry_service
from builds.source import Source
from builds.stages import group_stages
from builds.statuses import BUILD_FINAL, BuildStatus, build_allowed_from
from ciproject.admin_mixins import ReadOnlyAdmin
from ciproject.errors import CIError
from ciproject.formatting import human_duration

LOG_TAIL_LINES = 200


@dataclass(frozen=True)
class TreeStep:
    """A step of the build page's tree, with its log link and, if this user may retry it
    now, the form its Retry button submits."""

    step: StepRun
    log_url: str
    retry_form_id: str = ""
    retry_url: str = ""


@admin.register(Build)
class BuildAdmin(CancelsBuilds, ReadOnlyAdmin, admin.ModelAdmin):
    """Builds change only through the services (trigger, retry, cancel)."""

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

    def has_retry_permission(self, request):
        return request.user.has_perm("builds.retry_build")

    def _variables(self, build) -> list[tuple[str, str, str]]:
        """(name, value, source) of the build's variables, by name."""
        # build_created_at is part of the key so the lookup is pruned to one partition.
        rows = BuildVariable.objects.filter(build_created_at=build.created_at, build=build)
        return list(rows.order_by("name").values_list("name", "value", "source"))

    def _tree(self, request, build) -> list:
        """The build's stages as [(stage, [(job, [TreeStep, ...]), ...]), ...]: its jobs and
        their steps read once, a Retry form for each step this user may retry now."""
        steps = StepRun.objects.order_by("index")
        jobs = JobRun.objects.filter(build=build).order_by("stage_index", "id")
        jobs = jobs.prefetch_related(Prefetch("steps", steps))
        # A finished build's steps run again only within its retry window: the same rule.
        can_retry = self.has_retry_permission(request) and (
            build.status not in BUILD_FINAL
            or services.can_retry(build, include_succeeded=True).allowed
        )
        return [
            (
                stage,
                [
                    (
                        job,
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
        # The tree sits inside the change form, where a form may not be nested: the button
        # submits a form of its own, rendered outside (the template's object-tools block).
        if not (can_retry and _step_retryable(build, job, step)):
            return TreeStep(step, log_url)
        retry_url = reverse(
            f"{self.admin_site.name}:builds_build_step_retry", args=(build.pk, step.pk)
        )
        return TreeStep(step, log_url, f"retry-step-{step.pk}", retry_url)

    def render_change_form(self, request, context, add=False, change=False, form_url="", obj=None):
        if obj is not None:
            context["can_cancel"] = obj.status in build_allowed_from(BuildStatus.CANCELLING) and (
                self.has_cancel_permission(request)
            )
            context["cancel_url"] = reverse(
                f"{self.admin_site.name}:builds_build_cancel", args=(obj.pk,)
            )
            context["variables"] = self._variables(obj)
            context["artifacts"] = obj.artifacts.select_related("job")
            context["tree"] = tree = self._tree(request, obj)
            context["retry_forms"] = [
                (entry.retry_form_id, entry.retry_url)
                for _, jobs in tree
                for _, entries in jobs
                for entry in entries
                if entry.retry_form_id
            ]
            context["empty_value_display"] = self.get_empty_value_display()
            if self.has_retry_permission(request) and obj.status in BUILD_FINAL:
                rerun_all = obj.status == BuildStatus.SUCCEEDED
                decision = services.can_retry(obj, include_succeeded=rerun_all)
                context["build_retry"] = {
                    "allowed": decision.allowed,
                    "reason": decision.reason,
                    "all": rerun_all,
                    "url": reverse(f"{self.admin_site.name}:builds_build_retry", args=(obj.pk,)),
                }
        return super().render_change_form(request, context, add, change, form_url, obj)

    @admin.action(description="Cancel selected builds", permissions=["cancel"])
    def cancel_builds(self, request, queryset):
        for build in queryset:
            self.cancel_build(request, build)

    def cancel_view(self, request, build_id):
        next_url = reverse(f"{self.admin_site.name}:builds_build_change", args=(build_id,))
        return self.cancel_build_response(request, Build.objects.all(), build_id, next_url)

    def retry_view(self, request, build_id):
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not self.has_retry_permission(request):
            raise PermissionDenied
        build = get_object_or_404(Build.objects.select_related("pipeline"), pk=build_id)
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
            *super().get_urls(),
        ]

    def step_retry_view(self, request, build_id, step_id):
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not self.has_retry_permission(request):
            raise PermissionDenied
        build = get_object_or_404(Build.objects.select_related("pipeline"), pk=build_id)
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
        # Checked before the lookup, so a 404 tells nothing to who may not see builds.
        if not self.has_view_permission(request):
            raise PermissionDenied
        step = get_object_or_404(
            StepRun.objects.select_related("job__build__pipeline"),
            pk=step_id,
            job__build_id=build_id,
        )
        build = step.job.build
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
