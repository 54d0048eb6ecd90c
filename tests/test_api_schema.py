"""A property test of the whole API, driven by /api/openapi.json (issue 4, point 7):
schemathesis generates requests for every operation, valid and invalid, and every answer
must be a documented status with a documented body, and never a 5xx."""

from __future__ import annotations

import queue
import threading

import pytest
import schemathesis
import trio
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from trisocks.management import ApiKey, Management, SQLiteStore
from trisocks.management.keys import FailureLimiter
from trisocks.management.registry import document_dict
from trisocks.tunnel.server import ServerConfig

from .api_support import KEY

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory):
    """A server with the API on, in a thread of its own (the tests here are synchronous)."""
    db = tmp_path_factory.mktemp("fuzz") / "fuzz.db"
    started: queue.Queue = queue.Queue()
    control: dict = {}

    async def main():
        # unknown keys in /api/subscribe count as failures: no lockout while fuzzing
        plane = Management(SQLiteStore(db), api_key=ApiKey(KEY),
                           limiter=FailureLimiter(max_failures=1 << 30))
        plane.tokens.add_forward("fuzz-token-0001")
        plane.create_server(ServerConfig(ws_host="127.0.0.1", ws_port=0))
        async with trio.open_nursery() as nursery:
            port = await nursery.start(plane.run)
            control["stop"] = nursery.cancel_scope.cancel
            control["trio"] = trio.lowlevel.current_trio_token()
            started.put(port)

    def run():
        try:
            trio.run(main)
        except BaseException as exc:
            started.put(exc)

    thread = threading.Thread(target=run, name="fuzzed-server", daemon=True)
    thread.start()
    port = started.get(timeout=30)
    if isinstance(port, BaseException):
        raise port
    yield port
    trio.from_thread.run_sync(control["stop"], trio_token=control["trio"])
    thread.join(10)


# The schema is the very document /api/openapi.json serves (generated from the code, so it
# can be loaded before any server runs); test_the_served_document_is_the_one_fuzzed checks
# that the two are the same.
schema = schemathesis.openapi.from_dict(document_dict())


def test_the_served_document_is_the_one_fuzzed(fuzzed_server):
    import httpx

    served = httpx.get(f"http://127.0.0.1:{fuzzed_server}/api/openapi.json", trust_env=False)
    assert served.status_code == 200 and served.json() == document_dict()


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_answers_as_documented(case, fuzzed_server):
    case.call_and_validate(base_url=f"http://127.0.0.1:{fuzzed_server}",
                           headers={"X-API-Key": KEY}, checks=CHECKS, timeout=30)
