"""`kwollect plot`: the selected series drawn to PNG or SVG with matplotlib.

One panel per metric, one line per device (and labels where they tell series apart), or
the devices stacked (`--stacked`, e.g. a job's total power). matplotlib is an optional
extra (`pip install 'kwollect-pg[client]'`); the Agg backend needs no display.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from kwollect.client.api import ApiCallError
from kwollect.client.get import (
    add_connection_options,
    add_selection_options,
    client_from,
    selection,
)

Series = dict[str, dict[str, tuple[list[datetime], list[float]]]]


def series_name(row: dict[str, Any]) -> str:
    labels = {k: v for k, v in (row.get("labels") or {}).items()
              if k not in ("_metric_scrape_time", "_device_orig")}
    if not labels:
        return str(row["device_id"])
    return f"{row['device_id']} " + ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def group(rows: Iterable[dict[str, Any]]) -> Series:
    """metric -> series name -> (times, values), in the API's (time) order."""
    out: Series = {}
    for row in rows:
        times, values = out.setdefault(row["metric_id"], {}).setdefault(series_name(row),
                                                                          ([], []))
        times.append(row["timestamp"])
        values.append(float("nan") if row["value"] is None else float(row["value"]))
    return out


def draw(data: Series, path: Path, title: str, stacked: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.fonttype"] = "none"  # SVG text stays text (searchable)
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    metrics = sorted(data)
    fig, axes = plt.subplots(len(metrics), 1, figsize=(11, 3.2 * len(metrics)), sharex=True,
                             squeeze=False)
    for ax, metric in zip(axes[:, 0], metrics, strict=True):
        names = sorted(data[metric])
        if stacked:
            base = data[metric][names[0]][0]
            ax.stackplot(base, *[_aligned(data[metric][n], base) for n in names], labels=names)
        else:
            for name in names:
                times, values = data[metric][name]
                ax.plot(times, values, label=name, linewidth=1)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize="small", ncol=max(1, len(names) // 8))
    axes[-1, 0].xaxis.set_major_formatter(mdates.ConciseDateFormatter(
        axes[-1, 0].xaxis.get_major_locator()))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _aligned(points: tuple[list[datetime], list[float]], base: list[datetime]) -> list[float]:
    """A series' values at the base series' times (the previous value; 0 before the first)."""
    times, values = points
    out, j, last = [], 0, 0.0
    for t in base:
        while j < len(times) and times[j] <= t:
            last = values[j]
            j += 1
        out.append(last)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kwollect plot", description="Draw metrics from the kwollect API to PNG or SVG. "
        "Example: kwollect plot --job 1234 --metrics bmc_node_power_watt -o job.png")
    add_connection_options(parser)
    add_selection_options(parser)
    parser.add_argument("--stacked", action="store_true",
                        help="stack the devices' series (e.g. a job's total power)")
    parser.add_argument("-o", "--output", type=Path, required=True,
                        help="the picture to write: .png or .svg")
    args = parser.parse_args(argv)
    if args.output.suffix.lower() not in (".png", ".svg"):
        parser.error("--output must end in .png or .svg")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("kwollect plot: needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 1
    params = selection(args)
    try:
        data = group(client_from(args).get_metrics(**params))  # type: ignore[arg-type]
    except ApiCallError as exc:
        print(f"kwollect plot: {exc}", file=sys.stderr)
        return 1
    if not data:
        print("kwollect plot: no rows for this selection", file=sys.stderr)
        return 1
    title = f"job {args.job}" if args.job is not None else args.devices
    draw(data, args.output, title, stacked=args.stacked)
    return 0
