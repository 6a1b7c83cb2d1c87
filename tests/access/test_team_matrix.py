"""Access by team, generated: every role of a team (and a signed-in person in no team) x every
action x every door (the API with a token, the admin with a session, the log stream's door,
artifacts), on a pipeline of the person's team and on one of another team. Each cell is the
exact answer that access.rules implies: the action's answer to a role that has it; 403 to who
sees the pipeline (any role in one of its teams) without the role; 404 to who does not see it
(the admin's own object pages: a redirect to its index, as for a missing object, when the
person may use those pages at all). Lists show exactly what the role may see. A refused
request changes nothing and is not in the audit trail; an allowed one that acts is in it
once. No model permission is given to anyone here: roles alone."""

from dataclasses import dataclass
from itertools import count

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from access.models import Membership, Role, Team
from audit.models import AuditEvent
from builds import services
from builds.models import Build, JobRun, Pipeline, StepRun
from forge.models import Repository, Schedule
from forge.services import repositories
from tests.support import PARALLEL, api_token, fail_fast_job
from vault import services as vault
from vault.models import Secret, SecretScope

pytestmark = pytest.mark.django_db

NONE = 0  # a signed-in person in no team
ROLES = {"outsider": NONE, "viewer": Role.VIEWER, "developer": Role.DEVELOPER}
ROLES |= {"maintainer": Role.MAINTAINER}
GONE = "gone"  # the admin's redirect to its index, "does not exist"
serial = count()
REPOSITORY = {"forge": "github", "clone_url": "https://forge.example/o/r.git"}


@dataclass
class Cell:
    method: str
    path: str  # formatted with the target's ids
    role: Role  # the least role that may
    ok: int
    body: dict | None = None
    acts: bool = False
    # api | admin (its own views) | form (Django's object pages) | page (Django's pages of
    # no one object, an add form: the pipeline is a field of the form)
    door: str = "api"
    elsewhere: int = 200  # a page's answer to who may act on other pipelines only

    def expected(self, level: int, best: int) -> int | str:
        """To a person of role `level` in the target's teams, and `best` in any team."""
        if level >= self.role:
            return self.ok
        if self.door == "page":  # the form again, its pipeline "not one of the choices"
            return self.elsewhere if best >= self.role else 403
        if level >= Role.VIEWER:
            return 403
        if self.door == "form":  # Django's page: 403 unless the person may do it somewhere
            return GONE if best >= self.role else 403
        return 404


def a_target(team: Team) -> dict:
    """A pipeline of `team` with a repository, a secret, a schedule, a running build whose
    job `fast` failed (its job `slow` queued), and a failed build."""
    pipeline = services.save_pipeline(f"p{next(serial)}", PARALLEL)
    team.pipelines.add(pipeline)
    repository, _ = repositories.set_repository(pipeline, REPOSITORY)
    vault.set_secret(pipeline, "KEPT", "kept-value")
    schedule = Schedule.objects.create(pipeline=pipeline, cron="0 3 * * *")
    running = services.trigger_build(pipeline)
    step = fail_fast_job(running)
    failed = services.trigger_build(pipeline)
    now = timezone.now()
    JobRun.objects.filter(build=failed).update(status="FAILED", started_at=now)
    StepRun.objects.filter(job__build=failed).update(status="FAILED", started_at=now)
    services.advance_build(failed.pk)
    ids = {"p": pipeline.pk, "name": pipeline.name, "b": running.pk, "s": step.pk, "f": failed.pk}
    secret = pipeline.secrets.get().pk
    return ids | {"r": repository.pk, "secret": secret, "sc": schedule.pk}


def schedule_form(t, cron="0 4 * * *"):
    return {"pipeline": t["p"], "cron": cron, "timezone": "UTC", "variables": "{}"}


def edit(t):
    return {"definition": PARALLEL.replace("exit 1", "exit 2")}


CELLS = [
    # The API (cictl speaks it with the same token).
    Cell("GET", "/api/pipelines/{p}/", Role.VIEWER, 200),
    Cell("PATCH", "/api/pipelines/{p}/", Role.MAINTAINER, 200, edit, acts=True),
    Cell("GET", "/api/pipelines/{p}/builds/", Role.VIEWER, 200),
    Cell("POST", "/api/pipelines/{p}/builds/", Role.DEVELOPER, 201, dict, acts=True),
    Cell("GET", "/api/builds/{b}/", Role.VIEWER, 200),
    Cell("GET", "/api/builds/{b}/steps/{s}/log/", Role.VIEWER, 200),
    # The stream's door: the log action decides, then (here, on bare WSGI) says it serves
    # no streams; builds.follow streams where it does (tests/builds/test_follow.py).
    Cell("GET", "/api/builds/{b}/steps/{s}/log/?follow=1", Role.VIEWER, 406),
    Cell("GET", "/api/builds/{b}/artifacts/", Role.VIEWER, 200),
    Cell("POST", "/api/builds/{b}/cancel/", Role.DEVELOPER, 202, dict, acts=True),
    Cell("POST", "/api/builds/{b}/steps/{s}/retry/", Role.DEVELOPER, 202, dict, acts=True),
    Cell("POST", "/api/builds/{f}/retry/", Role.DEVELOPER, 202, dict, acts=True),
    Cell("GET", "/api/pipelines/{p}/secrets/", Role.MAINTAINER, 200),
    Cell(
        "PUT",
        "/api/pipelines/{p}/secrets/TOKEN/",
        Role.MAINTAINER,
        204,
        lambda t: {"value": "s3cret-value"},
        acts=True,
    ),
    Cell("DELETE", "/api/pipelines/{p}/secrets/NONE/", Role.MAINTAINER, 404),  # SECRET_NOT_FOUND
    Cell("GET", "/api/pipelines/{p}/repository/", Role.MAINTAINER, 200),
    Cell("PUT", "/api/pipelines/{p}/repository/", Role.MAINTAINER, 200, lambda t: REPOSITORY),
    Cell(
        "POST",
        "/api/pipelines/{p}/repository/rotate-secret/",
        Role.MAINTAINER,
        200,
        dict,
        acts=True,
    ),
    Cell(
        "POST",
        "/api/pipelines/{p}/run/",
        Role.DEVELOPER,
        201,
        lambda t: {"commit": "a" * 40},
        acts=True,
    ),
    # The admin.
    Cell("GET", "/admin/builds/pipeline/{p}/change/", Role.VIEWER, 200, door="form"),
    Cell(
        "POST",
        "/admin/builds/pipeline/{p}/change/",
        Role.MAINTAINER,
        302,
        door="form",
        body=lambda t: {
            "name": t["name"],
            "definition": PARALLEL.replace("exit 1", "exit 3"),
            "policy": "",
            "teams": [ALPHA_ID],
        },
        acts=True,
    ),
    Cell("GET", "/admin/builds/pipeline/{p}/trigger/", Role.DEVELOPER, 200, door="admin"),
    Cell(
        "POST",
        "/admin/builds/pipeline/{p}/trigger/",
        Role.DEVELOPER,
        302,
        dict,
        acts=True,
        door="admin",
    ),
    Cell("GET", "/admin/builds/build/{b}/change/", Role.VIEWER, 200, door="form"),
    Cell("GET", "/admin/builds/build/{b}/live/", Role.VIEWER, 200, door="admin"),
    Cell("GET", "/admin/builds/build/{b}/steps/{s}/log/", Role.VIEWER, 200, door="admin"),
    Cell(
        "POST",
        "/admin/builds/build/{b}/cancel/",
        Role.DEVELOPER,
        302,
        dict,
        acts=True,
        door="admin",
    ),
    Cell(
        "POST", "/admin/builds/build/{f}/retry/", Role.DEVELOPER, 302, dict, acts=True, door="admin"
    ),
    Cell(
        "POST",
        "/admin/builds/build/{b}/steps/{s}/retry/",
        Role.DEVELOPER,
        302,
        dict,
        acts=True,
        door="admin",
    ),
    # A pipeline's settings in the admin: its maintainers' (schedules seen by its viewers).
    Cell("GET", "/admin/vault/secret/{secret}/change/", Role.MAINTAINER, 200, door="form"),
    Cell(
        "POST",
        "/admin/vault/secret/{secret}/change/",
        Role.MAINTAINER,
        302,
        lambda t: {"value": "new-value"},
        acts=True,
        door="form",
    ),
    Cell(
        "POST",
        "/admin/vault/secret/{secret}/delete/",
        Role.MAINTAINER,
        302,
        lambda t: {"post": "yes"},
        acts=True,
        door="form",
    ),
    Cell(
        "POST",
        "/admin/vault/secret/add/",
        Role.MAINTAINER,
        302,
        lambda t: {"pipeline": t["p"], "name": "ADDED", "value": "added-value"},
        acts=True,
        door="page",
    ),
    Cell("GET", "/admin/forge/repository/{r}/change/", Role.MAINTAINER, 200, door="form"),
    Cell(
        "POST",
        "/admin/forge/repository/{r}/change/",
        Role.MAINTAINER,
        302,
        lambda t: {
            **REPOSITORY,
            "clone_url": "https://forge.example/o/moved.git",
            "default_branch": "main",
        },
        acts=True,
        door="form",
    ),
    Cell(
        "POST",
        "/admin/forge/repository/",
        Role.MAINTAINER,
        302,
        lambda t: {"action": "rotate_webhook_secret", "_selected_action": [t["r"]]},
        acts=True,
        door="page",
        elsewhere=302,  # back to the list: none of those selected is on it
    ),
    Cell("GET", "/admin/forge/schedule/{sc}/change/", Role.VIEWER, 200, door="form"),
    Cell(
        "POST",
        "/admin/forge/schedule/{sc}/change/",
        Role.MAINTAINER,
        302,
        schedule_form,
        acts=True,
        door="form",
    ),
    Cell(
        "POST",
        "/admin/forge/schedule/{sc}/delete/",
        Role.MAINTAINER,
        302,
        lambda t: {"post": "yes"},
        acts=True,
        door="form",
    ),
    Cell(
        "POST",
        "/admin/forge/schedule/add/",
        Role.MAINTAINER,
        302,
        schedule_form,
        acts=True,
        door="page",
    ),
]
ALPHA_ID = None  # the alpha team's id, for the admin form's `teams` (set by the fixture)


def state() -> list:
    return [
        list(Pipeline.objects.order_by("pk").values_list("pk", "definition")),
        list(Build.objects.order_by("pk").values_list("pk", "status", "attempt")),
        list(StepRun.objects.order_by("pk").values_list("pk", "status", "attempt")),
        list(Secret.objects.order_by("pk").values_list("pk", "name", "updated_at")),
        list(Repository.objects.order_by("pk").values_list(
            "pk", "clone_url", "webhook_secret_set_at")),
        list(Schedule.objects.order_by("pk").values_list("pk", "cron")),
    ]  # fmt: skip


@pytest.fixture
def teams():
    global ALPHA_ID
    alpha, beta = Team.objects.create(name="alpha"), Team.objects.create(name="beta")
    ALPHA_ID = alpha.pk
    people = {}
    for name, level in ROLES.items():
        user = User.objects.create_user(f"u-{name}", is_staff=True)  # staff: into the admin
        if level:
            Membership.objects.create(team=alpha, user=user, role=level)
        people[name] = user
    # beta has a member of its own, so its pipeline is someone's.
    Membership.objects.create(team=beta, user=User.objects.create_user("b"), role=Role.MAINTAINER)
    return alpha, beta, people


def client_of(user, door: str):
    if door == "api":
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Token {api_token(user)}")
    else:
        client = Client()
        client.force_login(user)
    return client


def answer(response) -> int | str:
    if response.status_code == 302 and response["Location"] == "/admin/":
        return GONE
    assert response.status_code < 500, response.content[:500]
    return response.status_code


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: f"{c.method} {c.path}")
def test_cell(cell, teams):
    alpha, beta, people = teams
    got, expected, changed_wrongly, audited, acted = {}, {}, [], {}, {}
    targets = {team: a_target(team) for team in (alpha, beta)}
    for name, user in people.items():
        client = client_of(user, cell.door)
        for team, target in targets.items():
            level = ROLES[name] if team == alpha else NONE
            key = f"{name} on {team.name}'s"
            expected[key] = cell.expected(level, best=ROLES[name])
            acted[key] = int(cell.acts and level >= cell.role)
            before, events = state(), AuditEvent.objects.count()
            body = cell.body(target) if cell.body else None
            send = {"format": "json"} if cell.door == "api" and body is not None else {}
            response = getattr(client, cell.method.lower())(
                cell.path.format(**target), body, **send
            )
            got[key] = answer(response)
            audited[key] = AuditEvent.objects.count() - events
            if (state() != before) != bool(acted[key]):
                changed_wrongly.append(key)
            if state() != before:  # the next person acts on objects of their own
                targets[team] = a_target(team)
    assert got == expected
    assert changed_wrongly == []
    assert audited == acted


@pytest.mark.parametrize("door", ["/api/pipelines/", "/api/builds/"])
def test_lists_show_what_each_role_sees(teams, door):
    alpha, beta, people = teams
    ours, theirs = a_target(alpha), a_target(beta)
    for name, user in people.items():
        client = client_of(user, "api")
        listed = {row["id"] for row in client.get(door).json()["results"]}
        mine = {ours["p"]} if door == "/api/pipelines/" else {ours["b"], ours["f"]}
        assert listed == (mine if ROLES[name] else set()), name
        assert not listed & {theirs["p"], theirs["b"], theirs["f"]} - mine


def test_admin_lists_show_what_each_role_sees(teams):
    alpha, beta, people = teams
    ours, _ = a_target(alpha), a_target(beta)
    for name, user in people.items():
        page = client_of(user, "admin").get("/admin/builds/pipeline/")
        if not ROLES[name]:
            assert page.status_code == 403, name
            continue
        assert page.status_code == 200, name
        shown = set(page.context["cl"].result_list.values_list("pk", flat=True))
        assert shown == {ours["p"]}, name
        builds = client_of(user, "admin").get("/admin/builds/build/").context["cl"].result_list
        assert set(builds.values_list("pk", flat=True)) == {ours["b"], ours["f"]}, name


# A pipeline's settings in the admin: (list, the least role that sees it, the target's key)
SETTINGS_LISTS = [
    ("/admin/vault/secret/", Role.MAINTAINER, "secret"),
    ("/admin/forge/repository/", Role.MAINTAINER, "r"),
    ("/admin/forge/schedule/", Role.VIEWER, "sc"),
]


@pytest.mark.parametrize(("path", "role", "key"), SETTINGS_LISTS)
def test_admin_settings_lists_show_what_each_role_sees(teams, path, role, key):
    alpha, beta, people = teams
    ours, _ = a_target(alpha), a_target(beta)
    shared = vault.set_secret(SecretScope.objects.create(name="shared"), "SHARED", "shared-v")
    assert shared is False  # made, not replaced: a scope's secret, staff's only
    for name, user in people.items():
        page = client_of(user, "admin").get(path)
        if ROLES[name] < role:
            assert page.status_code == 403, name
            continue
        assert page.status_code == 200, name
        shown = set(page.context["cl"].result_list.values_list("pk", flat=True))
        assert shown == {ours[key]}, name
        if path == "/admin/vault/secret/":  # nor are the scopes named in a filter
            assert "shared" not in page.text, name
