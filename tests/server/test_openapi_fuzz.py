"""Requests generated from the app's own OpenAPI schema (schemathesis + hypothesis): no 5xx, answers as documented.

Every operation gets a bounded number of valid and invalid requests against a copy of a real index,
with the write token, so that writes are exercised too.
"""
from __future__ import annotations

import shutil

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings, strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (content_type_conformance, not_a_server_error, response_schema_conformance,
                                 status_code_conformance)

from realdata import needs_piped
from simsearch.server.app import ServerSettings, create_app

pytestmark = needs_piped
TOKEN = "fuzz-token"
EXAMPLES_PER_OPERATION = 15
# The operations, read from the schema alone (it does not depend on any index).
ANY_HOST = ("*",)  # schemathesis sends Host: testserver; the Host check has its own tests (test_hostile_requests.py)
OPERATIONS = [op.ok().label for op in schemathesis.openapi.from_asgi(
    "/openapi.json", create_app(ServerSettings(allowed_hosts=ANY_HOST))).get_all_operations()]


@pytest.fixture(scope="module")
def schema(piped_index, tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz") / "piped"
    shutil.copytree(piped_index, directory)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SIMSEARCH_TOKEN", TOKEN)
        app = create_app(ServerSettings(indexes={"piped": str(directory)}, allowed_hosts=ANY_HOST))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.mark.parametrize("label", OPERATIONS)
def test_generated_requests_get_no_server_error_and_documented_answers(schema, label):
    operation = schema.find_operation_by_label(label)
    # Aimed at the served index (unknown names are covered by test_app.py); every other part is generated.
    fixed = {"path_parameters": {"name": "piped"}} if "{name}" in operation.path else {}
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE, **fixed),
                      operation.as_strategy(GenerationMode.NEGATIVE, **fixed))

    @given(case=cases)
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case):
        case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"},
                               checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                                       response_schema_conformance])

    check()
