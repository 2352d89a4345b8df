"""Reading what a view drew: its numbers, labels, hover read-out and canvas pixels."""

from __future__ import annotations

import re
from typing import Any

NUMBER = r"(-?(?:\d+\.?\d*(?:e[+-]?\d+)?|inf|NaN))"


def parse(text: str) -> float:
    return float(text.replace("inf", "Infinity").replace("NaN", "nan").replace("Infinity", "inf"))


def close(shown: str, expected: float, digits: int) -> bool:
    """Whether a number printed with `digits` significant digits is `expected`."""
    import math

    value = parse(shown)
    if math.isnan(expected):
        return math.isnan(value)
    if math.isinf(expected):
        return value == expected
    return abs(value - expected) <= 0.6 * 10 ** (math.floor(math.log10(abs(expected) or 1e-30)) - digits + 1) + 1e-12


def stats(view: Any) -> dict[str, str]:
    return {key: view.locator(f'[data-stat="{key}"]').inner_text() for key in ("min", "max", "mean", "std", "nan", "inf")}


def geometry(heatmap: Any) -> dict[str, float]:
    return heatmap.evaluate("""(root) => {
        const scroll = root.querySelector('.nnsj-hm-scroll');
        const box = scroll.getBoundingClientRect();
        const d = root.dataset;
        return {x: box.x, y: box.y, left: scroll.scrollLeft, top: scroll.scrollTop,
                cw: +d.cellWidth, ch: +d.cellHeight, lw: +d.labelWidth, hh: +d.headerHeight,
                rows: +d.rows, cols: +d.cols};
    }""")


def cell_centre(heatmap: Any, row: int, col: int) -> tuple[float, float]:
    g = geometry(heatmap)
    return (g["x"] + g["lw"] + (col + 0.5) * g["cw"] - g["left"], g["y"] + g["hh"] + (row + 0.5) * g["ch"] - g["top"])


def hover(page: Any, heatmap: Any, row: int, col: int) -> str:
    """Move the mouse over a cell; returns the tooltip text once it names that cell."""
    heatmap.scroll_into_view_if_needed()
    heatmap.evaluate("""async (root, [row, col]) => {
        const scroll = root.querySelector('.nnsj-hm-scroll');
        const d = root.dataset;
        const x = col * +d.cellWidth, y = row * +d.cellHeight;
        const w = scroll.clientWidth - +d.labelWidth, h = scroll.clientHeight - +d.headerHeight;
        if (x < scroll.scrollLeft || x + +d.cellWidth > scroll.scrollLeft + w) scroll.scrollLeft = x - w / 2;
        if (y < scroll.scrollTop || y + +d.cellHeight > scroll.scrollTop + h) scroll.scrollTop = y - h / 2;
        await new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)));
    }""", [row, col])
    x, y = cell_centre(heatmap, row, col)
    page.mouse.move(x, y)
    page.wait_for_function("([root, r, c]) => root.dataset.hoverRow === String(r) && root.dataset.hoverCol === String(c)",
                           arg=[heatmap.element_handle(), row, col])
    return heatmap.locator(".nnsj-hm-tooltip").inner_text()


def hovered_value(text: str) -> float:
    match = re.search(r"\] = " + NUMBER, text)
    assert match, f"no value in the tooltip {text!r}"
    return parse(match.group(1))


def pixel(heatmap: Any, row: int, col: int) -> tuple[int, int, int]:
    """The canvas colour at the centre of a cell (device pixels of the drawn canvas)."""
    heatmap.scroll_into_view_if_needed()
    heatmap.evaluate("() => new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))")
    return tuple(heatmap.evaluate("""(root, [row, col]) => {
        const canvas = root.querySelector('.nnsj-hm-canvas');
        const scroll = root.querySelector('.nnsj-hm-scroll');
        const d = root.dataset;
        const ratio = canvas.width / canvas.getBoundingClientRect().width;
        const x = ((col + 0.5) * +d.cellWidth - scroll.scrollLeft) * ratio;
        const y = ((row + 0.5) * +d.cellHeight - scroll.scrollTop) * ratio;
        return Array.from(canvas.getContext('2d').getImageData(Math.floor(x), Math.floor(y), 1, 1).data.slice(0, 3));
    }""", [row, col]))


def wait_drawn(page: Any, view: Any, index: list[int], axes: tuple[int, int] | None = None) -> None:
    """Wait until the view has drawn the slice at `index` (with `axes` as rows and columns, when given)
    with every visible tile present; a change that keeps the index, like swapping axes, needs `axes`."""
    import json

    want_axes = None if axes is None else f"{axes[0]},{axes[1]}"
    try:
        page.wait_for_function(
            "([root, index, axes]) => root.dataset.index === index && (axes === null || root.dataset.axes === axes)",
            arg=[view.element_handle(), json.dumps(index, separators=(",", ":")), want_axes], timeout=30_000)
    except Exception as error:
        status = view.locator(".nnsj-status").inner_text()
        raise AssertionError(f"the view did not draw slice {index}: it shows {view.get_attribute('data-index')!r}, "
                             f"status {status!r}") from error


def luminance(css_colour: str) -> float:
    """Mean of the R, G, B of a computed CSS colour like 'rgb(17, 17, 17)'."""
    parts = css_colour[css_colour.index("(") + 1:css_colour.index(")")].split(",")[:3]
    return sum(float(p) for p in parts) / 3


def colours(locator: Any) -> tuple[float, float]:
    """(background, text) luminance of an element as drawn."""
    return tuple(luminance(c) for c in locator.evaluate(
        "(el) => [getComputedStyle(el).backgroundColor, getComputedStyle(el).color]"))
