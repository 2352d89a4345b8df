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
        "--replicas", type=int, default=d["replicas"], help="worker processes per model (default %(default)s)"
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
    return ServerConfig(
        models=parse_model_specs(args.models),
        data_dir=args.data_dir or server_dir(),
        api_key_file=None if args.insecure_no_auth else args.api_key_file,
        auth=not args.insecure_no_auth,
        replicas=args.replicas,
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
