"""The `serve` command line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nnsight_jupyter.remote import serve
from nnsight_jupyter.remote.server.auth import ApiKeys


def test_add_key_prints_it_once(tmp_path, capsys):
    path = tmp_path / "keys.txt"
    assert serve.main(["--add-key", "alice", "--api-key-file", str(path)]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    assert ApiKeys(path).owner(key) == "alice" and key not in path.read_text()


@pytest.mark.parametrize(("argv", "message"), [
    (["--models", "smollm2"], "--add-key"),
    ([], "no models"),
    (["--models", "smollm2", "--insecure-no-auth", "--host", "0.0.0.0"], "loopback"),
    (["--add-key", "alice"], "--api-key-file"),
    (["--models", "a,a", "--insecure-no-auth"], "unique"),
    (["--models", "x", "--api-key-file", "/nonexistent/keys.txt"], "does not exist"),
    (["--models", "a", "--insecure-no-auth", "--replicas", "a=two"], "NAME=N"),
    (["--models", "a", "--insecure-no-auth", "--replicas", "0"], "at least 1 replica"),
    (["--models", "a", "--insecure-no-auth", "--replicas", "b=2"], "does not serve"),
    (["--models", "a", "--insecure-no-auth", "--ray-address", "auto"], "--ray-address needs --engine ray"),
    (["--models", "a", "--insecure-no-auth", "--engine", "dask"], "invalid choice"),
    (["--models", "a", "--insecure-no-auth", "--engine", "ray", "--memory-budget-mb", "100"], "raise the budget"),
    (["--models", "a", "--insecure-no-auth", "--engine", "ray", "--replica-memory-mb", "1024"],
     "reserve the model's size plus the job limit"),
])
def test_bad_arguments_exit_with_a_clear_message(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("NNSIGHT_JUPYTER_API_KEY_FILE", raising=False)
    with pytest.raises(SystemExit) as info:
        serve.main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_config_from_flags(tmp_path):
    args = serve.build_parser().parse_args(["--models", "tiny=pkg.m:f", "--insecure-no-auth", "--data-dir",
                                            str(tmp_path), "--max-request-mb", "2", "--result-ttl", "5",
                                            "--replicas", "2", "--threads", "1", "--cancel-grace", "7.5"])
    config = serve.config_from_args(args)
    assert config.models[0].name == "tiny" and not config.auth and config.max_request_bytes == 2 * 2**20
    assert config.result_ttl_s == 5 and config.replicas == 2 and config.worker_threads == 1
    assert config.cancel_grace_s == 7.5


def test_engine_and_replica_flags(tmp_path):
    args = serve.build_parser().parse_args([
        "--models", "a=pkg.m:f,b=pkg.m:g", "--insecure-no-auth", "--data-dir", str(tmp_path), "--engine", "ray",
        "--ray-address", "ray://head:10001", "--replicas", "3", "--replicas", "b=2", "--replica-cpus", "2",
        "--replica-memory-mb", "4096", "--max-replicas", "5", "--scale-up-wait", "1.5", "--idle-replica-seconds", "30",
        "--memory-budget-mb", "8192", "--unload-after", "600"])
    config = serve.config_from_args(args)
    assert config.engine == "ray" and config.ray_address == "ray://head:10001"
    assert (config.replicas_for("a"), config.replicas_for("b")) == (3, 2)
    assert config.replica_cpus == 2 and config.replica_memory_bytes == 4096 * 2**20 and config.max_replicas == 5
    assert config.scale_up_wait_s == 1.5 and config.idle_replica_s == 30
    assert config.memory_budget_bytes == 8192 * 2**20 and config.unload_after_s == 600


def test_a_ray_address_without_a_cluster_is_a_flag_error(tmp_path):
    from .conftest import free_port

    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    done = subprocess.run([sys.executable, "-m", "nnsight_jupyter.remote.serve", "--models", "tiny=pkg.m:f",
                           "--insecure-no-auth", "--data-dir", str(tmp_path / "data"), "--engine", "ray",
                           "--ray-address", address], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert f"no Ray cluster answers at --ray-address {address}" in done.stderr and "ray start --head" in done.stderr
    assert "Traceback" not in done.stderr


def test_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "nnsight_jupyter.remote.serve", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "--models" in done.stdout and "--api-key-file" in done.stdout


def test_flag_defaults_are_the_server_configs(tmp_path):
    import dataclasses

    from nnsight_jupyter.remote.server.config import ServerConfig, parse_model_specs

    args = serve.build_parser().parse_args(["--models", "tiny=pkg.m:f", "--insecure-no-auth"])
    from_flags = serve.config_from_args(args)
    declared = ServerConfig(models=parse_model_specs("tiny=pkg.m:f"), data_dir=from_flags.data_dir, auth=False)
    for field in dataclasses.fields(ServerConfig):
        if field.name != "clock":
            assert getattr(from_flags, field.name) == getattr(declared, field.name), field.name


def test_the_default_data_folder_follows_the_cache_settings(tmp_path, monkeypatch):
    monkeypatch.delenv("NNSIGHT_JUPYTER_SERVER_DIR", raising=False)
    monkeypatch.delenv("NNSIGHT_JUPYTER_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    args = serve.build_parser().parse_args(["--models", "tiny=pkg.m:f", "--insecure-no-auth"])
    assert serve.config_from_args(args).data_dir == tmp_path / "xdg" / "nnsight-jupyter" / "server"
    monkeypatch.setenv("NNSIGHT_JUPYTER_SERVER_DIR", str(tmp_path / "explicit"))
    assert serve.config_from_args(args).data_dir == tmp_path / "explicit"
