"""The command line's door: the installed cictl, run as people of each role (and a person in
no team) with their own tokens, against the live server, on a pipeline of their team and on
one of another team. cictl acts through the API, so each answer is the API's: done (exit 0)
for a role that may; refused (exit 3) with PERMISSION_DENIED to who sees the pipeline, and
NOT_FOUND to who does not."""

import pytest
from django.contrib.auth.models import User

from access.models import Membership, Role, Team
from builds import services
from tests.cictl.conftest import Cictl
from tests.support import api_token, one_step

pytestmark = pytest.mark.django_db(transaction=True)

# No agent serves `nowhere`: the builds stay queued, for status and cancel to act on.
DEFINITION = one_step("true", runs_on="nowhere")
ROLES = {"outsider": 0, "viewer": Role.VIEWER, "developer": Role.DEVELOPER}
COMMANDS = [  # (arguments, the least role that may)
    (("status", "{b}"), Role.VIEWER),
    (("trigger", "{p}"), Role.DEVELOPER),
    (("cancel", "{b}"), Role.DEVELOPER),
]


def test_each_role_through_cictl(workers, worker_env, tmp_path):
    alpha, beta = Team.objects.create(name="alpha"), Team.objects.create(name="beta")
    targets = {}
    for team in (alpha, beta):
        pipeline = services.save_pipeline(f"cli-{team.name}", DEFINITION)
        team.pipelines.add(pipeline)
        targets[team] = pipeline
    got, expected = {}, {}
    for name, level in ROLES.items():
        user = User.objects.create_user(f"cli-{name}")
        if level:
            Membership.objects.create(team=alpha, user=user, role=level)
        home = tmp_path / name
        home.mkdir()
        cictl = Cictl(home, worker_env["AGENT_SERVER_URL"], api_token(user))
        for team, pipeline in targets.items():
            mine = level if team == alpha else 0
            for arguments, needed in COMMANDS:
                build = services.trigger_build(pipeline)
                args = [a.format(b=build.pk, p=pipeline.pk) for a in arguments]
                key = f"{name}: cictl {arguments[0]} on {team.name}'s"
                result = cictl(*args)
                if result.code == 0:
                    got[key] = 0
                else:
                    got[key] = (result.code, result.err.split(":")[0].removeprefix("error "))
                if mine >= needed:
                    expected[key] = 0
                elif mine:
                    expected[key] = (3, "PERMISSION_DENIED")
                else:
                    expected[key] = (3, "NOT_FOUND")
    assert got == expected
