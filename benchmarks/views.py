"""What showing a large tensor costs in the kernel, against a copy of the same tensor in the same run.

    python benchmarks/views.py

For a 1 GiB float32 tensor [64, 2048, 2048] (and a 1 GiB bfloat16 one) it times building the
TensorView: the summary (min, max, mean, std, NaN/inf counts), the histogram, the percentiles,
the first tile and the widget state, i.e. everything `show(x)` does before the notebook gets its
first message. The baseline is one `clone()` of the same tensor, which is what a view that copies
the tensor (or sends it whole) would pay at the very least. Also measured: the first message's
size (state JSON + binary buffers), how much resident memory the build adds, and the kernel's side
of a slider move (one tile request answered). Each time is the best of several runs.

Targets (PASS/FAIL; exit status 1 if any fails):
1. float32 1 GiB: building the view costs at most one copy of the tensor (ratio <= 1.0).
2. The first message is at most 256 KiB, whatever the tensor's size.
3. Building the view adds at most 64 MiB of resident memory (it never copies the tensor).
The absolute times are printed next to them (the issue's figure: under a second on this machine).
"""

from __future__ import annotations

import gc
import json
import sys
import time

import torch
from ipywidgets.widgets.widget import _remove_buffers

from nnsight_jupyter.widgets import TensorView

RUNS = 5


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def best(fn, runs: int = RUNS) -> float:
    times = []
    for _ in range(runs):
        gc.collect()
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        del out
    return min(times)


def message_bytes(view: TensorView) -> int:
    state, _, buffers = _remove_buffers(view.get_state())
    return len(json.dumps(state)) + sum(memoryview(b).nbytes for b in buffers)


def measure(name: str, tensor: torch.Tensor) -> dict:
    before = rss()
    view = TensorView(tensor, name=name)
    grown = rss() - before
    del view
    build = best(lambda: TensorView(tensor, name=name))
    copy = best(lambda: tensor.clone(), runs=3)
    view = TensorView(tensor, name=name)
    request = {"kind": "tiles", "index": [33, 0, 0], "rows_axis": 1, "cols_axis": 2, "tiles": [[0, 0], [1, 0]]}
    tile = best(lambda: view._data.handle(request), runs=20)
    return {"case": name, "build_s": build, "clone_s": copy, "ratio": build / copy,
            "first_message_bytes": message_bytes(view), "rss_grown_bytes": grown, "tile_request_ms": tile * 1e3}


def main() -> int:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    base = torch.randn(2048, 2048)
    f32 = (base.expand(64, -1, -1) + torch.arange(64.0).view(64, 1, 1)).contiguous()
    results = [measure("float32 [64, 2048, 2048]", f32)]
    del f32
    gc.collect()
    bf16 = (base.expand(128, -1, -1) + torch.arange(128.0).view(128, 1, 1)).to(torch.bfloat16)
    results.append(measure("bfloat16 [128, 2048, 2048]", bf16))
    del bf16
    print(f"{'case':28s} {'view s':>8s} {'clone s':>8s} {'ratio':>6s} {'1st msg KiB':>12s} {'RSS +MiB':>9s} {'tile ms':>8s}")
    for r in results:
        print(f"{r['case']:28s} {r['build_s']:8.3f} {r['clone_s']:8.3f} {r['ratio']:6.2f} "
              f"{r['first_message_bytes'] / 1024:12.1f} {r['rss_grown_bytes'] / 2**20:9.1f} {r['tile_request_ms']:8.2f}")
    f32r = results[0]
    checks = [
        (f32r["ratio"] <= 1.0, f"1 building the float32 view <= one copy of it: {f32r['ratio']:.2f}x "
                               f"({f32r['build_s']:.3f} s vs {f32r['clone_s']:.3f} s)"),
        (all(r["first_message_bytes"] <= 256 * 1024 for r in results),
         "2 first message <= 256 KiB: " + ", ".join(f"{r['first_message_bytes'] / 1024:.0f} KiB" for r in results)),
        (all(r["rss_grown_bytes"] <= 64 * 2**20 for r in results),
         "3 resident memory added <= 64 MiB: " + ", ".join(f"{r['rss_grown_bytes'] / 2**20:.0f} MiB" for r in results)),
    ]
    for ok, text in checks:
        print(("PASS  " if ok else "FAIL  ") + text)
    return 0 if all(ok for ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
