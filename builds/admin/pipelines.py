"""The admin's pipeline pages: edited through the services the API calls (so both take and
refuse the same definitions), and triggered from their page with KEY=VALUE lines."""

import re
import uuid
from urllib.parse import urlencode

from django import forms
from django.contrib import admin, messages
from django.http import HttpResponseNotAllowed
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html

from access import rules as access
from access.admin_mixins import PipelineScoped
from access.models import Team
from audit.admin_mixins import AuditedAdmin
from builds import services
from builds.definition import parse_assignments, parse_definition
from builds.errors import IdempotencyKeyReused
from builds.models import Pipeline
from ciproject.errors import CIError


def _ci_error(exc: CIError) -> forms.ValidationError:
    return forms.ValidationError(f"{exc.code}: {exc.detail}", code=exc.code)


class PipelineForm(forms.ModelForm):
    teams = forms.ModelMultipleChoiceField(
        Team.objects.all(),
        required=False,
        help_text="Their members reach this pipeline by their roles.",
    )
    editor = None  # the person saving it (PipelineAdmin.get_form sets it)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.instance.pk:
            self.fields["teams"].initial = list(self.instance.teams.all())

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
        # What save_pipeline refuses, said on the form: the same checks.
        before = list(self.instance.teams.all()) if self.instance.pk else []
        try:
            services.check_policy(
                self.editor, self.instance.policy_id, named or cleaned.get("policy")
            )
            services.check_teams(self.editor, before, list(cleaned.get("teams") or []))
        except CIError as exc:
            raise _ci_error(exc) from None
        return cleaned


class TriggerForm(forms.Form):
    """The trigger's variables: a field for each of the pipeline's parameters, or else
    KEY=VALUE lines for its variables. The trigger service decides what is allowed (as for
    the API): the fields only help (a select for choices, the pattern, `required`)."""

    # A new key each time the form is shown: the same form sent twice (a double click, a
    # resubmission) shows the build the first one made rather than making another.
    idempotency_key = forms.CharField(widget=forms.HiddenInput, required=False)
    variables = forms.CharField(
        required=False,
        strip=False,
        help_text="One KEY=VALUE a line (the value is the rest of the line); they override"
        " the pipeline's variables. Empty: the defaults.",
        widget=forms.Textarea(
            attrs={
                "rows": 8,
                "spellcheck": "false",
                "style": "font-family: monospace; width: 100%; box-sizing: border-box;",
            }
        ),
    )

    priority = forms.IntegerField(
        required=False,
        min_value=0,
        help_text="Its place in its concurrency group's queue, higher first. Empty: the"
        " pipeline's.",
    )

    def __init__(self, *args, parameters: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.parameters = parameters
        if parameters:
            del self.fields["variables"]
        for name, parameter in parameters.items():
            self.fields[f"parameter_{name}"] = _parameter_field(name, parameter)

    def parameter_fields(self) -> list:
        return [self[f"parameter_{name}"] for name in self.parameters]

    def trigger_variables(self) -> dict[str, str]:
        """What the trigger sets; a parameter left empty is not set (its default applies)."""
        if not self.parameters:
            return parse_variable_lines(self.cleaned_data["variables"])
        given = ((name, self.cleaned_data[f"parameter_{name}"]) for name in self.parameters)
        return {name: value for name, value in given if value != ""}


def _parameter_field(name: str, parameter: dict) -> forms.Field:
    help_text = parameter["description"]
    attrs = {"required": ""} if parameter["required"] else {}
    if parameter["choices"] is not None:
        choices = [(choice, choice) for choice in parameter["choices"]]
        if parameter["default"] is None:
            choices.insert(0, ("", "---------"))
        return forms.ChoiceField(
            label=name, choices=choices, required=False, initial=parameter["default"],
            help_text=help_text, widget=forms.Select(attrs=attrs),
        )  # fmt: skip
    if parameter["pattern"] is not None:
        help_text = f"{help_text} (matching {parameter['pattern']})".strip()
    return forms.CharField(
        label=name, required=False, strip=False, initial=parameter["default"],
        help_text=help_text, widget=forms.TextInput(attrs={**attrs, "size": 60}),
    )  # fmt: skip


def parse_variable_lines(text: str) -> dict[str, str]:
    """`KEY=VALUE` lines (blank lines ignored) as a mapping; the trigger service checks the
    names and sizes as it does for the API. Raises InvalidVariables for a line it cannot
    read."""
    # Only line breaks end a line: str.splitlines() would also cut a value at \x0c, \x1c,
    # \x85 or \u2028, making the rest of it another KEY=VALUE line.
    lines = enumerate(re.split(r"\r\n|\r|\n", text), start=1)
    return parse_assignments(
        (f"variables, line {number}", line) for number, line in lines if line.strip()
    )


@admin.register(Pipeline)
class PipelineAdmin(AuditedAdmin, PipelineScoped, admin.ModelAdmin):
    form = PipelineForm
    audit_kind = "pipeline"  # the deletes; save_pipeline records creations and edits
    list_display = ["name", "last_build_number", "updated_at", "builds_link"]
    search_fields = ["name"]
    pipeline_field = ""
    view_actions = (access.VIEW_PIPELINE,)

    def get_fields(self, request, obj=None):
        fields = super().get_fields(request, obj)
        if obj is not None and not self.has_change_permission(request, obj):
            # Shown read-only: the form's field is not one of the model's to display.
            fields = ["team_names" if name == "teams" else name for name in fields]
        return fields

    @admin.display(description="teams")
    def team_names(self, obj):
        return ", ".join(team.name for team in obj.teams.all()) or "-"

    def get_form(self, request, obj=None, **kwargs):
        form = super().get_form(request, obj, **kwargs)
        return type(form.__name__, (form,), {"editor": request.user})

    def has_add_permission(self, request):
        # A team's maintainer makes pipelines for their team (the form asks which).
        return access.may_create_pipelines(request.user)

    def get_readonly_fields(self, request, obj=None):
        shown = ["last_build_number", "builds_count", "created_at", "updated_at", "team_names"]
        return shown if obj else []

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
        services.save_pipeline(
            data["name"],
            data["definition"],
            obj,
            policy=data["policy"],
            editor=request.user,
            teams=list(data["teams"]),
        )

    def render_change_form(self, request, context, add=False, change=False, form_url="", obj=None):
        if obj is not None and self.may(request, access.TRIGGER, obj):
            context["trigger_url"] = reverse(
                f"{self.admin_site.name}:builds_pipeline_trigger", args=(obj.pk,)
            )
        return super().render_change_form(request, context, add, change, form_url, obj)

    def trigger_view(self, request, pipeline_id):
        """A form of variables (GET) that triggers a build (POST) through the service the API
        calls, then shows the new build; a refusal is a message, and the form keeps its input."""
        if request.method not in ("GET", "POST"):
            return HttpResponseNotAllowed(["GET", "POST"])
        pipeline = access.pipeline_for(request.user, access.TRIGGER, pipeline_id)
        declared = pipeline.parameters
        if request.method == "POST":
            form = TriggerForm(request.POST, parameters=declared)
        else:
            form = TriggerForm(initial={"idempotency_key": uuid.uuid4().hex}, parameters=declared)
        if form.is_valid():
            try:
                variables = form.trigger_variables()
                key, priority = form.cleaned_data["idempotency_key"], form.cleaned_data["priority"]
                build, replayed = services.trigger(pipeline, variables, request.user, key, priority)
            except IdempotencyKeyReused as exc:
                # The form was sent back with other variables: a new build if sent again.
                self.message_user(
                    request,
                    f"This form already triggered build #{exc.fields['number']} with other"
                    " variables; send it again to trigger a new build.",
                    messages.WARNING,
                )
                form = TriggerForm(
                    initial={**form.cleaned_data, "idempotency_key": uuid.uuid4().hex},
                    parameters=declared,
                )
            except CIError as exc:
                self.message_user(request, f"{exc.code}: {exc.detail}", messages.ERROR)
            else:
                reason = f" ({build.reason})" if build.reason else ""
                done = "was triggered by this form already" if replayed else "triggered"
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
