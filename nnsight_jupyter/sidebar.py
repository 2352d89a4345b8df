"""The kernel's side of the JupyterLab sidebar: one comm target, registered by `%load_ext nnsight_jupyter`.

The sidebar talks over the notebook's own kernel connection (a second connection would not get
comm messages: jupyterlab #7144). It opens a comm on target `TARGET` when it is shown and closes
it when it is hidden or leaves the kernel, so a kernel whose sidebar is closed runs nothing for it.
The comm opens with the extension's `{protocol, version}`; each snapshot carries the kernel's
version and its own verdict on the extension's (`mismatch`), so either side can warn.
While a comm is open, a `post_run_cell` hook pushes a fresh `snapshot` after each cell (a scan of
the notebook's names for models and for tensors their latest traces saved: microseconds for a
few hundred names).

Requests are `{id, kind, ...}` answered with `{id, ok, ...}` and binary buffers, as the views do:
`snapshot`, `tree` (a model's ModuleTree state), `open` (a saved tensor's TensorView state), `tiles`
and other TensorView requests with `target` (the opened tensor), `cancel` (a remote job),
`registry` (the models `%%trace` knows by name) and `health` (each remote server's `/health`). A
failed request answers `{id, ok: false, error}`.

`health` is answered from a thread: an unreachable server costs its connect timeout, which would
otherwise hold up the next cell; the snapshot after each cell only lists the servers (no network).

A kernel busy with a long cell reads no comm message until the cell ends, so while a comm is open a
daemon thread asks the servers' `/health` and the unfinished jobs' status every
`CONFIG.sidebar_poll` seconds (5 by default) and pushes `{event: "health", hosts}` and
`{event: "jobs", jobs}` when they change (ipykernel's iopub socket takes messages from any thread).
The browser cannot ask the servers itself: they send no CORS headers. Job status goes through the
job's own `httpx.Client`, which a running cell may be using too (httpx: "it can be shared between
threads"). The cost is one `/health` GET
per server and one status GET per unfinished job each interval, only while the sidebar is open; the
thread ends when the comm closes.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

from ._version import __version__
from .remote.lifecycle import FINAL_STATES

log = logging.getLogger(__name__)

TARGET = "nnsight_jupyter.sidebar"
PROTOCOL = 1
HEALTH_TIMEOUT_S = 3.0
_FINAL = set(FINAL_STATES)
# The last status seen of each job, so a finished job is not asked about again.
_known: dict[str, dict[str, Any]] = {}


def _remove_buffers(state: dict[str, Any]) -> tuple[dict[str, Any], list, list]:
    from ipywidgets.widgets.widget import _remove_buffers as remove

    return remove(state)


class SidebarSession:
    """One open sidebar comm: answers its requests and pushes snapshots after each cell."""

    def __init__(self, shell: Any, comm: Any, opened_with: dict[str, Any] | None = None) -> None:
        self.shell = shell
        self.comm = comm
        # What the extension says of itself when it opens the comm: {"protocol": n, "version": "x.y.z"}.
        self.extension = opened_with or {}
        self.opened: dict[str, Any] = {}
        self._closed = threading.Event()
        comm.on_msg(self._on_msg)
        comm.on_close(lambda _msg: self.close())
        shell.events.register("post_run_cell", self._after_cell)
        self.watcher = threading.Thread(target=self._watch, name="sidebar-watch", daemon=True)
        self.watcher.start()

    def close(self) -> None:
        self._closed.set()
        try:
            self.shell.events.unregister("post_run_cell", self._after_cell)
        except ValueError:
            pass
        self.opened.clear()
        _sessions.discard(self)

    def _watch(self) -> None:
        """Push the servers' health and the jobs' status when they change, until the comm closes.

        It waits one interval before its first look: the sidebar asks for the health as soon as it
        opens, and a comm opened for one question (the commands' model list) is closed before then.
        """
        last: dict[str, Any] = {}
        looks = (("health", "hosts", lambda: health(remote_hosts())), ("jobs", "jobs", job_list))
        while not self._closed.wait(_poll_interval()):
            try:
                for event, field, read in looks:
                    value = read()
                    if self._closed.is_set():
                        return
                    if value != last.get(event):
                        self.comm.send({"event": event, field: value})
                        last[event] = value
            except Exception:  # noqa: BLE001 - a failed look is retried next interval; the kernel keeps running
                log.debug("sidebar watch failed", exc_info=True)

    def _after_cell(self, _result: Any = None) -> None:
        try:
            self.comm.send({"event": "snapshot", **self.snapshot()})
        except Exception:  # noqa: BLE001 - the sidebar never breaks a cell
            log.debug("sidebar snapshot failed", exc_info=True)

    def _on_msg(self, msg: dict[str, Any]) -> None:
        content = msg.get("content", {}).get("data", {})
        if not isinstance(content, dict) or not isinstance(content.get("id"), str):
            return
        request_id = content["id"]
        if content.get("kind") == "health":
            threading.Thread(target=self._health, args=(request_id,), name="sidebar-health", daemon=True).start()
            return
        try:
            reply, buffers = self.handle(content)
        except Exception as exc:  # noqa: BLE001 - the failure goes back to the sidebar, the kernel keeps serving
            log.debug("sidebar request %r failed", content, exc_info=True)
            self.comm.send({"id": request_id, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
            return
        self.comm.send({**reply, "id": request_id, "ok": True}, buffers=buffers)

    def snapshot(self) -> dict[str, Any]:
        return {**snapshot(self.shell), "mismatch": version_mismatch(self.extension)}

    def _health(self, request_id: str) -> None:
        try:
            self.comm.send({"id": request_id, "ok": True, "hosts": health(remote_hosts())})
        except Exception as exc:  # noqa: BLE001 - the failure goes back to the sidebar
            log.debug("sidebar health check failed", exc_info=True)
            self.comm.send({"id": request_id, "ok": False, "error": f"{type(exc).__name__}: {exc}"})

    def handle(self, content: dict[str, Any]) -> tuple[dict[str, Any], list]:
        kind = content.get("kind")
        target = content.get("target")
        if target is not None:
            data = self.opened.get(str(target))
            if data is None:
                raise KeyError(f"{target!r} is not open in the sidebar any more; click it again")
            return data.handle(content)
        if kind == "snapshot":
            return self.snapshot(), []
        if kind == "tree":
            return self._tree(str(content.get("model")))
        if kind == "open":
            return self._open(str(content.get("name")))
        if kind == "cancel":
            return {"job": cancel_job(str(content.get("job")))}, []
        if kind == "registry":
            from .models.registry import available

            return {"models": [{"name": m.name, "description": m.description} for m in available()]}, []
        raise ValueError(
            f"the sidebar answers snapshot, tree, open, cancel, registry and health requests, not {kind!r}"
        )

    def _tree(self, name: str) -> tuple[dict[str, Any], list]:
        from .widgets.module_tree import TreeData

        model = models_in(self.shell).get(name)
        if model is None:
            raise KeyError(f"no model called {name!r} in this kernel")
        data = TreeData(model)
        state = data.state()
        state["note"] = ""
        state, paths, buffers = _remove_buffers(state)
        return {"state": state, "buffer_paths": paths}, buffers

    def _open(self, name: str) -> tuple[dict[str, Any], list]:
        from .widgets.saved_values import as_tensor
        from .widgets.tensor_view import TensorData, token_labels

        if name not in self.shell.user_ns:
            raise KeyError(f"{name!r} is not in the notebook any more")
        tensor, note = as_tensor(self.shell.user_ns[name])
        if tensor is None:
            raise TypeError(f"{name} is not a tensor")
        data = TensorData(tensor, name=name, tokens=token_labels(tensor), note=note)
        self.opened[name] = data
        state, paths, buffers = _remove_buffers(data.state())
        return {"state": state, "buffer_paths": paths}, buffers


_sessions: set[SidebarSession] = set()
_warned_poll: set[str] = set()


def _poll_interval() -> float:
    """`CONFIG.sidebar_poll`; a value set on CONFIG directly that is not a positive number is logged once
    (with what to set instead) and the default used, since this runs in a thread no cell waits on."""
    from .errors import NNsightError
    from .settings import CONFIG, SIDEBAR_POLL_S

    try:
        return CONFIG.resolved_sidebar_poll()
    except NNsightError as exc:
        if str(exc) not in _warned_poll:
            _warned_poll.add(str(exc))
            log.warning("%s Using %g s meanwhile.", exc, SIDEBAR_POLL_S)
        return SIDEBAR_POLL_S


def models_in(shell: Any) -> dict[str, Any]:
    """The models this kernel holds: NNsight models among the notebook's names, and those `%%trace` loaded by alias."""
    from .models.base import NNsight

    found: dict[str, Any] = {}
    for name, value in list(shell.user_ns.items()):
        if not name.startswith("_") and isinstance(value, NNsight):
            found.setdefault(name, value)
    state = getattr(shell, "_nnsight_jupyter", None)
    if state is not None:
        for alias, model in state[0]._models.items():
            if not any(model is m for m in found.values()):
                found[alias] = model
    return found


def snapshot(shell: Any) -> dict[str, Any]:
    """What the sidebar shows: versions, models, the values their latest traces saved, remote jobs."""
    import torch

    from .tracing.record import last_trace

    models = models_in(shell)
    listed = []
    saved = []
    for name, model in models.items():
        module = model._module
        listed.append(
            {
                "name": name,
                "class": type(module).__name__,
                "modules": sum(1 for _ in module.modules()),
                "params": sum(p.numel() for p in module.parameters()),
                # a notebook name (code can use it as is), or a name only `%%trace` knows
                "variable": shell.user_ns.get(name) is model,
            }
        )
        record = last_trace(model)
        if record is None:
            continue
        for var, value in list(shell.user_ns.items()):
            if var.startswith("_"):
                continue
            tensors = [value] if isinstance(value, torch.Tensor) else []
            if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
                tensors = list(value)
            if tensors and any(record.holds(t) for t in tensors):
                first = tensors[0]
                shape = list(first.shape) if len(tensors) == 1 else [len(tensors), *first.shape]
                saved.append(
                    {"name": var, "model": name, "shape": shape, "dtype": str(first.dtype).replace("torch.", "")}
                )
    return {
        "version": __version__,
        "protocol": PROTOCOL,
        "models": listed,
        "saved": saved,
        "jobs": job_list(),
        "remote": remote_hosts(),
    }


def remote_hosts() -> list[dict[str, str]]:
    """The servers this kernel's remote traces use: the configured host (else the local daemon, if one
    runs), then any other host its jobs went to. Read from settings and files only, no network."""
    from .remote import daemon, submitted
    from .settings import CONFIG

    hosts: list[dict[str, str]] = []
    configured = CONFIG.resolved_host()
    if configured:
        hosts.append({"host": configured.rstrip("/"), "source": "configured"})
    else:
        local = daemon.recorded_host()
        if local:
            hosts.append({"host": local, "source": "local daemon"})
    for handle in submitted.jobs():
        host = handle.client.host
        if all(h["host"] != host for h in hosts):
            hosts.append({"host": host, "source": "jobs"})
    return hosts


def _reach(entry: dict[str, str]) -> str:
    """What to do about a server that does not answer, by where the sidebar learned of it."""
    source, host = entry.get("source"), entry.get("host")
    if source == "local daemon":
        return (
            "The local daemon has stopped since it was started; the next remote=True trace starts it again "
            "(or set a server with %nnsight config host=URL)."
        )
    if source == "configured":
        return (
            f"Start the server at {host} (nnsight-jupyter serve --models ... on that machine) or set another "
            "with %nnsight config host=URL."
        )
    return f"Jobs of this kernel went to {host}, which no longer answers: their results cannot be fetched from it."


def health(hosts: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Each server's `/health` (no key needed): reachable or not, its versions, whether it speaks our protocol."""
    import httpx

    from .remote.client import why_unreachable
    from .remote.protocol import PROTOCOL_VERSION

    out = []
    for entry in hosts:
        row: dict[str, Any] = dict(entry)
        try:
            response = httpx.get(f"{entry['host']}/health", timeout=HEALTH_TIMEOUT_S)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            reason = why_unreachable(exc, entry["host"], HEALTH_TIMEOUT_S)
            row.update({"status": "unreachable", "error": f"{reason}. {_reach(entry)}"})
            out.append(row)
            continue
        try:
            response.raise_for_status()
            answer = response.json()
            if not isinstance(answer, dict):
                raise ValueError("the answer is not a JSON object")
        except (httpx.HTTPStatusError, ValueError) as exc:
            detail = f"HTTP {response.status_code}" if isinstance(exc, httpx.HTTPStatusError) else str(exc)
            row.update({"status": "error", "error": f"/health answered {detail}: is this an nnsight-jupyter server?"})
        else:
            protocol = answer.get("protocol_version")
            row.update(
                {
                    "status": "ok" if protocol == PROTOCOL_VERSION else "incompatible",
                    "package_version": answer.get("package_version"),
                    "protocol_version": protocol,
                    "error": None
                    if protocol == PROTOCOL_VERSION
                    else f"the server speaks protocol {protocol}, this kernel {PROTOCOL_VERSION}: "
                    "install one nnsight-jupyter version on both",
                }
            )
        out.append(row)
    return out


def job_list() -> list[dict[str, Any]]:
    """This kernel's remote jobs with their status (asked of the server for those not finished)."""
    from .remote import submitted

    out = []
    for handle in reversed(submitted.jobs()):
        entry: dict[str, Any] = {"job_id": handle.job_id, "model": handle.model, "host": handle.client.host}
        known = _known.get(handle.job_id)
        if known is not None and known.get("status") in _FINAL:
            entry.update(_job_fields(known))
        else:
            try:
                status = handle.status()
                _known[handle.job_id] = status
                entry.update(_job_fields(status))
            except Exception as exc:  # noqa: BLE001 - an unreachable server is shown, not raised
                entry.update({"status": "unknown", "error": str(exc)})
        out.append(entry)
    return out


def _job_fields(status: dict[str, Any]) -> dict[str, Any]:
    error = status.get("error")
    return {
        "status": status.get("status", "unknown"),
        "position": status.get("position"),
        "error": (error or {}).get("message") if isinstance(error, dict) else error,
    }


def cancel_job(job_id: str) -> dict[str, Any]:
    """Ask the server to cancel one of this kernel's jobs; returns its status afterwards."""
    from .remote import submitted

    handle = submitted.find(job_id)
    if handle is None:
        raise KeyError(f"job {job_id} was not submitted from this kernel")
    answer = handle.cancel()
    status = handle.status()
    _known[job_id] = status
    return {"job_id": job_id, **_job_fields(status), "answer": answer.get("status")}


def version_mismatch(extension: dict[str, Any]) -> str | None:
    """The kernel's side of the version check: what to tell the user when the extension that opened the
    comm is another release or speaks another protocol (None when they agree, or it did not say)."""
    version, protocol = extension.get("version"), extension.get("protocol")
    if version is None:
        return None

    def release(v: Any) -> str:
        match = re.match(r"\d+\.\d+\.\d+", str(v))
        return match.group(0) if match else str(v)

    if protocol == PROTOCOL and release(version) == release(__version__):
        return None
    return (
        f"JupyterLab has the nnsight-jupyter extension {version} (sidebar protocol {protocol}) but this kernel "
        f"runs nnsight-jupyter {__version__} (protocol {PROTOCOL}). Install one version in both (pip install -U "
        "nnsight-jupyter in the kernel's and in JupyterLab's environment), then restart the kernel and reload "
        "the page."
    )


def _open_handler(shell: Any):
    def on_open(comm: Any, msg: dict[str, Any]) -> None:
        data = msg.get("content", {}).get("data") if isinstance(msg, dict) else None
        session = SidebarSession(shell, comm, data if isinstance(data, dict) else None)
        _sessions.add(session)
        session._after_cell()

    return on_open


def register(shell: Any) -> None:
    """Register the sidebar's comm target in this kernel (a no-op outside a kernel)."""
    if getattr(shell, "kernel", None) is None:
        return
    from comm import get_comm_manager

    get_comm_manager().register_target(TARGET, _open_handler(shell))


def unregister(shell: Any) -> None:
    if getattr(shell, "kernel", None) is None:
        return
    from comm import get_comm_manager

    for session in list(_sessions):
        session.close()
    get_comm_manager().unregister_target(TARGET, None)
