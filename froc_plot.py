"""The FROC plot (froc.png of stages 5 and 6): sensitivity against false positives per scan on a log2 axis.

    froc_plot.write_froc(path, [(curve, "all: CPM 0.61", {"lw": 2.2, "color": "black"}, True), ...], rates, title)

A curve is metrics.froc's dict (``fps``, ``sens``, ``sensitivities`` at ``rates``, ``cpm``).
"""
import numpy as np

import runfiles


def froc_xy(curve, rates):
    """A FROC curve's points as drawn (x, y): extended flat beyond its end to the last rate, and the x below the
    first rate drawn at half of it (the log axis), as the sensitivities are interpolated."""
    x = np.concatenate([curve["fps"], [max(rates[-1], curve["fps"][-1])]])
    y = np.concatenate([curve["sens"], [curve["sens"][-1]]])
    return np.maximum(x, rates[0] / 2), y


def drawable(curve):
    """Whether a curve has points to draw (a part without nodules has none)."""
    return len(curve["sens"]) > 0 and bool(np.isfinite(curve["sens"]).all())


def write_froc(path, lines, rates, title, title_size=10, figsize=(6.5, 4.5), **legend):
    """Draw ``lines`` into one FROC plot and write it as a PNG at ``path`` (atomically).

    ``lines``: (curve, label, matplotlib style dict, mark) tuples; ``mark`` draws the sensitivities read at
    ``rates`` as dots. Curves with nothing to draw are skipped. ``legend``: keyword arguments of ax.legend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rates = np.asarray(rates, np.float64)
    fig, ax = plt.subplots(figsize=figsize)
    for curve, label, style, mark in lines:
        if not drawable(curve):
            continue
        ax.plot(*froc_xy(curve, rates), label=label, **style)
        if mark:
            ax.plot(rates, curve["sensitivities"], "o", color=style.get("color", "black"))
    ax.set_xscale("log", base=2)
    ax.set_xlim(rates[0] / 2, rates[-1] * 2)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positives per scan")
    ax.set_ylabel("sensitivity")
    ax.set_title(title, fontsize=title_size)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(**legend)
    with runfiles.atomic(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path
