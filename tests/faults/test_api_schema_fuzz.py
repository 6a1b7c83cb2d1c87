"""Schemathesis against the running API: a real HTTP server on the test database, the schema
it serves at /api/schema/, a superuser's token. Every operation gets generated parameters
and bodies (valid and invalid); no answer may be a 5xx, answers must match the schema, and
every error must carry a stable code. Triggers publish to the test Redis; no worker runs."""

import re

import pytest
import schemathesis
from django.contrib.auth.models import User
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from agents.models import Agent
from builds import services
from builds.models import StepRun
from tests.support import PARALLEL, api_token, fail_fast_job

CODE = re.compile(r"[A-Z][A-Z0-9_]*")


def error_carries_a_code(ctx, response, case):
    """DESIGN.md principle 4: every error is JSON with a stable UPPER_SNAKE `code`."""
    if response.status_code < 400:
        return None
    content_type = response.headers.get("content-type", [""])[0]
    assert content_type.startswith("application/json"), (
        f"{response.status_code} answered with {content_type!r}, not JSON"
    )
    body = response.json()
    assert isinstance(body, dict), f"error body is not an object: {body!r}"
    assert isinstance(body.get("code"), str), f"error without a code: {body!r}"
    assert CODE.fullmatch(body["code"]), f"code is not UPPER_SNAKE: {body['code']!r}"
    assert isinstance(body.get("detail"), str), f"error without a detail: {body!r}"
    return None


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    error_carries_a_code,
]


@pytest.fixture
def api_schema(live_server, transactional_db):
    admin = User.objects.create_superuser("fuzzer", email="", password=None)
    token = api_token(admin)
    api_token(admin, name="decoy")
    decoy = admin.api_tokens.get(name="decoy").pk
    pipeline = services.save_pipeline("fuzzed", PARALLEL)
    failed = services.trigger_build(pipeline, {}, admin)
    step = fail_fast_job(failed)  # a failed step, so step retry reaches its handler
    running = services.trigger_build(pipeline, {}, admin)
    agent = Agent.objects.create(name="fuzz-agent", labels=["unit-tests"])
    other_step = StepRun.objects.filter(job__build=running).first()

    auth = {"Authorization": f"Token {token}"}
    schema = schemathesis.openapi.from_url(f"{live_server.url}/api/schema/", headers=auth)
    schema.config.update(headers=auth)

    # Generated ids rarely name a row, and generated YAML is never a valid pipeline: the
    # hooks offer real ids and a valid definition too, so the handlers past get_object()
    # and validation (trigger, cancel, retry, log, save) run as well.
    real = {
        "/api/pipelines/{id}/": [{"id": pipeline.pk}],
        "/api/builds/{id}/": [{"id": failed.pk}, {"id": running.pk}],
        "/api/builds/{id}/steps/{step_id}/": [
            {"id": failed.pk, "step_id": step.pk},
            {"id": running.pk, "step_id": other_step.pk},
        ],
        "/api/agents/{id}/": [{"id": agent.pk}],
        # Another token of the fuzzer's, for revoke and rotate (not the one it fuzzes with).
        "/api/tokens/{id}/": [{"id": decoy}],
    }

    @schema.hook
    def flatmap_path_parameters(context, path_parameters):
        path = context.operation.path
        known = [
            ids
            for prefix, options in real.items()
            if path.startswith(prefix)
            for ids in options
            if ids.keys() == path_parameters.keys()
        ]
        return st.sampled_from([path_parameters, *known])

    @schema.hook
    def flatmap_body(context, body):
        if isinstance(body, dict) and "definition" in body:
            return st.sampled_from([body, {**body, "definition": PARALLEL}])
        return st.just(body)

    return schema


# Not schemathesis.pytest.from_fixture: its runner sets Node._nodeid, which pytest 9.2 no
# longer has. Each operation and generation mode is a hypothesis test of its own instead.
SETTINGS = settings(
    max_examples=25,
    derandomize=True,  # the same cases every run
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


# Every operation (the tokens' five among them) in one test: past the default 300 s on a
# loaded machine.
@pytest.mark.timeout(900)
def test_api_answers_every_generated_request_without_5xx_and_with_codes(api_schema, subtests):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 15, [op.label for op in operations]  # none lost from the schema
    for operation in operations:
        takes_input = len(operation.body.items) > 0 or any(
            p.name != "Authorization" for p in operation.iter_parameters()
        )
        # An operation that takes nothing but its credentials (any string) has no invalid
        # input to generate (hypothesis finds it Unsatisfiable); its positive cases still run.
        for mode in GenerationMode if takes_input else [GenerationMode.POSITIVE]:

            @SETTINGS
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case):
                case.call_and_validate(checks=CHECKS)

            with subtests.test(operation=operation.label, mode=mode.value):
                check()
