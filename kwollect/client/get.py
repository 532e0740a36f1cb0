"""`kwollect get`: a job's (or devices') metrics from the API to a file, as CSV, NDJSON or JSON.

The API's bytes are copied as they arrive (no parsing, flat memory): a 10-million-row
export costs what the network and the server cost. Rows are counted by their line breaks
(CSV, NDJSON) or by their leading `{"timestamp"` (JSON) for the progress line, which is
written to stderr twice a second while stderr is a terminal, and never otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from kwollect.client.api import ApiCallError, Client

CHUNK = 1 << 16
ROW_MARK = {"csv": b"\n", "ndjson": b"\n", "json": b'{"timestamp"'}


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("KWOLLECT_URL", "http://localhost:3000"),
                        help="the API's base URL (default: $KWOLLECT_URL, else "
                             "http://localhost:3000)")
    parser.add_argument("--token-file", type=Path,
                        help="a file holding a JWT for the API (default: $KWOLLECT_TOKEN_FILE; "
                             "reading needs none on a default setup)")


def add_selection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--job", type=int, help="a scheduler job id: its nodes and its window")
    parser.add_argument("--devices", help="comma-separated device ids (node-1,node-2)")
    parser.add_argument("--metrics", help="comma-separated metric ids (default: all)")
    parser.add_argument("--start", help="start time: ISO 8601 (UTC if no offset) or epoch s")
    parser.add_argument("--end", help="end time, same forms (default: now, or the job's end)")
    parser.add_argument("--summary", nargs="?", const="5min", choices=["5min", "1h"],
                        help="summaries instead of raw samples: 5-minute (the default) or "
                             "1-hour (1h, for ranges of months)")
    parser.add_argument("--as-rate", choices=["auto", "true"],
                        help="per-second rates: of *_total counters (auto) or of every metric")


def client_from(args: argparse.Namespace) -> Client:
    token_file = args.token_file or os.environ.get("KWOLLECT_TOKEN_FILE")
    token = Path(token_file).read_text().strip() if token_file else None
    return Client(args.url, token)


def selection(args: argparse.Namespace) -> dict[str, object]:
    if args.job is None and not args.devices:
        raise SystemExit("kwollect: give --job or --devices")
    return {"job_id": args.job, "devices": args.devices, "metrics": args.metrics,
            "start_time": args.start, "end_time": args.end,
            "summary": args.summary or None, "as_rate": args.as_rate}


class Progress:
    """Rows and rows/s on one stderr line, refreshed twice a second; silent off a terminal."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.enabled = stream.isatty()
        self.started = self.shown = time.monotonic()

    def update(self, rows: int, final: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not final and now - self.shown < 0.5):
            return
        self.shown = now
        rate = rows / max(now - self.started, 1e-9)
        end = "\n" if final else ""
        self.stream.write(f"\r{rows:,} rows, {rate:,.0f} rows/s{end}")
        self.stream.flush()


def export(client: Client, params: dict[str, object], fmt: str, out: IO[bytes],
           progress: Progress) -> int:
    """Copy the API's answer to `out`; the number of rows written."""
    mark = ROW_MARK[fmt]
    header = 1 if fmt == "csv" else 0
    keep = len(mark) - 1   # a mark may straddle two chunks: its start is kept for the next
    marks = 0
    with client.open("get_metrics", params, fmt) as response:
        tail = b""
        while chunk := response.read(CHUNK):
            out.write(chunk)
            window = tail + chunk
            marks += window.count(mark)
            tail = window[len(window) - keep:] if keep else b""
            progress.update(max(marks - header, 0))
    rows = max(marks - header, 0)
    progress.update(rows, final=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kwollect get", description="Write metrics from the kwollect API to a file or "
        "stdout, streamed. Examples: kwollect get --job 1234 -o job.csv; "
        "kwollect get --devices node-1 --metrics bmc_node_power_watt --start 2026-12-01T10:00")
    add_connection_options(parser)
    add_selection_options(parser)
    parser.add_argument("--format", choices=["csv", "ndjson", "json"], default="csv",
                        help="output format (default: csv)")
    parser.add_argument("-o", "--output", type=Path,
                        help="output file (default: stdout); written whole or not at all")
    args = parser.parse_args(argv)
    params = selection(args)
    client = client_from(args)
    progress = Progress(sys.stderr)
    try:
        if args.output is None:
            rows = export(client, params, args.format, sys.stdout.buffer, progress)
        else:
            partial = args.output.with_name(args.output.name + ".part")
            try:
                with open(partial, "wb") as out:
                    rows = export(client, params, args.format, out, progress)
                partial.replace(args.output)
            finally:
                partial.unlink(missing_ok=True)
    except ApiCallError as exc:
        print(f"kwollect get: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"kwollect get: {exc}", file=sys.stderr)
        return 1
    if rows == 0:
        explain_empty(client, params)
    return 0


def explain_empty(client: Client, params: dict[str, object]) -> None:
    """An empty answer: say which named ids were never stored, if any (typos)."""
    unknown = client.unknown_ids(params.get("devices"), params.get("metrics"))  # type: ignore[arg-type]
    if unknown:
        names = ", ".join(f"{kind} {ident}" for kind, ident in unknown)
        print(f"kwollect get: no rows; never stored: {names}", file=sys.stderr)
    else:
        print("kwollect get: no rows for this selection (window, job or summary lag)",
              file=sys.stderr)
