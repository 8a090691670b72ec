"""Held-out accuracy against wall time for quickstart runs (issue 21).

    python scripts/quickstart_curve.py NAME=WORKDIR [NAME=WORKDIR ...] [--out curves.json]

metrics.jsonl rows carry no wall time, but the TensorBoard events the trainer writes beside
them do: every scalar's `wall_time` is when its row was written, i.e. just after that step's
evaluation. A run's time origin is the epoch time in `WORKDIR/start_time` (write it with
`date +%s.%N > WORKDIR/start_time` just before launching, so that start-up and compilation
count), else the mtime of `WORKDIR/config.json` (written after the imports: a few seconds
late). Prints one JSON line per evaluation and a table; `--out` writes every point as JSON.
"""

from __future__ import annotations

import argparse
import json
import struct
from collections.abc import Iterator
from pathlib import Path

from tensorboardX.proto.event_pb2 import Event

METRICS = ("eval/zeroshot_top1", "eval/retrieval_i2t_r1")


def tfrecords(path: Path) -> Iterator[bytes]:
    """The payloads of a TFRecord file: [u64 length][u32 crc][payload][u32 crc] each."""
    data = path.read_bytes()
    offset = 0
    while offset + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        yield data[offset + 12 : offset + 12 + length]
        offset += 12 + length + 4


def event_wall_times(workdir: Path, tag: str) -> dict[int, float]:
    """{step: epoch seconds} at which `tag` was logged, from WORKDIR/tensorboard/."""
    times: dict[int, float] = {}
    for path in sorted((workdir / "tensorboard").glob("events.out.tfevents.*")):
        for record in tfrecords(path):
            event = Event.FromString(record)
            if any(value.tag == tag for value in event.summary.value):
                times[event.step] = event.wall_time  # a resumed run's rewrite wins
    return times


def start_time(workdir: Path) -> float:
    marker = workdir / "start_time"
    if marker.exists():
        return float(marker.read_text())
    return (workdir / "config.json").stat().st_mtime


def curve(workdir: Path) -> list[dict]:
    """One point per evaluation: step, wall_s since the start, and the METRICS."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    times = event_wall_times(workdir, METRICS[0])
    origin = start_time(workdir)
    return [
        {"step": row["step"], "wall_s": round(times[row["step"]] - origin, 1)}
        | {key.removeprefix("eval/"): row[key] for key in METRICS}
        for row in rows
        if METRICS[0] in row
    ]


def table(curves: dict[str, list[dict]]) -> str:
    lines = [
        "| run | step | wall | zero-shot top-1 | image→text R@1 |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, points in curves.items():
        for p in points:
            minutes, seconds = divmod(round(p["wall_s"]), 60)
            lines.append(
                f"| {name} | {p['step']} | {minutes}:{seconds:02d} | "
                f"{p['zeroshot_top1']:.3f} | {p['retrieval_i2t_r1']:.3f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="NAME=WORKDIR")
    parser.add_argument("--out", type=Path, help="write {NAME: [points]} as JSON here")
    args = parser.parse_args()
    curves = {}
    for spec in args.runs:
        name, sep, workdir = spec.partition("=")
        if not sep:
            parser.error(f"run {spec!r} is not NAME=WORKDIR")
        curves[name] = curve(Path(workdir))
        for point in curves[name]:
            print(json.dumps({"run": name} | point))
    print(table(curves))
    if args.out:
        args.out.write_text(json.dumps(curves, indent=1) + "\n")


if __name__ == "__main__":
    main()
