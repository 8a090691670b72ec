"""Input pipeline throughput per core and per host, against what a compiled train step consumes.

    nice -n 10 python scripts/bench_input.py [--sources folder,array_record,webdataset]
        [--decoders pil,simplejpeg,opencv] [--reduced on,off] [--crops resize_crop,inception]
        [--crop_scale 0.9,1.0] [--images 384] [--side 500] [--image_size 224] [--batch 32]
        [--batches 12] [--workers 2]
        [--report benchmarks/tpu_readiness/siglip_b16-32k__v5p-64.jsonl] [--mfu 0.4]
        [--chips_per_host 4] [--step_s S]

Data (made in a temporary directory): random crops of scikit-image's sample photos (astronaut,
coffee, chelsea, rocket, ...; they ship in its wheel), re-encoded as JPEG (quality 90) with the
longer side about --side px, as web images in img2dataset shards are (LAION, DataComp), with
captions; written as an image folder and, by `vlm_jax.data.write_shards`, as array_record and
webdataset shards. Files sit in the page cache: storage reads are not measured.

Measured: the training stream itself, `build_pipeline(config, tokenizer, "train", ...)` (source
read, decode by data.decoder with data.reduced_decode, record check, the data.crop crop to
--image_size (--crops; inception with data.crop_scale --crop_scale), flip, float conversion,
byte tokenization of the caption, batching), per (source, decoder, reduced, crop). images/s per
core ("per_core"): worker_count=0 (everything in this single-threaded process), --batches
batches after one warm-up batch, over the process's CPU time (on a machine shared with other
jobs the wall-clock rate, "per_core_wall", counts their time too). images/s per host:
worker_count=--workers (one core each), over wall time, timed from batch 2 * workers (the
workers' first buffers are full by then).

Consumption (--report, a compile report of `vlm_jax.compile`): step_s = flops_per_chip /
(peak_flops_per_chip * --mfu), or --step_s (a measured step, e.g. bench_train_step.py's step_ms
on a GPU); where the report has no flops_per_chip (the contrastive cells), the task's analytic
training FLOPs per example (models/flops.py; no tower frozen) * batch_size / chips. Consumed
images/s per host = batch_size / chips / step_s * --chips_per_host, and the cores a host needs
= ceil(that / images/s per core). Prints one JSON line per measurement and a table.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("folder", "array_record", "webdataset")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")
WORDS = ("photo", "picture", "close-up", "view", "image", "shot", "scene", "detail")
MAX_LEN = 128  # byte tokens: no caption made here is cut
ON_OFF = {"on": True, "off": False}


# -- data ---------------------------------------------------------------------------------------
def web_jpeg(photo: np.ndarray, side: int, rng: np.random.Generator) -> bytes:
    """A random crop (60-100% of each side) of `photo`, resized so its longer side is about
    `side` (0.8-1.2x), as JPEG quality 90."""
    from PIL import Image

    height, width = photo.shape[:2]
    crop_h, crop_w = (int(n * rng.uniform(0.6, 1.0)) for n in (height, width))
    top, left = rng.integers(height - crop_h + 1), rng.integers(width - crop_w + 1)
    image = Image.fromarray(photo[top : top + crop_h, left : left + crop_w])
    scale = side * rng.uniform(0.8, 1.2) / max(crop_h, crop_w)
    image = image.resize((max(1, round(crop_w * scale)), max(1, round(crop_h * scale))))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_folder(root: Path, images: int, side: int, seed: int = 0) -> Path:
    """An image folder (vlm_jax.data.folder layout) of `images` web JPEGs with captions."""
    import skimage.data

    rng = np.random.default_rng(seed)
    photos = {name: getattr(skimage.data, name)() for name in PHOTOS}
    (root / "imgs").mkdir(parents=True)
    rows = []
    for i in range(images):
        name = PHOTOS[i % len(PHOTOS)]
        (root / "imgs" / f"{i:06d}.jpg").write_bytes(web_jpeg(photos[name], side, rng))
        words = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 12))))
        caption = f"a {words} of the {name.replace('_', ' ')}"
        rows.append({"image": f"imgs/{i:06d}.jpg", "caption": caption, "id": i})
    (root / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def make_sources(root: Path, images: int, side: int) -> dict[str, dict]:
    """{source: its config.data keys} of the same records as a folder and as shards."""
    from vlm_jax.data.write_shards import write_shards

    folder = make_folder(root / "folder", images, side)
    write_shards(folder, root / "array_record", ["train"], 4, "fail", "array_record")
    tars = write_shards(folder, root / "webdataset", ["train"], 4, "fail", "webdataset")
    return {
        "folder": {"path": str(folder)},
        "array_record": {"path": str(root / "array_record")},
        "webdataset": {"train_shards": tars["shards"]["train"]},
    }


# -- measurement --------------------------------------------------------------------------------
def data_config(
    source: str,
    keys: dict,
    decoder: str,
    reduced: bool,
    image_size: int,
    crop: str = "resize_crop",
    crop_scale: tuple[float, float] = (0.9, 1.0),
):
    import ml_collections

    from vlm_jax.data.pipeline import default_data_config

    data = default_data_config(source)
    data.update(dict(keys, image_size=image_size, flip=True, decoder=decoder, crop=crop))
    data.update(reduced_decode=reduced, crop_scale=crop_scale)
    return ml_collections.ConfigDict({"data": data, "tokenizer": {"max_len": MAX_LEN}})


def images_per_s(config, batch: int, batches: int, workers: int) -> tuple[float, float]:
    """Steady-state (images per wall second, images per CPU second of this process) of the
    training stream of `config` with `workers` processes (the second counts only this
    process's CPU: with workers, the main process's share)."""
    from vlm_jax.data.pipeline import build_pipeline, close_stream
    from vlm_jax.data.tokenizers import ByteTokenizer

    stream = build_pipeline(
        config, ByteTokenizer(), "train", batch_size=batch, worker_count=workers
    )
    iterator = iter(stream)
    try:
        for _ in range(max(1, 2 * workers)):  # warm-up: imports, worker start, first buffers
            next(iterator)
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(batches):
            next(iterator)
        images = batch * batches
        return images / (time.perf_counter() - start), images / (time.process_time() - cpu)
    finally:
        if workers:
            close_stream(iterator)


# -- consumption --------------------------------------------------------------------------------
def read_report(path: str) -> dict:
    """The train_step row of a compile report (JSON lines)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    steps = [row for row in rows if row.get("function", "train_step") == "train_step"]
    if not steps:
        raise ValueError(f"--report {path}: no train_step row")
    return steps[0]


def analytic_flops_per_chip(report: dict) -> float:
    """Training FLOPs per chip per step of the report's contrastive config (models/flops.py)."""
    from vlm_jax.config import load_config
    from vlm_jax.models import flops

    config = load_config(str(REPO / report["config"]))
    if config.task != "contrastive":
        raise ValueError(
            f"the report of {report['config']} (task {config.task!r}) has no flops_per_chip and "
            "only the contrastive task's FLOPs are counted here: pass --step_s"
        )
    per_example = flops.train_flops_per_example(config.model, (), config.tokenizer.max_len)
    return per_example * report["batch_size"] / report["chips"]


def consumption(report: dict, mfu: float, chips_per_host: int, step_s: float | None) -> dict:
    """What the report's train step eats: step time and images/s per chip and per host."""
    from vlm_jax.train.metrics import peak_flops_per_device

    row = {"topology": report.get("topology"), "config": report.get("config")}
    row |= {"batch_size": report["batch_size"], "chips": report["chips"]}
    if step_s is None:
        if report.get("flops_per_chip"):
            per_chip, source = float(report["flops_per_chip"]), "report"
        else:
            per_chip, source = analytic_flops_per_chip(report), "analytic"
        peak = report.get("peak_flops_per_chip") or peak_flops_per_device(report["device_kind"])
        step_s = per_chip / (peak * mfu)
        row |= {"flops_per_chip": per_chip, "flops_from": source, "peak_flops_per_chip": peak}
        row |= {"mfu": mfu}
    per_chip_rate = report["batch_size"] / report["chips"] / step_s
    row |= {"step_s": step_s, "images_per_s_per_chip": per_chip_rate}
    row |= {
        "chips_per_host": chips_per_host,
        "images_per_s_per_host": per_chip_rate * chips_per_host,
    }
    return row


def cores_needed(per_host: float, per_core: float) -> int:
    """Cores a host needs for its chips' images/s at `per_core` images/s each."""
    return math.ceil(per_host / per_core)


# -- the script ---------------------------------------------------------------------------------
def names(text: str, valid: Sequence[str], flag: str) -> list[str]:
    chosen = [name for name in text.split(",") if name]
    bad = [name for name in chosen if name not in valid]
    if bad or not chosen:
        raise SystemExit(
            f"error: {flag} {','.join(bad) or text!r} is not one of: {', '.join(valid)}"
        )
    return chosen


def parse(argv: Sequence[str]) -> argparse.Namespace:
    from vlm_jax.data.decode import DECODERS, installed
    from vlm_jax.data.preprocess import CROPS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", default=",".join(SOURCES))
    parser.add_argument("--decoders", default="pil,simplejpeg,opencv")
    parser.add_argument("--reduced", default="on", help="data.reduced_decode: on, off or on,off")
    parser.add_argument("--crops", default="resize_crop", help="data.crop: one or a list")
    parser.add_argument("--crop_scale", default="0.9,1.0", help="data.crop_scale (inception)")
    parser.add_argument("--images", type=int, default=384, help="distinct records")
    parser.add_argument("--side", type=int, default=500, help="longer side of the JPEGs (px)")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=12, help="timed batches per measurement")
    parser.add_argument("--workers", type=int, default=2, help="per-host run (0: skip it)")
    parser.add_argument("--report", default="benchmarks/tpu_readiness/siglip_b16-32k__v5p-64.jsonl")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation")
    parser.add_argument("--chips_per_host", type=int, default=4, help="4 on v4/v5p, 8 on v5e")
    parser.add_argument("--step_s", type=float, default=None, help="a measured step time (s)")
    args = parser.parse_args(argv)
    args.sources = names(args.sources, SOURCES, "--sources")
    args.decoders = names(args.decoders, DECODERS.names(), "--decoders")
    missing = [name for name in args.decoders if not installed(name)]
    if missing:
        raise SystemExit(f"error: --decoders {','.join(missing)}: package not installed")
    args.reduced = [ON_OFF[name] for name in names(args.reduced, tuple(ON_OFF), "--reduced")]
    args.crops = names(args.crops, CROPS, "--crops")
    args.crop_scale = tuple(float(x) for x in args.crop_scale.split(","))
    if not 0 < args.mfu <= 1:
        raise SystemExit(f"error: --mfu {args.mfu} is not in (0, 1]")
    return args


def table(rows: list[dict], consumed: dict) -> str:
    per_host = consumed["images_per_s_per_host"]
    head = (
        f"{'source':13} {'decoder':11} {'reduced':7} {'crop':11} {'img/s/core':>10} {'(wall)':>7}"
    )
    head += f" {'img/s/host':>10}"
    head += f" {'cores for ' + format(per_host, '.0f') + ' img/s':>22}"
    lines = [head, "-" * len(head)]
    for r in rows:
        host = f"{r['per_host']:.0f}" if r.get("per_host") else "-"
        lines.append(
            f"{r['source']:13} {r['decoder']:11} {r['reduced_decode']!s:7} {r['crop']:11} "
            f"{r['per_core']:10.0f} {r['per_core_wall']:7.0f} {host:>10} {r['cores_needed']:22d}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse(sys.argv[1:] if argv is None else argv)
    consumed = consumption(read_report(args.report), args.mfu, args.chips_per_host, args.step_s)
    print(json.dumps({"consumption": consumed}), flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_input_") as tmp:
        sources = make_sources(Path(tmp), args.images, args.side)
        for source in args.sources:
            for decoder, reduced, crop in itertools.product(
                args.decoders, args.reduced, args.crops
            ):
                config = data_config(
                    source,
                    sources[source],
                    decoder,
                    reduced,
                    args.image_size,
                    crop,
                    args.crop_scale,
                )
                row = {"source": source, "decoder": decoder, "reduced_decode": reduced}
                row |= {
                    "crop": crop,
                    "crop_scale": args.crop_scale if crop == "inception" else None,
                }
                row |= {"side": args.side, "image_size": args.image_size, "batch": args.batch}
                wall, cpu = images_per_s(config, args.batch, args.batches, 0)
                row |= {"per_core": cpu, "per_core_wall": wall}
                if args.workers:
                    rate, _ = images_per_s(config, args.batch, args.batches, args.workers)
                    row |= {"workers": args.workers, "per_host": rate}
                row["cores_needed"] = cores_needed(
                    consumed["images_per_s_per_host"], row["per_core"]
                )
                print(json.dumps(row), flush=True)
                rows.append(row)
    print(table(rows, consumed))
    return rows


if __name__ == "__main__":
    main()
