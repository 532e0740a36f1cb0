"""Stand-in for OmegaWatt's `wattmetre-read`: prints v2 or v3 frame lines with known values.

Run as ``python -m kwollect.dev.simulators.wattmetre [options]`` (tests/wattmetre_gen.py is the
same program, run as a script by the tests).

Frame i (0-based) belongs to second k = i // rate, position j = i % rate in that second, and
port p reads ``100 + p + 0.5 * j + 0.25 * (k % 4)`` W: every value is exact in binary, so the
1 Hz mean of a full second at rate R is ``100 + p + 0.25 * (R - 1) + 0.25 * (k % 4)``.

Without --realtime, frame i is stamped ``start + i / rate + 3000999 ns`` (written as
``<seconds>.<9 digits>``; the odd nanoseconds catch float rounding) and lines are written as
fast as possible.  With --realtime, lines are paced at the rate and stamped with the clock.

Fault injection, for tests of the reader:
  --bad-every K     after every K-th frame, an extra malformed line (cycling: cut short,
                    bad number, bad timestamp);
  --not-ok-every K  every K-th frame is flagged not OK (v2 status ``KO``, v3 ``false``);
  --missing-every K every K-th frame has no value for one port (v2 ``""``/``nan``
                    alternately, v3 ``nan``); the port is ``(i // K) % ports``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from decimal import Decimal

DEFAULT_START = "1700000000"
OFFSET_NS = 3_000_999


def power(port: int, frame: int, rate: int) -> float:
    second, position = divmod(frame, rate)
    return 100 + port + 0.5 * position + 0.25 * (second % 4)


def format_ns(ns: int) -> str:
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"


def frame_line(args: argparse.Namespace, frame: int, timestamp_ns: int) -> str:
    ok = not (args.not_ok_every and frame % args.not_ok_every == args.not_ok_every - 1)
    missing_port = -1
    missing_text = "nan"
    if args.missing_every and frame % args.missing_every == args.missing_every - 1:
        occurrence = frame // args.missing_every
        missing_port = occurrence % args.ports
        if args.version == 2 and occurrence % 2 == 0:
            missing_text = ""
    texts = [missing_text if port == missing_port else f"{power(port, frame, args.rate):.2f}"
             for port in range(args.ports)]
    stamp = format_ns(timestamp_ns)
    if args.version == 2:
        return ",".join([str(frame), f"0x{frame * 7919 % 65536:04x}", stamp,
                         "OK" if ok else "KO", *texts])
    fields = [stamp, "true" if ok else "false", "230.1", "229.8", "231.0"]
    for port, text in enumerate(texts):
        current = "nan" if port == missing_port else f"{power(port, frame, args.rate) / 230:.3f}"
        fields += [current, text]
    fields += ["50.00", "0.98", "0.97", "0.99", "0", "0"]
    return ",".join(fields)


def bad_line(args: argparse.Namespace, occurrence: int, timestamp_ns: int) -> str:
    line = frame_line(args, 0, timestamp_ns)
    kind = occurrence % 3
    if kind == 0:  # cut short before the status/first port pair
        return ",".join(line.split(",")[:3])
    fields = line.split(",")
    if kind == 1:
        fields[4 if args.version == 2 else 6] = "1x2.5"
    else:
        fields[2 if args.version == 2 else 0] = "17e8x.5"
    return ",".join(fields)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", type=int, choices=(2, 3), default=2)
    parser.add_argument("--ports", type=int, default=48)
    parser.add_argument("--rate", type=int, default=50, help="frames per second")
    parser.add_argument("--seconds", type=Decimal, default=Decimal(1),
                        help="duration; fractional allowed (frames = seconds x rate)")
    parser.add_argument("--start", type=Decimal, default=Decimal(DEFAULT_START),
                        help="epoch seconds of the first frame (not with --realtime)")
    parser.add_argument("--realtime", action="store_true")
    parser.add_argument("--bad-every", type=int, default=0)
    parser.add_argument("--not-ok-every", type=int, default=0)
    parser.add_argument("--missing-every", type=int, default=0)
    args = parser.parse_args(argv)
    if args.ports < 1 or args.rate < 1:
        parser.error("--ports and --rate must be at least 1")
    frames = int(args.seconds * args.rate)
    start_ns = int(args.start * 1_000_000_000) + OFFSET_NS
    period_ns = 1_000_000_000 // args.rate
    out = sys.stdout
    began = time.monotonic()
    for frame in range(frames):
        if args.realtime:
            delay = began + frame / args.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            timestamp_ns = time.time_ns()
        else:
            timestamp_ns = start_ns + frame * period_ns
        out.write(frame_line(args, frame, timestamp_ns) + "\n")
        if args.bad_every and frame % args.bad_every == args.bad_every - 1:
            out.write(bad_line(args, frame // args.bad_every, timestamp_ns) + "\n")
        if args.realtime:
            out.flush()
    out.flush()



def run(argv: list[str] | None = None) -> int:
    """`main`, exiting with status 1 rather than a traceback when the reader goes away."""
    try:
        main(argv)
    except BrokenPipeError:
        # the reader is gone: point stdout at /dev/null so the final flush cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run())
