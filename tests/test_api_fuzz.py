"""schemathesis against a real ``chatd run`` process, from its own ``/openapi.json``: every
generated request (positive and negative, single calls and stateful chains, authenticated with a
real token) gets an answer that is not a 5xx and conforms to the spec (status, content type,
schema, headers). Afterwards the process still serves and what others stored is unchanged.

A short run (a fixed seed, ``CHATD_FUZZ_EXAMPLES`` cases per operation, 40 by default); a longer
one: ``CHATD_FUZZ_EXAMPLES=1000 CHATD_FUZZ_SEED=$RANDOM python -m pytest tests/test_api_fuzz.py``.
"""

from __future__ import annotations

from tests.helpers import schemathesis_finds_nothing


async def test_schemathesis_finds_nothing(tmp_path, nursery):
    async def still_serves(api, alice):
        assert (await api.call("GET", "/healthz")).status == 200
        assert (await api.login("alice"))["user"]["id"] == alice["user"]["id"]

    await schemathesis_finds_nothing(
        tmp_path, nursery,
        # the fuzzer's many bad logins come from one address: the per-address login limiter (tested in
        # test_api.py) would answer the checks after the run with 429
        config_edit=("[auth]\n",
                     "[auth]\nlogin_failures_per_ip_burst = 1000000\nlogin_failures_per_user_burst = 1000000\n"),
        spec_base=lambda api, alice: api.base,
        # logging out revokes the token the run authenticates with
        exclude=["--exclude-path", "/v1/logout"],
        checks_after=still_serves)
