"""Reports of dynamixer-bench: the table (rich or plain), the speedup plot, JSON-safe values, and the cell
formats that ``benchmarks/make_results.py`` uses for RESULTS.md too."""
from __future__ import annotations

import math
import sys


def fmt_number(v, spec, empty="-"):
    """A table cell: ``v`` in ``format`` spec ``spec``, or ``empty`` where there is no figure."""
    return empty if v is None else format(v, spec)


def fmt_speedup(v):
    """A speedup cell: ``1.23x``, or ``-``."""
    return "-" if v is None else f"{v:.2f}x"


def fmt_spread(r):
    """A row's spread: half its p20-p80 range in % of its median, or ``-`` for an untimed row."""
    if r.get("median_ms") is None:
        return "-"
    return f"±{50 * (r['p80_ms'] - r['p20_ms']) / r['median_ms']:.1f}%"


def table_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    _, numbers = _notes(report)
    if report["mode"] == "model":
        head = ["model", "mode", "backend", "images/s", "median ms", "spread", "vs eager", "vs best rival",
                "GFLOP/s", "% GEMM", "max rel err", "status"]
        rows = []
        for r in report["results"]:
            rows.append([r["model"], r["mode"], r["backend"], fmt_number(r.get("images_per_s"), ".1f"),
                         fmt_number(r.get("median_ms"), ".2f"), fmt_spread(r), fmt_speedup(r.get("speedup_vs_eager")),
                         fmt_speedup(r.get("speedup_vs_best_rival")), fmt_number(r.get("GFLOPs"), ".1f"),
                         fmt_number(r.get("gemm_peak_pct"), ".1f"), fmt_number(r.get("error"), ".1e"),
                         _status(r, numbers)])
        return head, rows
    head = ["shape", "N", "dir", "backend", "median ms", "spread", "vs eager", "vs compile", "GB/s", "GFLOP/s",
            "% roof", "saved MiB", "max rel err", "status"]
    rows = []
    for r in report["results"]:
        shape = r["shape"] if r["shape"] != "custom" else f"{r['L']},{r['C']},{r['S']},{r['d']}"
        rows.append([shape, str(r["sequences"]), r["direction"], r["backend"],
                     fmt_number(r.get("median_ms"), ".3f"), fmt_spread(r), fmt_speedup(r.get("speedup_vs_eager")),
                     fmt_speedup(r.get("speedup_vs_compile")), fmt_number(r.get("GBps"), ".1f"),
                     fmt_number(r.get("GFLOPs"), ".1f"), fmt_number(r.get("roofline_pct"), ".1f"),
                     fmt_number(r.get("saved_MiB"), ".2f"), fmt_number(r.get("error"), ".1e"), _status(r, numbers)])
    return head, rows


def _notes(report: dict) -> tuple[dict[int, str], dict[str, int]]:
    """Distinct messages, numbered: the table shows "ERROR [1]" and the text follows it."""
    numbers: dict[str, int] = {}
    for r in report["results"]:
        if r.get("message"):
            numbers.setdefault(f"{r['backend']}: {r['message']}", len(numbers) + 1)
    return {n: text for text, n in numbers.items()}, numbers


def _status(r, numbers=None):
    if not r.get("message") or numbers is None:
        return r["status"]
    return f"{r['status']} [{numbers[r['backend'] + ': ' + r['message']]}]"


def model_notes(report: dict) -> list[str]:
    """The lines under a --model table: the work convention and the best rival per mode."""
    work = report.get("work")
    if report["mode"] != "model" or not work:
        return []
    flops = work["flops_per_image"]
    lines = [f"work: {flops['inference'] / 1e9:.2f} GFLOP per image (inference), {flops['train_step'] / 1e9:.2f} "
             f"(training step), counted on the upstream network by torch.utils.flop_counter"]
    for mode, g in (work.get("gemm_peak") or {}).items():
        lines.append(f"% GEMM ({mode}): of {g['GFLOPs']:.0f} GFLOP/s, the best {g['dtype']} GEMM timed in the same "
                     f"rounds ({g['gemm']})")
    return lines + list(report.get("summary") or [])


def print_table(report: dict, stream=None, plain: bool = False):
    stream = stream or sys.stdout
    head, rows = table_rows(report)
    notes, _ = _notes(report)
    notes = dict(notes, **{f"*{i}": line for i, line in enumerate(model_notes(report))})
    title = report.get("title", "")
    if not plain:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            plain = True
    if not plain:
        table = Table(title=title)
        for i, h in enumerate(head):
            table.add_column(h, justify="left" if i in (0, 2, 3) or h == "status" else "right", no_wrap=True)
        for row in rows:
            style = None if row[-1] == "ok" else ("red" if row[-1].startswith(("WRONG", "ERROR")) else "dim")
            table.add_row(*row, style=style)
        console = Console(file=stream, width=None if stream.isatty() else 200)
        console.print(table)
        for n, text in notes.items():
            console.print(text if str(n).startswith("*") else f"[{n}] {text}", markup=False, soft_wrap=True)
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    if title:
        print(title, file=stream)
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)), file=stream)
    print("  ".join("-" * w for w in widths), file=stream)
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip(), file=stream)
    for n, text in notes.items():
        print(text if str(n).startswith("*") else f"[{n}] {text}", file=stream)


def case_label(r: dict) -> str:
    if "model" in r:
        return r["model"]
    shape = r["shape"] if r["shape"] != "custom" else f"{r['L']},{r['C']},{r['S']},{r['d']}"
    return f"{shape}\nN={r['sequences']}"


def plot(report: dict, path: str):
    """Grouped bars of speedup over eager (log scale, bars grow from 1x), one panel per direction / mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    field = "mode" if report["mode"] == "model" else "direction"
    rows = [r for r in report["results"] if r["backend"] != "eager"]
    panels = list(dict.fromkeys(r[field] for r in report["results"])) or ["none"]
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    timed = [r["speedup_vs_eager"] for r in rows if r.get("speedup_vs_eager") is not None]
    lo, hi = min(timed + [1.0]) / 1.5, max(timed + [1.0]) * 1.5
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.0, 4.8 * len(panels)), 4.8), squeeze=False,
                             sharey=True)
    for ax, panel in zip(axes[0], panels):
        sub = [r for r in rows if r[field] == panel]
        labels = list(dict.fromkeys(case_label(r) for r in sub))
        width = 0.8 / max(1, len(backends))
        for bi, b in enumerate(backends):
            for li, lab in enumerate(labels):
                match = [r for r in sub if r["backend"] == b and case_label(r) == lab]
                if not match:
                    continue
                r, x = match[0], li + (bi - (len(backends) - 1) / 2) * width
                y = r.get("speedup_vs_eager")
                if y is None:     # not timed: say why where the bar would be
                    ax.text(x, 1.0, f"{b} {r['status']}", rotation=90, ha="center", va="bottom", fontsize=7,
                            color="red" if r["status"] in ("WRONG", "ERROR") else "gray")
                    continue
                ax.bar(x, y - 1.0, width, bottom=1.0, color=f"C{bi}")
                ax.annotate(f"{y:.2f}x", (x, y), ha="center", va="bottom" if y >= 1 else "top", fontsize=7,
                            xytext=(0, 2 if y >= 1 else -2), textcoords="offset points")
        ax.axhline(1.0, color="black", linewidth=1)
        ax.set_yscale("log")
        ax.set_ylim(lo, hi)
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(0.1, 0.2, 0.25, 0.5, 0.75, 1.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_xlim(-0.6, len(labels) - 0.4)
        ax.set_title(panel)
        ax.grid(axis="y", which="major", alpha=0.3)
    axes[0][0].set_ylabel("speedup over eager (log scale; 1x = eager)")
    handles = [Patch(color=f"C{i}", label=b) for i, b in enumerate(backends)]
    axes[0][-1].legend(handles=handles, fontsize=8, loc="best")
    fig.suptitle(report.get("title", ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
