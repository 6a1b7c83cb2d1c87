"""Admin for pipelines (edited through the services, like the API, and triggered from their
page) and builds (read-only history, with the stage/job/step tree and the step logs)."""

import re
import uuid
from urllib.parse import urlencode

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import display_for_value
from django.core.exceptions import PermissionDenied
from django.db.models import F, Prefetch
from django.http import Http404, HttpResponseNotAllowed
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join

from builds import partitions, services
from builds.definition import parse_definition
from builds.errors import IdempotencyKeyReused, InvalidVariables, StepNotRetryable
from builds.models import Build, BuildVariable, JobRun, Pipeline, StepRun, VariablePartition
from builds.services import retry as retry_service
from builds.statuses import BUILD_FINAL, BuildStatus, build_allowed_from, stage_status
from ciproject.admin_mixins import ReadOnlyAdmin
from ciproject.errors import CIError
from ciproject.formatting import human_duration

LOG_TAIL_LINES = 200


def _ci_error(exc: CIError) -> forms.ValidationError:
    return forms.ValidationError(f"{exc.code}: {exc.detail}", code=exc.code)


class PipelineForm(forms.ModelForm):
    class Meta:
        model = Pipeline
        fields = ["name", "policy", "definition"]
        help_texts = {
            "policy": "Concurrency policy; a `concurrency:` line in the definition sets it"
            " instead. Empty: no limit."
        }
        widgets = {
            "definition": forms.Textarea(
                attrs={
                    "rows": 30,
                    "spellcheck": "false",
                    "style": "font-family: monospace; width: 100%; box-sizing: border-box;",
                }
            )
        }

    # The same functions the API goes through (via save_pipeline) decide what is valid.
    def clean_name(self):
        try:
            return services.validate_pipeline_name(self.cleaned_data["name"])
        except CIError as exc:
            raise _ci_error(exc) from None

    def clean_definition(self):
        # Browsers submit textareas with CRLF line ends; store what the author typed.
        definition = self.cleaned_data["definition"].replace("\r\n", "\n")
        try:
            self.named_policy = services.policy_named_in(parse_definition(definition))
        except CIError as exc:
            raise _ci_error(exc) from None
        return definition

    def clean(self):
        cleaned = super().clean()
        named = getattr(self, "named_policy", None)
        if named is not None and cleaned.get("policy") not in (None, named):
            self.add_error(
                "policy",
                f"the definition sets the policy {named.name!r} (`concurrency:`); remove that"
                " line to choose the policy here",
            )
        return cleaned


class TriggerForm(forms.Form):
    # A new key each time the form is shown: the same form sent twice (a double click, a
    # resubmission) shows the build the first one made rather than making another.
    idempotency_key = forms.CharField(widget=forms.HiddenInput, required=False)
    variables = forms.CharField(
        required=False,
        strip=False,
        help_text="One KEY=VALUE a line (the value is the rest of the line); they override"
        " the pipeline's defaults. Empty: the defaults.",
        widget=forms.Textarea(
            attrs={
                "rows": 8,
                "spellcheck": "false",
                "style": "font-family: monospace; width: 100%; box-sizing: border-box;",
            }
        ),
    )


def parse_variable_lines(text: str) -> dict[str, str]:
    """`KEY=VALUE` lines (blank lines ignored) as a mapping; trigger_build checks the names and
    sizes as it does for the API. Raises InvalidVariables for a line it cannot read."""
    variables = {}
    # Only line breaks end a line: str.splitlines() would also cut a value at \x0c, \x1c,
    # \x85 or \u2028, making the rest of it another KEY=VALUE line.
    for number, line in enumerate(re.split(r"\r\n|\r|\n", text), start=1):
        if not line.strip():
            continue
        name, equals, value = line.partition("=")
        name = name.strip()
        if not equals or not name:
            raise InvalidVariables(f"variables, line {number}: expected KEY=VALUE, got {line!r}")
        if name in variables:
            raise InvalidVariables(f"variables, line {number}: {name} is given twice")
        variables[name] = value
    return variables


@admin.register(Pipeline)
class PipelineAdmin(admin.ModelAdmin):
    form = PipelineForm
    list_display = ["name", "last_build_number", "updated_at", "builds_link"]
    search_fields = ["name"]

    def get_readonly_fields(self, request, obj=None):
        return ["last_build_number", "builds_count", "created_at", "updated_at"] if obj else []

    def _builds_url(self, obj):
        url = reverse(f"{self.admin_site.name}:builds_build_changelist")
        return f"{url}?{urlencode({'pipeline__id__exact': obj.pk})}"

    @admin.display(description="builds")
    def builds_link(self, obj):
        return format_html('<a href="{}">builds</a>', self._builds_url(obj))

    # Counted on the change page only: a count per changelist row would be N queries.
    @admin.display(description="builds")
    def builds_count(self, obj):
        return format_html('<a href="{}">{} builds</a>', self._builds_url(obj), obj.builds.count())

    def save_model(self, request, obj, form, change):
        # save_pipeline sets `spec` and saves `obj` itself, so the admin's log entry and
        # redirect see the saved row. The form has already validated the same input.
        data = form.cleaned_data
        services.save_pipeline(data["name"], data["definition"], obj, policy=data["policy"])

    # Triggering creates a build: the API's permission for it (POST /api/pipelines/{id}/builds/).
    def has_trigger_permission(self, request):
        return request.user.has_perm("builds.add_build")

    def render_change_form(self, request, context, add=False, change=False, form_url="", obj=None):
        if obj is not None and self.has_trigger_permission(request):
            context["trigger_url"] = reverse(
                f"{self.admin_site.name}:builds_pipeline_trigger", args=(obj.pk,)
            )
        return super().render_change_form(request, context, add, change, form_url, obj)

    def trigger_view(self, request, pipeline_id):
        """A form of variables (GET) that triggers a build (POST) through the service the API
        calls, then shows the new build; a refusal is a message, and the form keeps its input."""
        if request.method not in ("GET", "POST"):
            return HttpResponseNotAllowed(["GET", "POST"])
        # Checked before the lookup, so a 404 tells nothing to who may not trigger.
        if not self.has_trigger_permission(request):
            raise PermissionDenied
        pipeline = get_object_or_404(Pipeline, pk=pipeline_id)
        if request.method == "POST":
            form = TriggerForm(request.POST)
        else:
            form = TriggerForm(initial={"idempotency_key": uuid.uuid4().hex})
        if form.is_valid():
            try:
                variables = parse_variable_lines(form.cleaned_data["variables"])
                key = form.cleaned_data["idempotency_key"]
                build = services.trigger_build(pipeline, variables, request.user, key)
            except IdempotencyKeyReused as exc:
                # The form was sent back with other variables: a new build if sent again.
                self.message_user(
                    request,
                    f"This form already triggered build #{exc.fields['number']} with other"
                    " variables; send it again to trigger a new build.",
                    messages.WARNING,
                )
                form = TriggerForm(
                    initial={**form.cleaned_data, "idempotency_key": uuid.uuid4().hex}
                )
            except CIError as exc:
                self.message_user(request, f"{exc.code}: {exc.detail}", messages.ERROR)
            else:
                reason = f" ({build.reason})" if build.reason else ""
                done = "was triggered by this form already" if build.replayed else "triggered"
                self.message_user(
                    request, f"Build {build} {done}: {build.status}{reason}", messages.SUCCESS
                )
                return redirect(
                    reverse(f"{self.admin_site.name}:builds_build_change", args=(build.pk,))
                )
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": f"Trigger a build of {pipeline}",
            "pipeline": pipeline,
            # Shown to who may view the pipeline: add_build alone does not read it (nor does
            # it in the API).
            "defaults": sorted((pipeline.spec or {}).get("variables", {}).items())
            if self.has_view_permission(request, pipeline)
            else None,
            "form": form,
            "pipeline_url": reverse(
                f"{self.admin_site.name}:builds_pipeline_change", args=(pipeline.pk,)
            ),
        }
        return TemplateResponse(request, "admin/builds/pipeline/trigger.html", context)

    def get_urls(self):
        # Before the defaults: their "<path:object_id>/" would swallow this URL.
        return [
            path(
                "<int:pipeline_id>/trigger/",
                self.admin_site.admin_view(self.trigger_view),
                name="builds_pipeline_trigger",
            ),
            *super().get_urls(),
        ]


@admin.register(Build)
class BuildAdmin(ReadOnlyAdmin, admin.ModelAdmin):
    """Builds change only through the services (trigger, retry, cancel)."""

    list_display = ["pipeline", "number", "status", "attempt", "triggered_by", "created_at"]
    list_display += ["duration_display"]
    list_filter = ["status", "pipeline", "created_at"]
    list_select_related = ["pipeline", "triggered_by"]
    search_fields = ["pipeline__name"]
    date_hierarchy = "created_at"
    fields = readonly_fields = [
        "pipeline",
        "number",
        "status",
        "attempt",
        "triggered_by",
        "reason",
        "created_at",
        "started_at",
        "finished_at",
        "duration_display",
        "variables_table",
        "jobs_tree",
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

    @admin.display(description="variables")
    def variables_table(self, obj):
        # build_created_at is part of the key so the lookup is pruned to one partition.
        rows = BuildVariable.objects.filter(build_created_at=obj.created_at, build=obj)
        rows = rows.order_by("name").values_list("name", "value", "source")
        if not rows:
            return self.get_empty_value_display()
        return format_html(
            "<table><thead><tr><th>name</th><th>value</th><th>source</th></tr></thead>"
            "<tbody>{}</tbody></table>",
            format_html_join(
                "",
                '<tr><td><code>{}</code></td><td style="white-space: pre-wrap">{}</td>'
                "<td>{}</td></tr>",
                rows,
            ),
        )

    def get_object(self, request, object_id, from_field=None):
        obj = super().get_object(request, object_id, from_field)
        if obj is not None:
            # The tree is rendered from the object alone; it shows Retry buttons only to who
            # may use them.
            obj._can_retry = self.has_retry_permission(request)
        return obj

    def _tree(self, obj):
        """The build's jobs with their steps, loaded once per page."""
        if not hasattr(obj, "_tree_jobs"):
            steps = StepRun.objects.order_by("index")
            obj._tree_jobs = list(
                JobRun.objects.filter(build=obj)
                .order_by("stage_index", "id")
                .prefetch_related(Prefetch("steps", steps))
            )
        return obj._tree_jobs

    def _retryable_steps(self, obj):
        """The steps of the tree that get a Retry button: none without the permission."""
        if not getattr(obj, "_can_retry", False):
            return []
        return [
            step
            for job in self._tree(obj)
            for step in job.steps.all()
            if _step_retryable(obj, job, step)
        ]

    @admin.display(description="stages, jobs and steps")
    def jobs_tree(self, obj):
        jobs = self._tree(obj)
        retryable = {step.pk for step in self._retryable_steps(obj)}
        if not jobs:
            return self.get_empty_value_display()
        rows = []
        for stage_index in sorted({job.stage_index for job in jobs}):
            stage_jobs = [job for job in jobs if job.stage_index == stage_index]
            rows.append(
                format_html(
                    '<tr><th colspan="8">stage {}: {} — {}</th></tr>',
                    stage_index + 1,
                    stage_jobs[0].stage_name,
                    stage_status([job.status for job in stage_jobs]),
                )
            )
            for job in stage_jobs:
                rows.append(self._job_row(job))
                rows.extend(
                    self._step_row(obj, step, step.pk in retryable) for step in job.steps.all()
                )
        return format_html(
            "<table><thead><tr><th>job / step</th><th>status</th><th>attempt</th>"
            "<th>agent</th><th>exit code</th><th>started</th><th>finished</th>"
            "<th>reason / log</th></tr></thead><tbody>{}</tbody></table>",
            format_html_join("", "{}", zip(rows)),
        )

    def _job_row(self, job):
        return format_html(
            "<tr><td><strong>{}</strong> <small>(runs-on {})</small></td><td>{}</td><td>{}</td>"
            '<td>{}</td><td></td><td>{}</td><td>{}</td><td style="white-space: pre-wrap">{}</td>'
            "</tr>",
            job.key,
            job.runs_on,
            job.status,
            job.attempt,
            job.agent or "-",
            _when(job.started_at),
            _when(job.finished_at),
            job.reason,
        )

    def _step_row(self, build, step, retryable=False):
        log_url = reverse(f"{self.admin_site.name}:builds_build_step_log", args=(build.pk, step.pk))
        # The tree sits inside the change form, where a form may not be nested: the button
        # submits its own form, rendered outside (the template's object-tools block).
        retry = (
            format_html(
                ' <button type="submit" form="{}" class="button">Retry</button>',
                _retry_form_id(step),
            )
            if retryable
            else ""
        )
        return format_html(
            '<tr id="step-{}"><td style="padding-left: 2em">{}<details><summary>command</summary>'
            "<pre>{}</pre></details></td><td>{}</td><td>{}</td><td></td><td>{}</td><td>{}</td>"
            '<td>{}</td><td><a href="{}">log</a>{}</td></tr>',
            step.pk,
            step.name,
            step.command,
            step.status,
            step.attempt,
            "-" if step.exit_code is None else step.exit_code,
            _when(step.started_at),
            _when(step.finished_at),
            log_url,
            retry,
        )

    def has_cancel_permission(self, request):
        return request.user.has_perm("builds.cancel_build")

    def has_retry_permission(self, request):
        return request.user.has_perm("builds.retry_build")

    @admin.action(description="Cancel selected builds", permissions=["cancel"])
    def cancel_builds(self, request, queryset):
        for build in queryset:
            self._cancel(request, build)

    def _cancel(self, request, build):
        try:
            status = services.request_cancel(build.pk, request.user)
        except CIError as exc:
            self.message_user(request, f"Build {build}: {exc.code}: {exc.detail}", messages.WARNING)
        else:
            self.message_user(request, f"Build {build}: {status}", messages.SUCCESS)

    def cancel_view(self, request, build_id):
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not self.has_cancel_permission(request):
            raise PermissionDenied
        self._cancel(request, get_object_or_404(Build, pk=build_id))
        return redirect(reverse(f"{self.admin_site.name}:builds_build_change", args=(build_id,)))

    def render_change_form(self, request, context, add=False, change=False, form_url="", obj=None):
        if obj is not None:
            context["can_cancel"] = obj.status in build_allowed_from(BuildStatus.CANCELLING) and (
                self.has_cancel_permission(request)
            )
            context["cancel_url"] = reverse(
                f"{self.admin_site.name}:builds_build_cancel", args=(obj.pk,)
            )
            context["retry_forms"] = [
                (
                    _retry_form_id(step),
                    reverse(
                        f"{self.admin_site.name}:builds_build_step_retry", args=(obj.pk, step.pk)
                    ),
                )
                for step in self._retryable_steps(obj)
            ]
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


def _when(value):
    return display_for_value(value, "-")


def _retry_form_id(step) -> str:
    return f"retry-step-{step.pk}"


def _step_retryable(build, job, step) -> bool:
    """The retry service's own rule, so the button and the service never disagree."""
    try:
        retry_service.check_step_retryable(build, job, step)
    except StepNotRetryable:
        return False
    return True


@admin.register(VariablePartition)
class VariablePartitionAdmin(ReadOnlyAdmin, admin.ModelAdmin):
    """The partitions of the variable table, as the catalog last showed them (upkeep, beat
    and `manage.py partitions` reconcile this mirror with pg_inherits)."""

    list_display = ["name", "range_start", "range_end", "rows_estimate", "state"]
    list_display += ["dropped_at", "dropped_by"]
    list_filter = ["state"]
    readonly_fields = [f.name for f in VariablePartition._meta.fields]

    def changelist_view(self, request, extra_context=None):
        if self.has_view_or_change_permission(request):  # a write: not for who may not look
            partitions.reconcile()  # show the catalog as it is now, not as it was
        return super().changelist_view(request, extra_context)
