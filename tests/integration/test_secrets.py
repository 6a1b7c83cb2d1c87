"""Secrets on real agents: a job that names a secret gets it in its steps' environment, sealed
by the controller to the agent process that runs it, and every way a step prints it comes out
masked through the log API and the admin; a job that does not name it never gets it; a job
whose secret is gone fails before any step, saying why; nothing of a value stays in the
database."""

import base64

import pytest
from django.db import connection
from django.urls import reverse

from builds import services
from builds.models import JobRun, StepRun
from tests.support import client_for, make_pipeline, wait_for_build
from vault import services as vault
from vault.models import SealedSecrets, SecretEvent

pytestmark = [pytest.mark.usefixtures("workers"), pytest.mark.django_db(transaction=True)]

SECRET = "tok-3f9a/Q+w8Z=secret"
PRINTS = " && ".join([
    'echo "plain $DEPLOY_TOKEN"',
    'echo "in a line: Authorization: Bearer ${DEPLOY_TOKEN}; more"',
    'for i in $(seq 0 4 ${#DEPLOY_TOKEN}); do printf %s "${DEPLOY_TOKEN:$i:4}"; sleep 0.1; done',
    'echo',
    'printf %s "$DEPLOY_TOKEN" | base64',
    'echo "::set-variable name=LEAK::$DEPLOY_TOKEN"',
    'echo "::set-variable name=SAFE::fine"',
])  # fmt: skip
DEFINITION = f"""
stages:
  - name: s
    jobs:
      - id: uses
        runs-on: linux
        secrets: [DEPLOY_TOKEN]
        steps:
          - {{name: prints, run: {PRINTS!r}}}
          - {{name: later, run: 'echo "safe=$SAFE leak=${{LEAK:-unset}}"'}}
      - id: other
        runs-on: linux
        steps:
          - {{name: looks, run: 'echo "token=${{DEPLOY_TOKEN:-absent}}"'}}
"""


def step(build, name: str) -> StepRun:
    return StepRun.objects.get(job__build=build, name=name)


def test_a_named_secret_reaches_its_job_only_and_is_masked_everywhere(admin_client):
    pipeline = make_pipeline("secretive", "stages: [{name: s, jobs: [{id: j, steps: [{run: x}]}]}]")
    vault.set_secret(pipeline, "DEPLOY_TOKEN", SECRET)
    services.save_pipeline("secretive", DEFINITION, pipeline)
    build = wait_for_build(services.trigger_build(pipeline), timeout=60)
    assert build.status == "SUCCEEDED", [(j.key, j.status, j.reason) for j in build.jobs.all()]

    prints = step(build, "prints")
    log = services.step_log(prints, 1)
    assert "plain ***\n" in log
    assert "in a line: Authorization: Bearer ***; more\n" in log
    assert SECRET not in log
    assert base64.b64encode(SECRET.encode()).decode()[:-4] not in log
    assert "set-variable ignored: LEAK: the line holds a secret" in log
    assert "safe=fine leak=unset" in services.step_log(step(build, "later"), 1)
    assert "token=absent" in services.step_log(step(build, "looks"), 1)  # not named: not given

    api = client_for("builds.view_build")
    through_api = api.get(f"/api/builds/{build.pk}/steps/{prints.pk}/log/")
    assert through_api.status_code == 200
    assert "plain ***" in through_api.text
    assert SECRET not in through_api.text
    page = admin_client.get(reverse("admin:builds_build_step_log", args=(build.pk, prints.pk)))
    assert "plain ***" in page.text
    assert SECRET not in page.text

    [sealed] = SealedSecrets.objects.all()  # sealed once, taken by the agent: emptied
    assert (bytes(sealed.sealed), sealed.taken_at is not None) == (b"", True)
    delivered = SecretEvent.objects.filter(action="DELIVERED", build=build)
    assert list(delivered.values_list("name", flat=True)) == ["DEPLOY_TOKEN"]
    with connection.cursor() as cursor:  # no value in the variables, logs or trail
        for table in ("builds_buildvariable", "builds_steplogchunk", "vault_secretevent"):
            cursor.execute(f"SELECT count(*) FROM {table} t WHERE t::text LIKE %s", [f"%{SECRET}%"])
            assert cursor.fetchone() == (0,), table


def test_a_job_whose_secret_is_gone_fails_before_its_first_step():
    pipeline = make_pipeline("forgetful", "stages: [{name: s, jobs: [{id: j, steps: [{run: x}]}]}]")
    vault.set_secret(pipeline, "DEPLOY_TOKEN", SECRET)
    services.save_pipeline("forgetful", DEFINITION, pipeline)
    vault.delete_secret(pipeline, "DEPLOY_TOKEN")  # after the pipeline named it
    build = wait_for_build(services.trigger_build(pipeline), timeout=60)
    uses = JobRun.objects.get(build=build, key="uses")
    assert (build.status, uses.status) == ("FAILED", "FAILED")
    assert uses.reason.startswith("no secrets: no secret 'DEPLOY_TOKEN' for pipeline forgetful")
    assert step(build, "prints").status == "SKIPPED"  # never ran
    assert JobRun.objects.get(build=build, key="other").status == "SUCCEEDED"
