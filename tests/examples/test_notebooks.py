"""Run every committed example notebook from scratch and check a few facts in its outputs.

Each notebook in examples/ is read, stripped of its outputs and executed top to bottom in a fresh
`python3` kernel (working directory examples/) with nbclient; any cell error fails the test.
Regenerate the committed notebooks with `python examples/build.py`.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbclient
import nbformat
import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("[0-9][0-9]_*.ipynb"))

pytestmark = pytest.mark.slow


def _run(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", allow_errors=False,
        resources={"metadata": {"path": str(EXAMPLES)}},
    )
    client.execute()
    texts = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for out in cell.outputs:
            assert out.output_type != "error", f"{path.name}: {out.ename}: {out.evalue}"
            if out.output_type == "stream" and out.name == "stdout":
                texts.append(out.text)
            elif "data" in out:
                texts.append(out.data.get("text/plain", ""))
    return "".join(texts)


def _float(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in the output:\n{text}"
    return float(match.group(1))


def check_01_quickstart(out: str) -> None:
    assert re.search(r"' Paris'\s+0\.[5-9]", out), out          # top-1 with most of the mass
    assert "same logits as the with-block: True" in out
    assert "top token: ' Paris'" in out
    assert out.startswith("model: LlamaForCausalLM") and "layers.0–29: 30 × LlamaDecoderLayer" in out  # show(model)
    assert "hidden: Tensor[1, 5, 576] torch.float32 cpu" in out      # show(hidden)
    assert "logits_magic: [49152] float32" in out                    # the --show table


def check_02_activations(out: str) -> None:
    assert "norm: Tensor[30] torch.float32 cpu" in out              # one norm per layer, as a view
    assert "same norms: True" in out
    assert "weights: (1, 9, 5, 5)" in out                           # [batch, heads, query, key]
    assert "weights: Tensor[1, 9, 5, 5] torch.float32 cpu" in out   # show(weights)
    assert re.search(r"' Paris'\s+0\.[5-9]", out)


def check_03_patching(out: str) -> None:
    corrupted = _float(r"P\(' Paris'\) corrupted: ([0-9.]+)", out)
    clean = _float(r"P\(' Paris'\) clean:\s+([0-9.]+)", out)
    patched = _float(r"last position: ([0-9.]+)", out)
    assert clean > 0.1 > corrupted
    assert patched > 100 * corrupted                                # patching restores Paris
    assert "resid patched over layer (10) x position (6)" in out    # the sweep
    assert "60/60 cells computed" in out
    assert abs(_float(r"patched at layer 24, last position: ([0-9.]+)", out) - patched) < 1e-3


def check_04_cross_prompt(out: str) -> None:
    assert "target: ' Tokyo'" in out
    assert re.search(r"residual: ' Paris'", out)                    # injection turns Japan into France
    assert "same as the single-pass injection: True" in out


def check_05_gradients(out: str) -> None:
    assert "grad shape: (1, 5, 576)" in out
    assert "grad norm: Tensor[30] torch.float32 cpu" in out
    assert "same gradient: True" in out


def check_06_generation(out: str) -> None:
    plain = re.search(r"plain:\s+'(.*)'", out)
    positive = re.search(r"positive:\s+'(.*)'", out)
    negative = re.search(r"negative:\s+'(.*)'", out)
    assert plain and positive and negative, out
    assert positive.group(1) != plain.group(1) or negative.group(1) != plain.group(1)
    magic = re.search(r"magic:\s+'(.*)'", out)
    assert magic and magic.group(1) == positive.group(1)            # %%trace generation matches


def check_07_remote(out: str) -> None:
    assert "remote top token: ' Paris'" in out
    assert "hidden equal: True" in out
    assert "logits equal: True" in out
    assert "magic logits equal to local: True" in out
    assert "daemon stopped: True" in out


def check_08_logit_lens_attention(out: str) -> None:
    assert "LogitLensResult: 30 layers x 9 positions, top 5" in out
    assert _float(r"first at the last position from layer (\d+)", out) >= 20     # a late-layer answer
    eiffel = _float(r"last layer: Eiffel ([0-9.]+)", out)
    colosseum = _float(r"Colosseum ([0-9.]+)", out)
    assert eiffel > 0.3 > colosseum
    assert "patterns: (30, 9, 14, 14)" in out                       # [layer, head, query, key]
    assert _float(r"strongest previous-token head: layer \d+ head \d+ \(([0-9.]+)\)", out) > 0.5
    assert "AttentionPatterns: 30 layers x 9 heads" in out          # show(att)'s text


CHECKS = {name[len("check_"):]: fn for name, fn in globals().items() if name.startswith("check_")}


def test_every_notebook_has_a_check():
    assert NOTEBOOKS, "no notebooks in examples/: run python examples/build.py"
    assert sorted(p.stem for p in NOTEBOOKS) == sorted(CHECKS)


@pytest.fixture
def stop_daemon_after():
    yield
    from nnsight_jupyter.remote.daemon import stop_daemon

    stop_daemon()   # in case the remote notebook failed before its own last cell


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path, stop_daemon_after) -> None:
    out = _run(path)
    CHECKS[path.stem](out)
