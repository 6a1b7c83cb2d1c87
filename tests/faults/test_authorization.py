"""The authorization matrix: every API endpoint, admin page, admin action and button, and
/metrics, for every role: anonymous, signed in without permissions, each permission alone (as
staff, so the admin applies to it; the API ignores is_staff), staff without permissions, all
permissions without staff, and a superuser. Each cell is an exact answer, and a refused
request changes nothing in the database. One test per row, so a failure shows the whole row.
The test transactions never commit: no message is published, no worker is needed."""

from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import count

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from agents import services as agents
from agents.models import Agent, AgentStatus
from audit.models import AuditEvent
from builds import partitions, services
from builds.models import Build, JobRun, Pipeline, StepRun, VariablePartition
from concurrency.models import ConcurrencyGroup, ConcurrencyPolicy
from forge.models import Repository
from forge.services import repositories
from tests.support import PARALLEL, api_token, fail_fast_job, one_step
from tokens.models import ApiToken

pytestmark = pytest.mark.django_db

# The permissions, short: V view, A add, C change, D delete; X cancel, R retry.
VP, AP, CP, DP = (f"builds.{a}_pipeline" for a in ("view", "add", "change", "delete"))
VB, AB, XB, RB = (f"builds.{a}_build" for a in ("view", "add", "cancel", "retry"))
VV = "builds.view_variablepartition"
VA, CA = "agents.view_agent", "agents.change_agent"
VC, CC = "concurrency.view_concurrencypolicy", "concurrency.change_concurrencypolicy"
VR, CR = "forge.view_repository", "forge.change_repository"
VS, VCS = "forge.view_schedule", "forge.view_commitstatus"
VE = "audit.view_auditevent"
PERMS = [VP, AP, CP, DP, VB, AB, XB, RB, VV, VA, CA, VC, CC, VR, CR, VS, VCS, VE]

EVERYTHING = frozenset(["*"])
ROLES = {  # role: (is_staff, permissions), None for anonymous
    "anon": None,
    "user": (False, frozenset()),
    "user+all": (False, frozenset(PERMS)),
    "staff": (True, frozenset()),
    **{f"staff+{p.split('.')[1]}": (True, frozenset([p])) for p in PERMS},
    "superuser": (True, EVERYTHING),
}
LOGIN = "login"  # a redirect to the admin's login page
GONE = "gone"  # a redirect to the admin's index: "does not exist", as for a missing object


@dataclass
class Row:
    method: str
    path: str  # formatted with the ids of the target
    need: str  # "a|b": a or b; "a+b": both; "": signed in (API) or staff (admin); "-": nobody
    ok: int | str  # the answer to a role that may
    target: str = "world"  # what the request acts on: a key of TARGETS
    body: Callable[[dict], dict] | None = None
    acts: bool = False  # an allowed request changes the database (a refused one never does)
    unlike: dict = field(default_factory=dict)  # roles whose answer the rule does not give
    # How a refusal reads: "" 403; "object": of a pipeline's object, 404 to who sees nothing
    # of that pipeline (access.rules.SEE: view_pipeline or view_build), else 403; "gone":
    # the admin's own object pages, which redirect who sees nothing to the index; "list":
    # a list that shows each signed-in user what they may see (200).
    refused: str = ""
    sees: set = field(default_factory=lambda: {VP, VB})  # the permissions that show the target

    def expected(self, role: str) -> int | str:
        admin = self.path.startswith("/admin/")
        if role in self.unlike:
            return self.unlike[role]
        if self.need == "*":
            return self.ok
        if ROLES[role] is None:
            return LOGIN if admin else 401
        staff, perms = ROLES[role]
        if admin and not staff:
            return LOGIN
        if self.allows(perms):
            return self.ok
        sees = perms is EVERYTHING or bool(self.sees & perms)
        if self.refused == "list":
            return self.ok
        if self.refused == "object" and not sees:
            return 404
        if self.refused == "gone" and not sees:
            return GONE
        return 403

    def permits(self, role: str) -> bool:
        """Whether `role` may do what the row does: its answer is the row's, or an `unlike`
        answer that is not a refusal (the admin's index after an add)."""
        answer = self.expected(role)
        return answer == self.ok or (role in self.unlike and answer == GONE)

    def allows(self, perms: frozenset) -> bool:
        if self.need in ("", "-") or perms is EVERYTHING:
            return self.need != "-"
        return any(set(alt.split("+")) <= perms for alt in self.need.split("|"))


# What the requests act on; each call makes new objects, for the next role to act on.
serial = count()
DEFINITION = one_step("true", runs_on="unit-tests")  # no agent serves unit-tests


def a_pipeline(policy=None) -> dict:
    pipeline = services.save_pipeline(f"p{next(serial)}", PARALLEL, policy=policy)
    return {"p": pipeline.pk, "name": pipeline.name}


def a_running_build() -> dict:  # its job `fast` failed, `slow` is still queued
    build = services.trigger_build(Pipeline.objects.get(pk=a_pipeline()["p"]))
    return {"b": build.pk, "s": fail_fast_job(build).pk}


def a_failed_build() -> dict:
    build = services.trigger_build(services.save_pipeline(f"p{next(serial)}", DEFINITION))
    now = timezone.now()
    JobRun.objects.filter(build=build).update(status="FAILED", started_at=now)
    StepRun.objects.filter(job__build=build).update(status="FAILED", started_at=now)
    assert services.advance_build(build.pk) == "FAILED"
    return {"f": build.pk}


def a_queued_build() -> dict:
    policy = ConcurrencyPolicy.objects.create(name=f"c{next(serial)}", queue_length=5)
    pipeline = Pipeline.objects.get(pk=a_pipeline(policy)["p"])
    services.trigger_build(pipeline)
    queued = services.trigger_build(pipeline)
    group = ConcurrencyGroup.objects.get(key=queued.concurrency_group)
    return {"c": policy.pk, "cname": policy.name, "q": queued.pk, "g": group.pk}


def an_agent() -> dict:
    return {"a": Agent.objects.create(name=f"agent-{next(serial)}", labels=["x"]).pk}


def a_drained_agent() -> dict:
    agent = Agent.objects.create(name=f"agent-{next(serial)}", labels=["x"])
    agents.set_status(agent, AgentStatus.DISABLED)
    return {"a": agent.pk}


def a_repository() -> dict:
    pipeline = Pipeline.objects.get(pk=a_pipeline()["p"])
    repository, _ = repositories.set_repository(pipeline, REPOSITORY)
    return {"p": pipeline.pk, "r": repository.pk}


REPOSITORY = {"forge": "github", "clone_url": "https://forge.example/o/r.git"}


def a_commit(t):
    return {"commit": "a" * 40}


def stale_partitions() -> dict:
    partitions.reconcile()
    VariablePartition.objects.update(dropped_by="stale")  # reconcile() clears it again
    return {}


def an_event() -> dict:
    event = AuditEvent.objects.create(username="alice", via="api", action="build.trigger")
    return {"e": event.pk}


def a_token() -> dict:  # another user's
    owner = User.objects.create_user(f"owner-{next(serial)}")
    api_token(owner, name="theirs")
    return {"t": owner.api_tokens.get().pk}


def a_world() -> dict:
    return {**a_pipeline(), **a_running_build(), **a_failed_build(), **a_queued_build()} | (
        an_agent()
    )


TARGETS = {
    "world": a_world,
    "none": dict,
    "pipeline": a_pipeline,
    "running": a_running_build,
    "failed": a_failed_build,
    "queued": a_queued_build,
    "agent": an_agent,
    "drained_agent": a_drained_agent,
    "repository": a_repository,
    "stale_partitions": stale_partitions,
    "event": an_event,
    "token": a_token,
}


def new_definition(t):
    return {"name": t["name"], "definition": PARALLEL.replace("exit 1", "exit 2"), "policy": ""}


def a_new_pipeline(t):
    return {"name": f"new{next(serial)}", "definition": PARALLEL, "policy": ""}


def policy_form(t):
    return {"name": t["cname"], "group_key": "${pipeline_id}", "max_running": "7"} | {
        "queue_length": "5", "queue_timeout": "3600", "on_queue_full": "reject"
    }  # fmt: skip


def disable(t):
    return {"status": "disabled"}


def failed_only(t):
    return {"failed_only": True}


PIPELINE_ADMIN = "/admin/builds/pipeline/"
NOT_THEIRS = {"user": 404, "user+all": 404}  # another's token, to who is not staff
POLICY_ADMIN = "/admin/concurrency/concurrencypolicy/"
ROWS = [
    # The API, with a token.
    Row("GET", "/api/", "", 200),
    Row("GET", "/api/schema/?format=json", "*", 200),  # documents the API; holds no data
    Row("GET", "/api/pipelines/", VP, 200, refused="list"),
    Row("GET", "/api/pipelines/{p}/", VP, 200, refused="object"),
    Row("POST", "/api/pipelines/", AP, 201, "none", a_new_pipeline, acts=True),
    Row(
        "PUT",
        "/api/pipelines/{p}/",
        CP,
        200,
        "pipeline",
        new_definition,
        acts=True,
        refused="object",
    ),
    Row(
        "PATCH",
        "/api/pipelines/{p}/",
        CP,
        200,
        "pipeline",
        new_definition,
        acts=True,
        refused="object",
    ),
    Row("DELETE", "/api/pipelines/{p}/", "", 405),  # there is no such endpoint
    Row("GET", "/api/pipelines/{p}/builds/", VB, 200, refused="object"),
    Row(
        "POST", "/api/pipelines/{p}/builds/", AB, 201, "pipeline", dict, acts=True, refused="object"
    ),
    Row("POST", "/api/pipelines/999999/builds/", "", 404, "none", dict),
    Row("GET", "/api/builds/", VB, 200, refused="list"),
    Row("GET", "/api/builds/{b}/", VB, 200, refused="object"),
    Row("GET", "/api/builds/{b}/steps/{s}/log/", VB, 200, refused="object"),
    Row("GET", "/api/builds/{b}/artifacts/", VB, 200, refused="object"),  # as its logs
    Row("POST", "/api/builds/{b}/cancel/", XB, 202, "running", dict, acts=True, refused="object"),
    Row(
        "POST",
        "/api/builds/{b}/steps/{s}/retry/",
        RB,
        202,
        "running",
        dict,
        acts=True,
        refused="object",
    ),
    Row(
        "POST",
        "/api/builds/{f}/retry/",
        RB,
        202,
        "failed",
        failed_only,
        acts=True,
        refused="object",
    ),
    Row("GET", "/api/agents/", VA, 200),
    Row("GET", "/api/agents/{a}/", VA, 200),
    Row("POST", "/api/agents/", "agents.add_agent", 405, "none", lambda t: {"name": "x"}),
    Row("GET", "/api/pipelines/{p}/repository/", VP, 200, "repository", refused="object"),
    Row(
        "PUT",
        "/api/pipelines/{p}/repository/",
        f"{VP}+{CP}",
        201,
        "pipeline",
        lambda t: REPOSITORY,
        acts=True,
        refused="object",
    ),
    Row(
        "POST",
        "/api/pipelines/{p}/repository/rotate-secret/",
        f"{VP}+{CP}",
        200,
        "repository",
        dict,
        acts=True,
        refused="object",
    ),
    Row(
        "POST",
        "/api/pipelines/{p}/run/",
        AB,
        201,
        "repository",
        a_commit,
        acts=True,
        refused="object",
    ),
    # API tokens: one's own (any signed-in user); another's, staff only (else not found).
    Row("GET", "/api/tokens/", "", 200),
    Row("GET", "/api/tokens/?all=1", "", 200),  # everyone's for staff, one's own otherwise
    Row("POST", "/api/tokens/", "", 201, "none", lambda t: {"name": "mine"}, acts=True),
    Row("GET", "/api/tokens/{t}/", "", 200, "token", unlike=NOT_THEIRS),
    Row("DELETE", "/api/tokens/{t}/", "", 204, "token", acts=True, unlike=NOT_THEIRS),
    Row("POST", "/api/tokens/{t}/rotate/", "", 201, "token", dict, acts=True, unlike=NOT_THEIRS),
    # A forge's webhook has no user: its signature alone, which these requests lack.
    Row("POST", "/api/pipelines/{p}/hooks/github/", "*", 401, "repository", dict),
    # The admin, with a session.
    Row("GET", "/admin/", "", 200),
    Row("GET", "/admin/builds/pipeline/", f"{VP}|{CP}", 200),
    Row("GET", "/admin/builds/pipeline/add/", AP, 200),
    Row(
        "POST",
        "/admin/builds/pipeline/add/",
        AP,
        302,
        "none",
        a_new_pipeline,
        acts=True,
        unlike={"staff+add_pipeline": GONE},
    ),  # no list to go back to
    Row(
        "GET",
        "/admin/builds/pipeline/{p}/change/",
        f"{VP}|{CP}",
        200,
    ),
    Row(
        "POST",
        PIPELINE_ADMIN + "{p}/change/",
        CP,
        302,
        "pipeline",
        new_definition,
        acts=True,
    ),
    Row("GET", "/admin/builds/pipeline/{p}/delete/", DP, 200),
    Row("GET", "/admin/builds/pipeline/{p}/trigger/", AB, 200, refused="object"),
    Row(
        "POST",
        "/admin/builds/pipeline/{p}/trigger/",
        AB,
        302,
        "pipeline",
        dict,
        acts=True,
        refused="object",
    ),
    Row("POST", "/admin/builds/pipeline/999999/trigger/", "", 404, "none", dict),
    Row("GET", "/admin/builds/build/", VB, 200),
    Row("GET", "/admin/builds/build/add/", "-", 403),  # builds change through the services
    Row("GET", "/admin/builds/build/{b}/change/", VB, 200),
    Row("POST", "/admin/builds/build/{b}/change/", "-", 403, "running", dict),
    Row("POST", "/admin/builds/build/{b}/delete/", "-", 403, "running", lambda t: {"post": "yes"}),
    Row("GET", "/admin/builds/build/{b}/steps/{s}/log/", VB, 200, refused="object"),
    Row("GET", "/admin/builds/build/{b}/live/", VB, 200, refused="object"),  # its live part
    Row("GET", "/admin/artifacts/artifact/", VB, 200),
    Row(
        "POST",
        "/admin/builds/build/",
        f"{VB}+{XB}",
        302,
        "running",
        lambda t: {"action": "cancel_builds", "_selected_action": [t["b"]], "index": "0"},
        acts=True,
        # The list, again: an action not offered to a viewer is "No action selected".
        unlike={"staff+view_build": 200},
    ),
    Row(
        "POST",
        "/admin/builds/build/{b}/cancel/",
        XB,
        302,
        "running",
        dict,
        acts=True,
        refused="object",
    ),
    Row(
        "POST",
        "/admin/builds/build/{f}/retry/",
        RB,
        302,
        "failed",
        dict,
        acts=True,
        refused="object",
    ),
    Row(
        "POST",
        "/admin/builds/build/{b}/steps/{s}/retry/",
        RB,
        302,
        "running",
        dict,
        acts=True,
        refused="object",
    ),
    Row("GET", "/admin/builds/variablepartition/", VV, 200, "stale_partitions", acts=True),
    Row("GET", POLICY_ADMIN, f"{VC}|{CC}", 200),
    Row("GET", POLICY_ADMIN + "{c}/change/", f"{VC}|{CC}", 200),
    Row("POST", POLICY_ADMIN + "{c}/change/", CC, 302, "queued", policy_form, acts=True),
    Row(
        "POST",
        POLICY_ADMIN + "{c}/builds/{q}/cancel/",
        XB,
        302,
        "queued",
        dict,
        acts=True,
        refused="object",
    ),
    Row("GET", "/admin/concurrency/concurrencygroup/", f"{VC}|{CC}", 200),
    Row("GET", "/admin/concurrency/concurrencygroup/{g}/change/", f"{VC}|{CC}", 200, "queued"),
    Row("GET", "/admin/agents/agent/", f"{VA}|{CA}", 200),
    Row("GET", "/admin/agents/agent/add/", "-", 403),  # agents register themselves
    Row("GET", "/admin/agents/agent/{a}/change/", f"{VA}|{CA}", 200),
    Row("POST", "/admin/agents/agent/{a}/change/", CA, 302, "agent", disable, acts=True),
    Row("POST", "/admin/agents/agent/{a}/drain/", CA, 302, "agent", dict, acts=True),
    Row("POST", "/admin/agents/agent/{a}/undrain/", CA, 302, "drained_agent", dict, acts=True),
    # A pipeline's settings: the model permissions, or the rule of the API's door
    # (access.rules: view_pipeline reads a repository everywhere, change_pipeline edits it).
    Row("GET", "/admin/forge/repository/", f"{VR}|{CR}|{VP}", 200, "repository"),
    Row("GET", "/admin/forge/repository/{r}/change/", f"{VR}|{CR}|{VP}", 200, "repository"),
    Row("GET", "/admin/forge/repository/{r}/run/", AB, 200, "repository", refused="object"),
    Row(
        "POST",
        "/admin/forge/repository/{r}/run/",
        AB,
        302,
        "repository",
        lambda t: {"commit": "b" * 40, "branch": "", "idempotency_key": f"k{next(serial)}"},
        acts=True,
        refused="object",
    ),
    Row("GET", "/admin/tokens/apitoken/", "", 200),  # one's own; view_apitoken: everyone's
    Row("GET", "/admin/tokens/apitoken/add/", "", 200),
    Row("GET", "/admin/forge/schedule/", f"{VS}|{VP}|{CP}", 200),
    Row("GET", "/admin/forge/commitstatus/", VCS, 200),
    # The audit trail: read only, for whoever has its view permission (superusers too).
    Row("GET", "/admin/audit/auditevent/", VE, 200, "event"),
    Row("GET", "/admin/audit/auditevent/?action=build.trigger&via=api&q=alice", VE, 200, "event"),
    Row("GET", "/admin/audit/auditevent/{e}/change/", VE, 200, "event"),
    Row("GET", "/admin/audit/auditevent/add/", "-", 403),
    Row("POST", "/admin/audit/auditevent/{e}/change/", "-", 403, "event", dict),
    Row("POST", "/admin/audit/auditevent/{e}/delete/", "-", 403, "event", lambda t: {"post": "y"}),
]

SNAPSHOT = [
    (Pipeline, ["pk", "name", "definition", "last_build_number", "policy_id"]),
    (Build, ["pk", "status", "attempt", "reason"]),
    (JobRun, ["pk", "status", "attempt"]),
    (StepRun, ["pk", "status", "attempt"]),
    (ConcurrencyPolicy, []),
    (Agent, ["pk", "status"]),
    (VariablePartition, []),
    (Repository, ["pk", "clone_url", "webhook_secret_set_at"]),
    (AuditEvent, ["pk", "action", "username"]),  # a refused request is not recorded either
    (ApiToken, ["pk", "revoked_at"]),
]


def state() -> list:
    return [list(model.objects.order_by("pk").values_list(*fields)) for model, fields in SNAPSHOT]


def clients(admin: bool) -> dict:
    """A client per role: a session for the admin, a token for the API."""
    perms = {
        f"{p.content_type.app_label}.{p.codename}": p
        for p in Permission.objects.select_related("content_type")
    }
    result = {}
    for role, spec in ROLES.items():
        client = Client() if admin else APIClient()
        result[role] = client
        if spec is None:
            continue
        staff, granted = spec
        if granted is EVERYTHING:
            user = User.objects.create_superuser(f"u-{role}", password=None)
        else:
            user = User.objects.create_user(f"u-{role}", is_staff=staff)
            user.user_permissions.add(*(perms[p] for p in granted))
        if admin:
            client.force_login(user)
        else:
            client.credentials(HTTP_AUTHORIZATION=f"Token {api_token(user)}")
    return result


def answer(response) -> int | str:
    if response.status_code == 302 and response["Location"].startswith("/admin/login/"):
        return LOGIN
    if response.status_code == 302 and response["Location"] == "/admin/":
        return GONE
    assert response.status_code < 500, response.content[:500]
    return response.status_code


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"{r.method} {r.path}")
def test_matrix(row):
    admin = row.path.startswith("/admin/")
    send = {"format": None if admin else "json"} if row.body else {}
    target, got, changed_wrongly = TARGETS[row.target](), {}, []
    roles = clients(admin)  # their tokens made before the state is taken
    before = state()
    for role, client in roles.items():
        response = getattr(client, row.method.lower())(
            row.path.format(**target), row.body(target) if row.body else None, **send
        )
        got[role] = answer(response)
        after = state()
        if (after != before) != (row.acts and row.permits(role)):
            changed_wrongly.append(role)
        if after != before:  # the next role acts on objects of its own
            target = TARGETS[row.target]()
            after = state()
        before = after
    assert got == {role: row.expected(role) for role in ROLES}
    assert changed_wrongly == []


# /metrics is not a user's: the allow-list or the Bearer token, whoever is signed in.
METRICS = [
    # (REMOTE_ADDR, headers, signed in as, answer)
    ("127.0.0.1", {}, None, 200),
    ("10.0.0.9", {}, None, 403),
    ("10.0.0.9", {}, "superuser", 403),  # a session is not a way in
    ("10.0.0.9", {"Authorization": "Token {token}"}, None, 403),  # nor is an API token
    ("10.0.0.9", {"Authorization": "Bearer s3cret"}, None, 200),
    ("10.0.0.9", {"Authorization": "Bearer wrong"}, None, 403),
    ("10.0.0.9", {"Authorization": "bearer s3cret"}, None, 403),
    ("10.0.0.9", {"Authorization": "Bearer s3cret "}, None, 403),
    ("10.0.0.9", {"Authorization": "Bearer s3cr\u00e9t"}, None, 403),  # not ASCII: no 500
    ("10.0.0.9", {"X-Forwarded-For": "127.0.0.1"}, None, 403),  # no proxy is trusted
    ("10.0.0.9", {"X-Real-IP": "127.0.0.1"}, None, 403),
    # Through a reverse proxy on this host: from 127.0.0.1, but from anywhere. The token only.
    ("127.0.0.1", {"X-Forwarded-For": "203.0.113.7"}, None, 403),
    ("127.0.0.1", {"Forwarded": "for=203.0.113.7"}, None, 403),
    ("127.0.0.1", {"X-Real-IP": "203.0.113.7"}, None, 403),
    ("127.0.0.1", {"Via": "1.1 proxy"}, None, 403),
    ("127.0.0.1", {"X-Forwarded-For": "203.0.113.7", "Authorization": "Bearer s3cret"}, None, 200),
]


@pytest.mark.parametrize(("addr", "headers", "who", "status"), METRICS)
def test_metrics(settings, addr, headers, who, status):
    settings.METRICS_TOKEN = "s3cret"
    settings.METRICS_ALLOWED_IPS = ["127.0.0.1", "::1"]
    client = Client(REMOTE_ADDR=addr)
    user = User.objects.create_superuser("root", password=None)
    if who:
        client.force_login(user)
    token = api_token(user)
    headers = {k: v.format(token=token) for k, v in headers.items()}
    assert client.get("/metrics", headers=headers).status_code == status


@pytest.mark.parametrize(("perms", "shown"), [([AB], False), ([AB, VP], True), ([AB, CP], True)])
def test_the_trigger_page_shows_the_defaults_to_who_may_view_the_pipeline(perms, shown):
    pipeline = services.save_pipeline("d", "variables: {TARGET: eu-prod-7}\n" + DEFINITION)
    user = User.objects.create_user("trigger", is_staff=True)
    user.user_permissions.add(*(Permission.objects.get(codename=p.split(".")[1]) for p in perms))
    client = Client()
    client.force_login(user)
    page = client.get(f"/admin/builds/pipeline/{pipeline.pk}/trigger/")
    assert page.status_code == 200
    assert ("eu-prod-7" in page.text) == shown
    assert ("not shown: you may not view this pipeline" in page.text) != shown
