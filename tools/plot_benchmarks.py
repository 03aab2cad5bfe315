"""Plot the GPU benchmark results behind BENCHMARKS.md: time and peak memory per worker against image size.

python tools/plot_benchmarks.py [--results 'bench/results/<date>_<card>_<run>_final.jsonl'] [--out docs/benchmarks.png]

Reads JSON lines with keys impl, op, mode, workers, size, dtype, ms, peak_gib, max_rel_err (one case each) and
draws one column per op (decode, encode): median time on top, peak GPU memory per worker below, one line per
(impl, mode, workers, dtype), log scales. The legend carries the largest max_rel_err of each line, so an
approximate (tiled) line is told apart from an exact one at a glance. Needs matplotlib.
"""

from __future__ import annotations

import argparse
import glob
import json
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEYS = ("impl", "op", "mode", "workers", "size", "dtype", "ms", "peak_gib")  # max_rel_err: absent without a reference


def read_results(pattern: str) -> list[dict]:
    """Every case in the files matching `pattern`; a line without one of KEYS raises naming file and line."""
    rows = []
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise SystemExit(f"no results match {pattern!r}; run bench/bench_vae.py --json first")
    for path in paths:
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = [k for k in KEYS if k not in row]
            if missing:
                raise ValueError(f"{path}:{number}: missing {missing}; each line needs {list(KEYS)}")
            rows.append(row)
    return rows


def series(rows: list[dict], op: str) -> dict[tuple, list[dict]]:
    """Rows of one op grouped into lines by (impl, mode, workers, dtype), each sorted by size."""
    lines = defaultdict(list)
    for row in rows:
        if row["op"] == op:
            lines[(row["impl"], row["mode"], row["workers"], row["dtype"])].append(row)
    return {key: sorted(points, key=lambda r: r["size"]) for key, points in sorted(lines.items(), key=str)}


def label(key: tuple, points: list[dict]) -> str:
    impl, mode, workers, dtype = key
    errs = [p["max_rel_err"] for p in points if p.get("max_rel_err") is not None]  # None: no fp32 reference fits
    err = f" (rel err ≤ {max(errs):.1e})" if errs else ""
    return f"{impl} {mode} ×{workers} {dtype}{err}"


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    ops = sorted({row["op"] for row in rows})
    sizes_px = sorted({row["size"] for row in rows})
    fig, axes = plt.subplots(2, len(ops), figsize=(7 * len(ops), 9), squeeze=False)
    for col, op in enumerate(ops):
        for key, points in series(rows, op).items():
            sizes = [p["size"] for p in points]
            style = {"marker": "o", "linestyle": "--" if key[1] == "tiled" else "-", "label": label(key, points)}
            axes[0, col].plot(sizes, [p["ms"] for p in points], **style)
            axes[1, col].plot(sizes, [p["peak_gib"] for p in points], **style)
        for row, metric in enumerate(("median time (ms)", "peak GPU memory per worker (GiB)")):
            ax = axes[row, col]
            ax.set_xscale("log", base=2)
            ax.set_xticks(sizes_px)
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.set_yscale("log")
            ax.set_xlabel("image side (px)")
            ax.set_ylabel(metric)
            ax.set_title(f"VAE {op}: {metric.split(' (')[0]}")
            ax.grid(True, which="both", alpha=0.3)
        axes[0, col].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # One table's run per *_final.jsonl, named by date first; the newest is plotted (runs on other cards would mix)
    finals = sorted(glob.glob(str(REPO / "bench" / "results" / "*_final.jsonl")))
    parser.add_argument("--results", default=finals[-1] if finals else "", help="glob of JSONL files")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.png")
    args = parser.parse_args(argv)
    rows = read_results(args.results)
    plot(rows, args.out)
    print(f"wrote {args.out} from {len(rows)} cases")


if __name__ == "__main__":
    main()
