"""The remote-trace server: run other people's trace code against loaded models, safely.

Run it with ``nnsight-jupyter serve`` (``remote/serve.py``) or build the app yourself::

    from nnsight_jupyter.remote.server.app import create_app
    from nnsight_jupyter.remote.server.config import ServerConfig, parse_model_specs
    app = create_app(ServerConfig(models=parse_model_specs("smollm2"), data_dir="srv", api_key_file="keys.txt"))

How a job flows::

    client ──POST /jobs (encode_request bytes)──> routes.py ──> jobs.py (SQLite queue)
                                                                 │ FIFO per model
    pool.py (one thread per replica) <── claim ──────────────────┘
       │ msgpack over a pipe (channel.py)
       v
    worker.py (one process per replica: model loaded, lockdown.py applied,
               sandbox.py builtins/imports/source check, integrity.py after each job)
       │ log lines, then the encode_result bytes
       v
    store.py (result files) + jobs.py (events) ──> GET /jobs/{id}/events, /result

One module per concept: ``config`` (settings and limits), ``auth`` (API keys), ``responses``
(the JSON error shape), ``routes`` and ``app`` (HTTP), ``service`` (start/stop), ``jobs``
(queue, states, events, restart policy), ``events`` (server-sent events), ``store`` (results
and expiry), ``pool`` (replicas, limits enforced from outside), ``channel`` (server/worker
messages, never pickle), ``worker`` (the model process), ``sandbox`` (what trace code may
name), ``lockdown`` (what the worker process may do), ``integrity`` (what a job may not leave
behind). Importing this package starts and opens nothing.
"""
