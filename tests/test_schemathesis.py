"""schemathesis against the gateway's own /openapi.json, served by a real uvicorn: every
operation, valid and invalid inputs, a bounded number of examples each. No response is a 5xx,
and every status, content type, header and body is the one documented."""

from __future__ import annotations

from collections.abc import Callable

import hypothesis
import hypothesis.errors
import pytest
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.live_gateway import LiveGateway, live_gateway  # noqa: F401 - the fixture

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


EXAMPLES = 12  # per operation and generation mode: ~20 operations x 2 modes, well under 60 s


def operations(url: str) -> list[schemathesis.APIOperation]:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    # The credentials are ours (call_and_validate's headers): without this, most negative
    # cases were a mutated Authorization header, answered 401, and never reached the body.
    schema.config.generation.update(with_security_parameters=False)
    return [result.ok() for result in schema.get_all_operations()]


def _exercise(
    operation: schemathesis.APIOperation,
    mode: GenerationMode,
    headers: dict[str, str],
    statuses: dict[int, int],
) -> Callable[[], None]:
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis.settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    def exercise(case: schemathesis.Case) -> None:
        response = case.call_and_validate(headers=headers, checks=CHECKS, timeout=10)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    return exercise  # type: ignore[no-any-return]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_operation_answers_as_documented(
    live_gateway: LiveGateway, mode: GenerationMode
) -> None:  # noqa: F811
    credentials = {"admin": live_gateway.admin, "channel": live_gateway.channel}
    failures: list[str] = []
    statuses: dict[int, int] = {}
    for operation in operations(live_gateway.url):
        security = operation.definition.raw.get("security") or [{}]
        scheme = next(iter(security[0]), None)
        headers = dict(credentials[scheme]) if scheme else {}

        exercise = _exercise(operation, mode, headers, statuses)
        try:
            exercise()
        except hypothesis.errors.Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE  # nothing to get wrong: no params or body
        except Exception as exc:  # noqa: BLE001 - collect every operation's failure, then fail
            failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)
    print(mode, sorted(statuses.items()))
    # Valid requests get past validation somewhere; invalid ones are refused, never served.
    assert any(s < 300 for s in statuses) if mode is GenerationMode.POSITIVE else statuses
