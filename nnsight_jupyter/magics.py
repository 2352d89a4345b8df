"""`%%trace` and `%nnsight`: a notebook cell becomes the body of a trace.

    %load_ext nnsight_jupyter

    %%trace smollm2 "The capital of France is"
    logits = model.lm_head.output[0, -1].save()

The cell body runs exactly as the body of `with model.trace(prompt) as tracer:` would, through
the same engine; `model` and `tracer` are defined inside it, and saved values land in the
notebook's namespace. Because the magic is handed the cell text, it needs no source lookup, so it
composes with `%%time` and other cell magics. The cell is registered with IPython's line cache, so
tracebacks show the cell's own line numbers.

With several prompts (quoted strings, or a notebook variable holding a list), each prompt is one
invoke of a single batched forward pass; every name the body binds then holds a list with one
value per prompt, in prompt order.
"""

from __future__ import annotations

import argparse
import ast
import re
import shlex
import sys
from typing import Any

from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

from .errors import MagicUsageError, NNsightError
from .models.base import NNsight
from .settings import debug_tracebacks
from .tracing.envoy import Envoy
from .tracing.operations import SourceEnvoy
from .tracing.source import compile_invokes, compile_source
from .tracing.tracer import Tracer, user_traceback

_TRACE_USAGE = (
    "%%trace MODEL [PROMPT ...] [--max-new-tokens N] [--remote] [--timeout S] [--show]\n"
    "  MODEL   a registry alias (smollm2, gpt2), a Hugging Face id or folder, or a model object in the notebook\n"
    "  PROMPT  a quoted string or the name of a notebook variable (a list gives one invoke per prompt)"
)

_NNSIGHT_HELP = """%nnsight commands:
  %nnsight models              models available here (registry aliases, and whether each works offline)
  %nnsight tree MODEL [INPUT]  the module tree of MODEL (with every module's shapes for a sample INPUT)
  %nnsight status              the remote backend configured for --remote
  %nnsight config KEY=VALUE    set the remote backend for this kernel: host=URL, api_key=KEY, timeout=S,
                               sidebar_poll=S (how often an open sidebar checks the servers and jobs)
  %nnsight help                this text

%%trace MODEL [PROMPT ...] [--max-new-tokens N] [--remote] [--timeout S] [--show]
  runs the cell as the body of a trace; `model` and `tracer` are defined in it.
  --show displays a table of what the cell saved (click a row to open its tensor)."""


def _parse_trace_line(line: str) -> tuple[argparse.Namespace, list[str]]:
    lexer = shlex.shlex(line, posix=False)
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError as exc:
        raise MagicUsageError(f"Cannot read the %%trace line ({exc}); close every quote.\n{_TRACE_USAGE}") from None
    parser = argparse.ArgumentParser(prog="%%trace", add_help=False, exit_on_error=False)
    parser.add_argument("model")
    parser.add_argument("prompts", nargs="*")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--remote", action="store_true")
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("--show", action="store_true")
    try:
        args, unknown = parser.parse_known_args(tokens)
    except (argparse.ArgumentError, SystemExit) as exc:
        raise MagicUsageError(f"{exc}\n{_TRACE_USAGE}") from None
    if unknown:
        raise MagicUsageError(f"Unknown option(s) {' '.join(unknown)}.\n{_TRACE_USAGE}")
    return args, tokens


@magics_class
class TraceMagics(Magics):
    """The `%%trace` cell magic and the `%nnsight` line magic."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self._models: dict[str, NNsight] = {}

    # ----- models ---------------------------------------------------------------------------
    def model_for(self, spec: str) -> NNsight:
        """A model object from the notebook, or a registry alias / Hub id loaded once per kernel."""
        ns = self.shell.user_ns
        if spec in ns and isinstance(ns[spec], NNsight):
            return ns[spec]
        if spec.isidentifier() and spec in ns and isinstance(ns[spec], __import__("torch").nn.Module):
            return NNsight(ns[spec])
        if spec not in self._models:
            from .models.language import LanguageModel

            self._models[spec] = LanguageModel(spec)
        return self._models[spec]

    def _prompt_values(self, tokens: list[str]) -> list[Any]:
        values: list[Any] = []
        for token in tokens:
            if token[:1] in ("'", '"') or token[:2].lower() in ('f"', "f'", 'r"', "r'"):
                try:
                    values.append(ast.literal_eval(token))
                except (ValueError, SyntaxError):
                    raise MagicUsageError(
                        f"Cannot read the prompt {token}: write it as a Python string literal."
                    ) from None
                continue
            try:
                value = eval(token, self.shell.user_ns)  # a notebook variable or expression
            except NameError:
                raise MagicUsageError(
                    f"{token!r} is neither a quoted prompt nor a variable in this notebook. "
                    f'Quote literal prompts: %%trace MODEL "{token}"'
                ) from None
            if isinstance(value, (list, tuple)):
                values.extend(value)
            else:
                values.append(value)
        return values

    # ----- %%trace --------------------------------------------------------------------------
    @cell_magic("trace")  # type: ignore[arg-type]
    def trace(self, line: str, cell: str) -> None:
        """Run the cell as the body of a trace of MODEL on PROMPT(s). `%nnsight help` for details."""
        args, _ = _parse_trace_line(line)
        model = self.model_for(args.model)
        prompts = self._prompt_values(args.prompts)
        # Numbered like the cell itself, so a traceback names it `Cell In[n]`.
        source_name = self.shell.compile.cache(f"%%trace {line}\n{cell}", self._cell_number())
        block = compile_source(cell, source_name, first_line=2)
        try:
            if len(prompts) > 1 and not args.remote:
                results = self._run_invokes(model, prompts, cell, source_name, args)
            else:
                inputs = (prompts[0],) if len(prompts) == 1 else ()
                if len(prompts) > 1:
                    inputs = (prompts,)
                tracer = self._tracer(model, inputs, args)
                ns = dict(self.shell.user_ns, model=model, tracer=tracer)
                block.as_name = "tracer"
                results = tracer.run(block, ns)
        except BaseException as error:
            # The cell's own line, then the message: IPython hides this frame, and the engine's
            # frames are cut (unless CONFIG.debug asks for them).
            __tracebackhide__ = not debug_tracebacks()
            raise user_traceback(error) from error.__cause__
        results.pop("model", None)
        results.pop("tracer", None)
        self.shell.user_ns.update(results)
        if args.show:
            from IPython.display import display

            from .widgets import SavedValues

            display(SavedValues(results, title=f"saved by %%trace {line.strip()}"))

    def _cell_number(self) -> int:
        """The `In[n]` number of the cell running this magic (IPython counts before or after, by mode)."""
        numbers = getattr(self.shell.compile, "_filename_map", None) or {}
        frame = sys._getframe(1)
        while frame is not None:
            number = numbers.get(frame.f_code.co_filename)
            if number is not None:
                return int(number)
            frame = frame.f_back
        return int(self.shell.execution_count)

    def _tracer(self, model: NNsight, inputs: tuple, args: argparse.Namespace) -> Tracer:
        options: dict[str, Any] = {"remote": True, "timeout": args.timeout} if args.remote else {}
        if args.max_new_tokens is not None:
            return model.generate(*inputs, max_new_tokens=args.max_new_tokens, **options)
        return model.trace(*inputs, **options)

    def _run_invokes(
        self, model: NNsight, prompts: list[Any], cell: str, source_name: str, args: argparse.Namespace
    ) -> dict[str, Any]:
        block = compile_invokes(cell, source_name, len(prompts), "__nnsight_prompts__", first_line=2)
        tracer = self._tracer(model, (), args)
        ns = dict(self.shell.user_ns, model=model, tracer=tracer, __nnsight_prompts__=prompts)
        tracer.run(block, ns)
        names = list(dict.fromkeys(n for values in tracer.invoke_values for n in values))
        return {name: [values.get(name) for values in tracer.invoke_values] for name in names}

    # ----- %nnsight -------------------------------------------------------------------------
    @line_magic("nnsight")  # type: ignore[arg-type]
    def nnsight(self, line: str) -> Any:
        """`%nnsight models | tree MODEL | status | config KEY=VALUE | help`."""
        words = line.split()
        command = words[0] if words else "help"
        if command == "help":
            print(_NNSIGHT_HELP)
            return None
        if command == "models":
            from .models.registry import available

            return available()
        if command == "tree":
            if len(words) < 2:
                raise MagicUsageError('Usage: %nnsight tree MODEL ["sample prompt" or variable]')
            model = self.model_for(words[1])
            _, tokens = _parse_trace_line(line.split(None, 1)[1])
            prompts = self._prompt_values(tokens[1:])
            from IPython.display import display

            from .widgets import ModuleTree

            display(ModuleTree(model, *prompts[:1]))
            return None
        if command == "status":
            from .settings import CONFIG

            host = CONFIG.resolved_host()
            if not host:
                print(
                    "remote backend: a local daemon on 127.0.0.1, started on the first --remote cell "
                    "(set a server with %nnsight config host=URL api_key=KEY)"
                )
                return None
            from .remote.client import RemoteClient

            client = RemoteClient(host, CONFIG.resolved_api_key())
            health = client.health()
            print(
                f"remote backend: {host} (protocol {health.get('protocol_version')}, "
                f"server {health.get('package_version')})"
            )
            for entry in client.models():
                print(f"  {entry.get('name')}: {entry.get('state')}")
            return None
        if command == "config":
            from .settings import CONFIG

            if len(words) < 2 or any("=" not in w for w in words[1:]):
                raise MagicUsageError("Usage: %nnsight config KEY=VALUE [KEY=VALUE ...]")
            for word in words[1:]:
                key, value = word.split("=", 1)
                try:
                    CONFIG.set(key.strip(), value.strip())
                except NNsightError as exc:
                    raise MagicUsageError(str(exc)) from None
            return None
        raise MagicUsageError(f"Unknown %nnsight command {command!r}.\n{_NNSIGHT_HELP}")


_PATH_RE = re.compile(r"([A-Za-z_][\w]*(?:\.[A-Za-z_]\w*|\[\s*-?\d+\s*\]|\[\s*['\"][^'\"]+['\"]\s*\])*)\.(\w*)$")


def complete_module_paths(shell: Any, text_before_cursor: str, roots: dict[str, Any] | None = None) -> list[str]:
    """Completions for `model.x.layers[0].<tab>`: child modules, aliases and attributes of the envoy (after
    `.source.`, the operations of its forward).

    `roots` names envoys that are not in the notebook's namespace (`model` in a `%%trace` cell).
    """
    match = _PATH_RE.search(text_before_cursor)
    if not match:
        return []
    expr, prefix = match.groups()
    head = re.match(r"[A-Za-z_]\w*", expr).group(0)
    obj = (roots or {}).get(head, shell.user_ns.get(head))
    if not isinstance(obj, Envoy):
        return []
    rest = expr[len(head) :]
    for part in re.findall(r"\.([A-Za-z_]\w*)|\[\s*(-?\d+)\s*\]|\[\s*['\"]([^'\"]+)['\"]\s*\]", rest):
        attr, index, key = part
        try:
            if attr:
                obj = getattr(obj, attr)
            elif index:
                obj = obj[int(index)]
            else:
                obj = obj[key]
        except Exception:
            return []
        if not isinstance(obj, (Envoy, SourceEnvoy)):
            return []
    if isinstance(obj, SourceEnvoy):  # `.source.<tab>`: the forward's operations, in source order
        return rank_completions(list(obj), prefix)
    # Child modules first, in the order the forward runs them (`named_children()`, as `named_modules()` lists
    # them), then aliases, the envoy's own members and the module's attributes.
    names = list(obj._children) + list(obj._aliases) + ["output", "input", "inputs", "next", "call", "source"]
    names += sorted(n for n in dir(obj._module) if not n.startswith("_"))
    return rank_completions(names, prefix)


def rank_completions(names: list[str], prefix: str) -> list[str]:
    """`names` that start with `prefix`, then those that hold it in another case or place, each group in the order
    given and without repeats.

    The matchers mark their result `ordered`, so IPython keeps this order instead of sorting alphabetically, and
    JupyterLab draws it as it comes. Once the menu has a query (typed on, or a prefix every item shares) JupyterLab
    4 re-sorts by its own score, ties alphabetically; in `%%trace` cells the extension's completer model
    (`labextension/src/lab/completer.ts`) ranks them again as here. Names that hold the prefix elsewhere are
    offered too (`.proj` finds `c_proj`).
    """
    seen: set[str] = set()
    exact: list[str] = []
    others: list[str] = []
    lowered = prefix.lower()
    for name in names:
        if name in seen or not name.isidentifier():
            continue
        if name.startswith(prefix):
            exact.append(name)
        elif lowered in name.lower():
            others.append(name)
        else:
            continue
        seen.add(name)
    return exact + others


_HEADER_MODEL_RE = re.compile(r"^\s*%%trace[ \t]+(\S*)$")


def complete_trace_models(shell: Any, text_before_cursor: str) -> list[str] | None:
    """Completions for the model of a `%%trace` header: the registry's names in its order, then the notebook's
    models and modules. None when the cursor is not on the header's model argument."""
    match = _HEADER_MODEL_RE.match(text_before_cursor)
    if not match:
        return None
    import torch

    from .models.registry import names as registry_names

    prefix = match.group(1)
    registry = registry_names()
    notebook = [
        name
        for name, value in list(shell.user_ns.items())
        if not name.startswith("_") and isinstance(value, (NNsight, torch.nn.Module))
    ]
    exact = [n for n in registry if n.startswith(prefix)] + [n for n in notebook if n.startswith(prefix)]
    lowered = prefix.lower()
    others = [n for n in registry + notebook if not n.startswith(prefix) and lowered in n.lower()]
    return list(dict.fromkeys(exact + others))


_TRACE_HEADER_RE = re.compile(r"\s*%%trace[ \t]+(\S+)")


def trace_cell_roots(shell: Any, cell: str) -> dict[str, Any]:
    """`{"model": envoy}` inside a `%%trace` cell whose model is already loaded (completion never loads one)."""
    match = _TRACE_HEADER_RE.match(cell or "")
    if not match:
        return {}
    spec = match.group(1)
    value = shell.user_ns.get(spec)
    if isinstance(value, Envoy):
        return {"model": value}
    state = getattr(shell, "_nnsight_jupyter", None)
    loaded = state[0]._models.get(spec) if state is not None else None
    return {"model": loaded} if loaded is not None else {}


def _matcher(shell: Any):
    from IPython.core.completer import SimpleCompletion, context_matcher

    @context_matcher()
    def nnsight_module_paths(context: Any) -> dict:
        before = context.text_until_cursor
        models = complete_trace_models(shell, before) if context.full_text.lstrip().startswith("%%trace") else None
        if models is not None:
            return {
                "completions": [SimpleCompletion(text=n, type="model") for n in models],
                "matched_fragment": re.search(r"\S*$", before).group(0),
                "suppress": bool(models),
                "ordered": True,
            }
        names = complete_module_paths(shell, before, trace_cell_roots(shell, context.full_text))
        # The part a completion replaces is the name being typed; without saying so IPython replaces
        # its whole token (`.ml` after `h[0]`, all of `m.transformer.ln`) and the path is lost.
        return {
            "completions": [SimpleCompletion(text=n, type="module") for n in names],
            "matched_fragment": re.search(r"\w*$", before).group(0),
            "suppress": bool(names),
            "ordered": True,
        }

    return nnsight_module_paths


def load_ipython_extension(shell: Any) -> None:
    magics = TraceMagics(shell)
    shell.register_magics(magics)
    matcher = _matcher(shell)
    shell.Completer.custom_matchers.append(matcher)
    shell._nnsight_jupyter = (magics, matcher)
    from . import sidebar

    sidebar.register(shell)


def unload_ipython_extension(shell: Any) -> None:
    state = getattr(shell, "_nnsight_jupyter", None)
    if state is None:
        return
    magics, matcher = state
    from . import sidebar

    sidebar.unregister(shell)
    if matcher in shell.Completer.custom_matchers:
        shell.Completer.custom_matchers.remove(matcher)
    shell.magics_manager.magics["cell"].pop("trace", None)
    shell.magics_manager.magics["line"].pop("nnsight", None)
    del shell._nnsight_jupyter
