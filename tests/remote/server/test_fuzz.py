"""Hypothesis-driven garbage at every endpoint: always a clear 4xx (or a normal answer), never a 5xx."""

from __future__ import annotations

import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nnsight_jupyter.remote.protocol import encode_request

from .conftest import Client, trace_request

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
PATHS = ["/health", "/models", "/jobs", "/jobs/{id}", "/jobs/{id}/events", "/jobs/{id}/result", "/jobs/{id}/cancel"]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
VALID = encode_request(trace_request("x = 1"))

path_parts = st.text(alphabet=string.ascii_letters + string.digits + string.punctuation + " ü\u2603", max_size=40)
header_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=255, blacklist_characters="\x7f"),
                      max_size=60)


def check(response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400 and response.request.method != "HEAD":
        body = response.json()
        assert isinstance(body["error"], str) and body["error"]


@FUZZ
@given(method=st.sampled_from(METHODS), template=st.sampled_from(PATHS), part=path_parts,
       query=st.dictionaries(st.sampled_from(["after", "x", "job"]), path_parts, max_size=2),
       body=st.binary(max_size=300))
def test_random_requests(server: Client, method, template, part, query, body):
    path = template.replace("{id}", part.replace("/", "_").replace("?", "_").replace("#", "_") or "x")
    check(server.http.request(method, path, params=query, content=body, headers=server.headers))


@FUZZ
@given(mutation=st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.integers(0, len(VALID)), extra=st.binary(max_size=20))
def test_mutated_request_bodies(server: Client, mutation, cut, extra):
    body = bytearray(VALID)
    for index, value in mutation:
        body[index] = value
    body = bytes(body[:cut]) + extra
    response = server.http.post("/jobs", content=body, headers={**server.headers,
                                                                 "content-type": "application/x-msgpack"})
    check(response)
    if response.status_code == 202:
        server.http.post(f"/jobs/{response.json()['job_id']}/cancel", headers=server.headers)


@FUZZ
@given(headers=st.dictionaries(st.sampled_from(["authorization", "x-api-key", "content-type", "content-length",
                                                "last-event-id", "x-other"]), header_text, max_size=4),
       template=st.sampled_from(PATHS), method=st.sampled_from(["GET", "POST"]))
def test_random_headers(server: Client, headers, template, method):
    path = template.replace("{id}", "AAAAAAAAAAAAAAAA")
    headers = {k: v.strip().encode("latin-1") for k, v in headers.items()}
    if "content-length" in headers:
        headers.pop("content-length")
    response = server.http.request(method, path, headers=headers, content=b"")
    check(response)


_finished: dict[str, str] = {}


@FUZZ
@given(value=st.one_of(header_text, st.integers(-10**20, 10**20).map(str)))
def test_event_resume_values(server: Client, value):
    if "job" not in _finished:
        _finished["job"] = server.submit(trace_request("x = 1"))
        server.wait(_finished["job"])
    job_id = _finished["job"]
    check(server.http.get(f"/jobs/{job_id}/events", params={"after": value}, headers=server.headers))
    check(server.http.get(f"/jobs/{job_id}/events",
                          headers={**server.headers, "Last-Event-ID": value.strip().encode("latin-1")}))


@pytest.mark.parametrize("length", ["abc", "-1", "99999999999999999999"])
def test_bad_content_length(server: Client, length):
    response = server.http.post("/jobs", content=b"", headers={**server.headers, "content-length": length,
                                                               "content-type": "application/x-msgpack"})
    check(response)
