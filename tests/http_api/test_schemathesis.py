"""HTTP fuzzing from the OpenAPI schema (schemathesis) against a real server: no 500s,
documented status codes and response schemas only."""

from __future__ import annotations

import os

import schemathesis
from hypothesis import HealthCheck, given, settings

#: No 500s, only documented status codes, content types and response bodies. (Not
#: positive_data_acceptance: the API rightly rejects values the schema cannot express, such as
#: a cache_salt with '@' or an unknown log level, with a documented 400.)
CHECKS = [
    c
    for c in schemathesis.checks.CHECKS.get_all()
    if c.__name__
    in (
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
    )
]
EXAMPLES = int(os.environ.get("LMCACHE_RS_HTTP_FUZZ_EXAMPLES", "25"))


def test_http_api_conforms_to_its_schema(server) -> None:
    schema = schemathesis.openapi.from_url(server.http + "/schema/openapi.json")
    tested: list[str] = []
    failures: list[str] = []
    for result in schema.get_all_operations():
        op = result.ok()

        @given(case=op.as_strategy())
        @settings(
            max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def run(case: schemathesis.Case) -> None:
            case.call_and_validate(checks=CHECKS)

        try:
            run()
        except BaseExceptionGroup as e:  # collect every operation's failures, then report them all
            failures.append(f"{op.label}: {[str(x).splitlines()[0] for x in e.exceptions]}")
        tested.append(op.label)
    assert not failures, "\n\n".join(failures)
    assert len(tested) >= 20, tested
    assert server.proc.poll() is None
