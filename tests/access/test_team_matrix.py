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
from forge.services import repositories
from tests.support import PARALLEL, api_token, fail_fast_job
from vault.models import Secret

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
    door: str = "api"  # api | admin (its own views) | form (Django's change form)

    def expected(self, level: int, best: int) -> int | str:
        """To a person of role `level` in the target's teams, and `best` in any team."""
        if level >= self.role:
            return self.ok
        if level >= Role.VIEWER:
            return 403
        if self.door == "form":  # Django's page: 403 unless the person may do it somewhere
            return GONE if best >= self.role else 403
        return 404


def a_target(team: Team) -> dict:
    """A pipeline of `team` with a repository, a running build whose job `fast` failed (its
    job `slow` queued), and a failed build."""
    pipeline = services.save_pipeline(f"p{next(serial)}", PARALLEL)
    team.pipelines.add(pipeline)
    repositories.set_repository(pipeline, REPOSITORY)
    running = services.trigger_build(pipeline)
    step = fail_fast_job(running)
    failed = services.trigger_build(pipeline)
    now = timezone.now()
    JobRun.objects.filter(build=failed).update(status="FAILED", started_at=now)
    StepRun.objects.filter(job__build=failed).update(status="FAILED", started_at=now)
    services.advance_build(failed.pk)
    return {"p": pipeline.pk, "name": pipeline.name, "b": running.pk, "s": step.pk, "f": failed.pk}


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
]
ALPHA_ID = None  # the alpha team's id, for the admin form's `teams` (set by the fixture)


def state() -> list:
    return [
        list(Pipeline.objects.order_by("pk").values_list("pk", "definition")),
        list(Build.objects.order_by("pk").values_list("pk", "status", "attempt")),
        list(StepRun.objects.order_by("pk").values_list("pk", "status", "attempt")),
        list(Secret.objects.order_by("pk").values_list("pk", "name")),
        list(Pipeline.objects.filter(repository__isnull=False).values_list(
            "repository__webhook_secret_set_at", flat=True).order_by("pk")),
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
    got, expected, changed_wrongly, audited = {}, {}, [], {}
    targets = {team: a_target(team) for team in (alpha, beta)}
    for name, user in people.items():
        client = client_of(user, cell.door)
        for team, target in targets.items():
            level = ROLES[name] if team == alpha else NONE
            key = f"{name} on {team.name}'s"
            expected[key] = cell.expected(level, best=ROLES[name])
            before, events = state(), AuditEvent.objects.count()
            body = cell.body(target) if cell.body else None
            send = {"format": "json"} if cell.door == "api" and body is not None else {}
            response = getattr(client, cell.method.lower())(
                cell.path.format(**target), body, **send
            )
            got[key] = answer(response)
            audited[key] = AuditEvent.objects.count() - events
            if (state() != before) != (cell.acts and expected[key] == cell.ok):
                changed_wrongly.append(key)
            if state() != before:  # the next person acts on objects of their own
                targets[team] = a_target(team)
    assert got == expected
    assert changed_wrongly == []
    acted = {key: int(cell.acts and expected[key] == cell.ok) for key in expected}
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
