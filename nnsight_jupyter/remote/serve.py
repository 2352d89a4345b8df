"""`nnsight-jupyter serve`: run the remote-trace server (Starlette on uvicorn).

    nnsight-jupyter serve --add-key alice --api-key-file keys.txt      # prints alice's key once
    nnsight-jupyter serve --models smollm2 --api-key-file keys.txt --port 8000

Also runnable as ``python -m nnsight_jupyter.remote.serve``. Models are registry names, Hub ids,
folders or ``module:function`` factories, comma-separated, each optionally ``name=spec``. The
server listens on 127.0.0.1 unless ``--host`` says otherwise, keeps its queue and results in
``--data-dir`` (default ``server/`` in the cache folder, see ``nnsight_jupyter.settings``), and
needs an API key file unless ``--insecure-no-auth`` is given, which is allowed only on a loopback address. See
``nnsight_jupyter.remote.server`` for the endpoints and the sandbox.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import sys
from pathlib import Path
from typing import Any

from ..settings import ENV_API_KEY_FILE, ENV_SERVER_DIR, api_key_file, server_dir

__all__ = ["build_parser", "config_from_args", "main"]

MiB = 2**20


def build_parser(prog: str = "nnsight-jupyter serve") -> argparse.ArgumentParser:
    """The flags; every limit's default is the one `ServerConfig` declares."""
    from .server.config import ServerConfig

    d: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(ServerConfig)}
    parser = argparse.ArgumentParser(prog=prog, description="Serve remote traces of one or more models.")
    parser.add_argument(
        "--models",
        action="append",
        metavar="SPECS",
        help="models to serve: comma-separated registry names, Hub ids, folders or module:function "
        "factories, each optionally name=spec (repeatable)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    parser.add_argument(
        "--api-key-file",
        type=Path,
        default=api_key_file(),
        help=f"file of hashed API keys (default ${ENV_API_KEY_FILE})",
    )
    parser.add_argument(
        "--add-key", metavar="NAME", help="create an API key for NAME in --api-key-file, print it once, and exit"
    )
    parser.add_argument(
        "--insecure-no-auth", action="store_true", help="serve without API keys (only on a loopback --host)"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"folder for the job queue and results (default ${ENV_SERVER_DIR} or server/ in the cache folder)",
    )
    parser.add_argument(
        "--replicas",
        action="append",
        type=_replicas,
        metavar="N|NAME=N",
        help=f"replicas of every model (N) or of one model (NAME=N), repeatable (default {d['replicas']})",
    )
    engine = parser.add_argument_group("where jobs run")
    engine.add_argument(
        "--engine",
        choices=("local", "ray"),
        default=d["engine"],
        help="local: worker processes on this machine; ray: one Ray actor per replica (default %(default)s)",
    )
    engine.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="the Ray cluster to join, e.g. auto or ray://head:10001 (--engine ray; default: start one here)",
    )
    engine.add_argument(
        "--replica-cpus",
        type=float,
        default=d["replica_cpus"],
        help="CPUs Ray reserves per replica (default %(default)g)",
    )
    engine.add_argument(
        "--replica-memory-mb",
        type=float,
        default=d["replica_memory_bytes"] / MiB,
        help="memory Ray reserves per replica: the model plus --max-job-memory-mb (default %(default)g)",
    )
    engine.add_argument(
        "--max-replicas",
        type=int,
        default=d["max_replicas"],
        help="the most replicas of one model when a long queue adds replicas (default %(default)s)",
    )
    engine.add_argument(
        "--scale-up-wait",
        type=float,
        default=d["scale_up_wait_s"],
        metavar="SECONDS",
        help="a model whose oldest queued job waited this long gets another replica (default %(default)g)",
    )
    engine.add_argument(
        "--idle-replica-seconds",
        type=float,
        default=d["idle_replica_s"],
        help="an added replica without a job for this long stops (default %(default)g)",
    )
    engine.add_argument(
        "--memory-budget-mb",
        type=float,
        help="replica memory kept loaded; past it the models unused longest are unloaded (default: no budget)",
    )
    engine.add_argument(
        "--unload-after",
        type=float,
        metavar="SECONDS",
        help="unload a model without jobs for this long; its next job reloads it (default: never)",
    )
    parser.add_argument(
        "--result-ttl",
        type=float,
        default=d["result_ttl_s"],
        metavar="SECONDS",
        help="how long results stay downloadable (default %(default)g)",
    )
    parser.add_argument(
        "--max-request-mb",
        type=float,
        default=d["max_request_bytes"] / MiB,
        help="largest request body (default %(default)g)",
    )
    parser.add_argument(
        "--max-result-mb", type=float, default=d["max_result_bytes"] / MiB, help="largest result (default %(default)g)"
    )
    parser.add_argument(
        "--max-job-seconds",
        type=float,
        default=d["max_job_seconds"],
        help="wall-clock limit per job; a request's timeout option may lower it (default %(default)g)",
    )
    parser.add_argument(
        "--max-job-memory-mb",
        type=float,
        default=d["max_job_memory_bytes"] / MiB,
        help="memory a job may add to its worker beyond the loaded model (default %(default)g)",
    )
    parser.add_argument(
        "--max-log-kb",
        type=float,
        default=d["max_log_bytes"] / 1024,
        help="printed output kept per job (default %(default)g)",
    )
    parser.add_argument(
        "--max-queued-jobs", type=int, default=d["max_queued_jobs"], help="queued jobs per model (default %(default)s)"
    )
    parser.add_argument(
        "--cancel-grace",
        type=float,
        default=d["cancel_grace_s"],
        metavar="SECONDS",
        help="time a stopped job has to unwind before its worker is killed (default %(default)g)",
    )
    parser.add_argument(
        "--threads", type=int, default=d["worker_threads"], help="torch threads per worker (default: torch's)"
    )
    parser.add_argument(
        "--start-method",
        choices=("forkserver", "spawn"),
        default=d["start_method"],
        help="how worker processes start (default %(default)s: fast restarts)",
    )
    parser.add_argument(
        "--no-os-sandbox",
        action="store_true",
        help="skip the process-level sandbox layers (debugging only; the language layer stays)",
    )
    parser.add_argument(
        "--user-workers",
        type=int,
        default=d["user_workers"],
        help="job processes each replica keeps for its most recent users (default %(default)s)",
    )
    parser.add_argument(
        "--no-job-checks",
        action="store_true",
        help="skip putting back torch's settings and checking the model around each job (benchmarks only: "
        "one job can then change what the next job of the same user computes)",
    )
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return parser


def config_from_args(args: argparse.Namespace):
    """A ``ServerConfig`` from parsed flags; raises ``ValueError`` naming the bad flag."""
    from .server.config import ServerConfig, parse_model_specs

    if not args.models:
        raise ValueError("no models given: pass --models smollm2 (or any Hub id, folder or module:function)")
    if args.insecure_no_auth and not _loopback(args.host):
        raise ValueError(
            f"--insecure-no-auth serves anyone who can reach {args.host}; use it only with a loopback "
            "--host such as 127.0.0.1, or create keys with --add-key"
        )
    d_replicas: int = ServerConfig.replicas
    counts: dict[str | None, int] = dict(args.replicas or [])
    return ServerConfig(
        models=parse_model_specs(args.models),
        data_dir=args.data_dir or server_dir(),
        api_key_file=None if args.insecure_no_auth else args.api_key_file,
        auth=not args.insecure_no_auth,
        replicas=counts.get(None, d_replicas),
        model_replicas=tuple((name, n) for name, n in counts.items() if name is not None),
        engine=args.engine,
        ray_address=args.ray_address,
        replica_cpus=args.replica_cpus,
        replica_memory_bytes=int(args.replica_memory_mb * MiB),
        max_replicas=args.max_replicas,
        scale_up_wait_s=args.scale_up_wait,
        idle_replica_s=args.idle_replica_seconds,
        memory_budget_bytes=None if args.memory_budget_mb is None else int(args.memory_budget_mb * MiB),
        unload_after_s=args.unload_after,
        result_ttl_s=args.result_ttl,
        max_request_bytes=int(args.max_request_mb * MiB),
        max_result_bytes=int(args.max_result_mb * MiB),
        max_job_seconds=args.max_job_seconds,
        max_job_memory_bytes=int(args.max_job_memory_mb * MiB),
        max_log_bytes=int(args.max_log_kb * 1024),
        max_queued_jobs=args.max_queued_jobs,
        cancel_grace_s=args.cancel_grace,
        worker_threads=args.threads,
        start_method=args.start_method,
        os_sandbox=not args.no_os_sandbox,
        user_workers=args.user_workers,
        job_checks=not args.no_job_checks,
    )


def _replicas(text: str) -> tuple[str | None, int]:
    """``N`` (every model) or ``NAME=N`` (one model), for ``--replicas``."""
    name, _, count = text.rpartition("=")
    try:
        n = int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a replica count: give N for every model or NAME=N for one, e.g. smollm2=2"
        ) from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a model needs at least 1 replica")
    return (name or None), n


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the server (or ``--add-key``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.add_key is not None:
        from .server.auth import create_api_key

        if args.api_key_file is None:
            parser.error("--add-key needs --api-key-file (or $NNSIGHT_JUPYTER_API_KEY_FILE)")
        try:
            key = create_api_key(args.api_key_file, args.add_key)
        except ValueError as exc:
            parser.error(str(exc))
        print(f"API key for {args.add_key} (shown once; {args.api_key_file} stores only its hash):")
        print(key)
        return 0
    try:
        config = config_from_args(args)
        if config.engine == "ray":
            from .server.ray_engine import connect  # before the app starts, so a missing cluster is a flag error

            connect(config.ray_address)
        from .server.app import create_app

        app = create_app(config)
    except ValueError as exc:
        parser.error(str(exc))
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    names = ", ".join(f"{m.name} ({m.spec})" if m.name != m.spec else m.name for m in config.models)
    auth = f"API keys from {config.api_key_file}" if config.auth else "NO AUTHENTICATION (--insecure-no-auth)"
    print(
        f"nnsight-jupyter server: http://{args.host}:{args.port} serving {names}; data in {config.data_dir}; {auth}",
        file=sys.stderr,
        flush=True,
    )
    server = uvicorn.Server(
        uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    )
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
