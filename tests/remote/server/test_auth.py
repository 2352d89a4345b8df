"""API keys: the key file, and the middleware on every endpoint."""

from __future__ import annotations

import os
import time

import pytest

from nnsight_jupyter.remote.server.auth import ApiKeys, create_api_key, hash_key
from nnsight_jupyter.remote.server.routes import ROUTES

from .conftest import Client

ENDPOINTS = sorted(
    (method, route.path.replace("{job_id}", "AAAAAAAAAAAAAAAA"))
    for route in ROUTES for method in route.methods or () if method != "HEAD" and route.path != "/health"
)


def test_every_route_but_health_is_checked():
    assert len(ENDPOINTS) == 7


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
def test_missing_key_is_401(server: Client, method: str, path: str):
    response = server.http.request(method, path)
    assert response.status_code == 401
    assert response.json()["error"] == "missing API key"
    assert "Authorization: Bearer" in response.json()["detail"]
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
def test_wrong_key_is_403(server: Client, method: str, path: str):
    response = server.http.request(method, path, headers={"Authorization": "Bearer nnsj_not-a-key"})
    assert response.status_code == 403 and response.json()["error"] == "invalid API key"
    response = server.http.request(method, path, headers={"X-API-Key": "nnsj_not-a-key"})
    assert response.status_code == 403


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer   ", "Token abc"])
def test_malformed_authorization_is_401(server: Client, header: str):
    response = server.http.get("/models", headers={"Authorization": header})
    assert response.status_code == 401 and response.json()["error"] == "missing API key"


def test_good_key_in_either_header(server: Client):
    assert server.http.get("/models", headers=server.headers).status_code == 200
    assert server.http.get("/models", headers={"X-API-Key": server.key}).status_code == 200
    assert server.http.get("/health").status_code == 200


def test_key_file_stores_only_hashes(tmp_path):
    path = tmp_path / "keys.txt"
    key = create_api_key(path, "carol")
    text = path.read_text()
    assert key not in text and hash_key(key) in text and "carol" in text
    assert key.startswith("nnsj_") and len(key) > 40
    assert os.stat(path).st_mode & 0o777 == 0o600
    keys = ApiKeys(path)
    assert keys.owner(key) == "carol" and keys.owner(key + "x") is None


def test_key_file_is_reread_when_it_changes(tmp_path):
    path = tmp_path / "keys.txt"
    first = create_api_key(path, "a")
    keys = ApiKeys(path)
    time.sleep(0.01)
    second = create_api_key(path, "b")
    keys._checked = 0.0
    assert keys.owner(second) == "b" and keys.owner(first) == "a"
    path.write_text(f"b {hash_key(second)}\n")
    keys._checked = 0.0
    assert keys.owner(first) is None


def test_malformed_key_file_names_the_line(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text("# comment\n\nalice sha256:zz\n")
    with pytest.raises(ValueError, match="line 3"):
        ApiKeys(path)
    with pytest.raises(ValueError, match="does not exist"):
        ApiKeys(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="key names"):
        create_api_key(path, "bad name")
