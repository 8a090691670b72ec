"""TPU readiness: compile the shipped configs' train steps for real TPU topologies on this CPU.

    python scripts/tpu_readiness.py run [--out-dir benchmarks/tpu_readiness] [--only v5p-64,...]
        [--cells siglip_b16-32k,...] [--functions train_step] [--timeout 3600] [--stale]
    python scripts/tpu_readiness.py table [--out-dir ...] [--step-time 2.0] > table.md
    python scripts/tpu_readiness.py plan      # the cells, in run order, and their commands

`run` calls `python -m vlm_jax.compile` once per (cell, topology), one at a time under
`nice -n 10`, each writing OUT_DIR/CELL__TOPOLOGY.jsonl (its log next to it). It is resumable:
a cell whose .jsonl (or .failed, a compile that crashed or timed out) exists is skipped, so the
same command continues an interrupted matrix (delete a .failed file to retry that cell);
`--stale` also recompiles the cells whose report predates per-step collective counting (the
old report stays until the new one replaces it).
Priority order: every cell on v5p-64 and v5e-256 first, then v4-128, v5p-256, v6e-256.

`table` renders the markdown table from the reports. Measured by libtpu's compiler: fits,
the per-chip HBM (arguments / temporaries / total against the chip's capacity) and the
collective bytes in the compiled program. Estimates, computed here: the analytic TFLOP per
chip per step (the model's own FLOP count, `vlm_jax.models.flops`, x global batch / chips;
for tasks without one, XLA's cost analysis of the lowered loss + gradient at a small batch,
scaled to the global batch) and the MFU it would reach at `--step-time` seconds per step
(TFLOP per chip / step time / the chip's bf16 peak; "> peak" where the step cannot run that
fast), plus the ideal step time (at 100% MFU: the MFU of a measured step is ideal / measured).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Run order. "2xv5e-256": two v5e-256 slices joined by DCN (`--num_slices 2`), for the cells
# in MULTISLICE_CELLS only.
TOPOLOGIES = ("v5p-64", "v5e-256", "2xv5e-256", "v4-128", "v5p-256", "v6e-256")
MULTISLICE_CELLS = ("siglip_b16-32k", "siglip_so400m14-32k")
_SLICES = re.compile(r"^(?P<slices>\d+)x(?P<topology>.+)$")
GIB = 2**30
MIB = 2**20


@dataclasses.dataclass(frozen=True)
class Cell:
    name: str
    config: str
    overrides: tuple[str, ...] = ()  # --config.key=value flags
    note: str = ""


MILLION = 1_048_576  # 2**20 pairs: divides every topology's chip count
CELLS = (
    Cell("siglip_b16-32k", "configs/siglip_b16.py"),
    Cell("clip_b16-32k", "configs/clip_b16.py"),
    Cell("siglip_so400m14-32k", "configs/siglip_so400m14.py"),
    Cell("clip_l14-32k", "configs/clip_l14.py"),
    # 1M pairs: the chunked (ring) loss never builds the B x B logits; the gradient cache
    # keeps one chunk's activations (16 chunks of 64k: 256 to 2,048 rows per chip).
    Cell(
        "siglip_b16-1M",
        "configs/siglip_b16.py",
        (f"--config.train.batch_size={MILLION}", "--config.train.grad_cache_chunks=16"),
        "grad_cache_chunks=16",
    ),
    Cell(
        "clip_b16-1M",
        "configs/clip_b16.py",
        (f"--config.train.batch_size={MILLION}", "--config.train.grad_cache_chunks=16"),
        "grad_cache_chunks=16",
    ),
    # The only VLM config ships tiny (32 px, a 2-layer LM): at a pod-sized batch it shows the
    # VLM step (vision tower, connector, decoder, masked LM loss) compiles and shards.
    Cell("vlm_shapes-32k", "configs/vlm_shapes.py", ("--config.train.batch_size=32768",)),
    # LLaVA-1.5-7B-shaped (CLIP L/14-336 + MLP + a 7B Llama LM) at its shipped batch, 128.
    Cell("llava-stage2", "configs/llava.py:stage2"),
)


def cell_path(out_dir: Path, cell: Cell, topology: str, suffix: str) -> Path:
    return out_dir / f"{cell.name}__{topology}{suffix}"


def stand_ins(config_path: str, out_dir: Path) -> list[str]:
    """--config flags pointing a config's input files at small stand-ins made here. The compile
    tool builds the task as the trainer does (its tokenizer file and, for a VQA folder, the
    manifest that says how many images a record holds), but the compiled program only sees
    abstract token ids and images, so stand-ins give the same program as the released files
    (which a real run points at): a SentencePiece model, or a HuggingFace tokenizer whose
    vocabulary ends where the config's `<image>` id begins, and a one-record image folder."""
    from vlm_jax.config import load_config

    config = load_config(str(REPO / config_path))
    flags = []
    if config.tokenizer.name == "sentencepiece" and not config.tokenizer.get("model_path"):
        flags.append(f"--config.tokenizer.model_path={stand_in_spiece(out_dir)}")
    if config.tokenizer.name == "hf" and not config.tokenizer.get("path"):
        vocab = config.model.image_token_id  # <image> is added after the release's ids
        flags.append(f"--config.tokenizer.path={stand_in_hf_tokenizer(out_dir, vocab)}")
    if config.data.get("source") == "vqa_folder" and not config.data.get("path"):
        flags.append(f"--config.data.path={stand_in_vqa_folder(out_dir)}")
    return flags


def stand_in_spiece(out_dir: Path) -> Path:
    model = out_dir / "stand_in_spiece.model"
    if not model.exists():
        import sentencepiece

        sentences = ("a photo of a dog.", "a bad photo of the large cat.", "a red car by a tree.")
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences * 10),
            model_prefix=str(model.with_suffix("")),
            vocab_size=64,
            hard_vocab_limit=False,
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            minloglevel=2,
        )
    return model


def stand_in_hf_tokenizer(out_dir: Path, vocab: int) -> Path:
    """A word-level tokenizer.json of exactly `vocab` ids (<unk>, <s>, </s>, then words), with
    the Llama convention of BOS <s> and EOS </s>, in OUT_DIR/stand_in_hf_VOCAB/."""
    import tokenizers

    path = out_dir / f"stand_in_hf_{vocab}"
    if not (path / "tokenizer.json").exists():
        path.mkdir(parents=True, exist_ok=True)
        words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, vocab)]
        model = tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")
        tokenizer = tokenizers.Tokenizer(model)
        tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
        tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
        tokenizer.save(str(path / "tokenizer.json"))
        config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def stand_in_vqa_folder(out_dir: Path) -> Path:
    """A VQA image folder of one record (one image) per split, for the manifest's image count."""
    from PIL import Image

    path = out_dir / "stand_in_vqa_folder"
    if not (path / "val.jsonl").exists():
        path.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (128, 128, 128)).save(path / "grey.png")
        row = json.dumps({"image": "grey.png", "prompt": "what is it?", "answer": "grey"})
        for split in ("train", "val"):
            (path / f"{split}.jsonl").write_text(row + "\n")
    return path


def split_target(target: str) -> tuple[str, int]:
    """ "2xv5e-256" -> ("v5e-256", 2); "v5p-64" -> ("v5p-64", 1)."""
    match = _SLICES.match(target)
    return (match["topology"], int(match["slices"])) if match else (target, 1)


def command(cell: Cell, target: str, out: Path, functions: str) -> list[str]:
    topology, slices = split_target(target)
    return [
        "nice",
        "-n",
        "10",
        sys.executable,
        "-m",
        "vlm_jax.compile",
        "--config",
        cell.config,
        "--topology",
        topology,
        "--num_slices",
        str(slices),
        "--functions",
        functions,
        "--out",
        str(out),
        *cell.overrides,
        *stand_ins(cell.config, out.parent),
    ]


def plan(cells, topologies) -> list[tuple[Cell, str]]:
    """(cell, topology) in run order: topology-major, in TOPOLOGIES' priority order; the
    multi-slice targets only for MULTISLICE_CELLS."""
    return [
        (c, t)
        for t in topologies
        for c in cells
        if split_target(t)[1] == 1 or c.name in MULTISLICE_CELLS
    ]


def per_step_collectives(report: Path) -> bool:
    """Whether every row of a report counts collectives per step (every loop body times its
    trip count); older reports counted each loop body once."""
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    return all(r.get("collective_counting") and not r.get("loops_without_trip_count") for r in rows)


def run_one(
    cell: Cell, topology: str, out_dir: Path, functions: str, timeout: float, stale: bool = False
) -> str:
    """Compile one cell unless its result exists (with `stale`: a result whose collectives
    are not per step is compiled again, and replaced once the new one is written);
    -> "skip", "ok", "no fit" or "failed"."""
    report = cell_path(out_dir, cell, topology, ".jsonl")
    failed = cell_path(out_dir, cell, topology, ".failed")
    if failed.exists() or (report.exists() and not (stale and not per_step_collectives(report))):
        return "skip"
    log = cell_path(out_dir, cell, topology, ".log")
    partial = cell_path(out_dir, cell, topology, ".jsonl.partial")
    argv = command(cell, topology, partial, functions)
    start = time.time()
    with log.open("w") as f:
        f.write(" ".join(argv) + "\n")
        f.flush()
        try:
            rc = subprocess.run(
                argv,
                cwd=REPO,
                env=checkout_env(),
                stdout=f,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            )
            rc = rc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.time() - start
    if rc in (0, 1) and partial.exists():  # 1: compiled, but something does not fit
        partial.replace(report)
        return "ok" if rc == 0 else "no fit"
    tail = log.read_text().splitlines()[-15:]
    failed.write_text(json.dumps({"rc": rc, "wall_s": round(wall, 1), "log_tail": tail}) + "\n")
    return "failed"


def checkout_env() -> dict[str, str]:
    """This checkout's vlm_jax first on the path (whatever is installed), and libtpu without
    its one-process-per-host lock (/tmp/libtpu_lockfile): a compile-only process drives no
    chip, so it must not lock out other compiles (or a real TPU job) on the same host."""
    path = os.environ.get("PYTHONPATH", "")
    return os.environ | {
        "PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO),
        "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
    }


def cmd_run(args) -> None:
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = out_dir / "progress.log"
    todo = plan(select(CELLS, args.cells), select(TOPOLOGIES, args.only))
    for i, (cell, topology) in enumerate(todo, 1):
        start = time.time()
        status = run_one(cell, topology, out_dir, args.functions, args.timeout, args.stale)
        line = (
            f"{time.strftime('%H:%M:%S')} [{i}/{len(todo)}] {cell.name} {topology}: {status} "
            f"({time.time() - start:.0f} s)"
        )
        print(line, flush=True)
        with progress.open("a") as f:
            f.write(line + "\n")


def select(items, names: str | None):
    """Items (cells or topology names) named in the comma list `names`; all if None."""
    if not names:
        return tuple(items)
    wanted = names.split(",")
    known = [getattr(x, "name", x) for x in items]
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise SystemExit(f"error: unknown {unknown}; valid: {', '.join(known)}")
    return tuple(x for x in items if getattr(x, "name", x) in wanted)


# ---- the table -------------------------------------------------------------------------------


def cell_config(cell: Cell):
    """The cell's config with its overrides, as the compile tool resolves it."""
    from vlm_jax.config import parse_cli
    from vlm_jax.train.validate import CONFIG

    config, _ = parse_cli(["--config", cell.config, *cell.overrides], CONFIG)
    return config


def train_flops_per_example(config) -> tuple[float, str]:
    """(FLOPs of one training example, how they were counted)."""
    if config.model.name == "two_tower":
        from vlm_jax.models import flops

        count = flops.train_flops_per_example(config.model, (), config.tokenizer.max_len)
        return count, "analytic (models/flops.py)"
    return xla_train_flops_per_example(config), "XLA cost analysis (batch 8, scaled)"


def xla_train_flops_per_example(config, batch: int = 8) -> float:
    """XLA's FLOP count of the lowered (unoptimised) loss + gradient at `batch`, per example;
    on this host's CPU, abstract inputs only (nothing is compiled)."""
    import jax

    from vlm_jax import sharding
    from vlm_jax.train.tasks import TASKS

    config = config.copy_and_resolve_references()
    config.model.scan = config.model.remat = False  # the same FLOPs; no while loop to count
    mesh = sharding.build_mesh((1, 1, 1), jax.devices()[:1])
    task = TASKS.get(config.task)(config, mesh)
    spec = task.batch_spec(batch)
    params = jax.eval_shape(task.init, jax.random.key(0), spec)["params"]

    def loss(p, b):
        return task.loss(p, b, jax.random.key(0), True)[0]

    cost = jax.jit(jax.grad(loss)).lower(params, spec).cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost["flops"]) / batch


def peak_flops(device_kind: str) -> float | None:
    from vlm_jax.train.metrics import peak_flops_per_device

    return peak_flops_per_device(device_kind)


def _num(x: float) -> str:
    """1 decimal, or 3 significant digits below 1 (a tiny VLM's TFLOP would round to 0)."""
    return f"{x:,.1f}" if x >= 1 else f"{x:.3g}"


def _gib(n) -> str:
    return "-" if n is None else f"{n / GIB:.1f}"


def collective_mib(row: dict) -> str:
    """Total (all-reduce, all-gather, reduce-scatter) MiB per chip per step; a trailing "*"
    marks a report that counted some loop body once (a lower bound)."""
    moved = row.get("collectives") or {}
    if not moved:
        return "-"
    total = sum(c["bytes"] for c in moved.values())
    parts = {"AR": "all-reduce", "AG": "all-gather", "RS": "reduce-scatter"}
    detail = " ".join(f"{k} {moved[v]['bytes'] / MIB:.0f}" for k, v in parts.items() if v in moved)
    once = not row.get("collective_counting") or row.get("loops_without_trip_count")
    return f"{total / MIB:,.0f} ({detail}){' *' if once else ''}"


def table_rows(out_dir: Path, step_time: float) -> tuple[list[str], list[str]]:
    """(markdown table lines, notes on cells that failed to compile)."""
    head = (
        "| config | global batch | topology | chips | mesh (data, fsdp, tensor) | fits | "
        "args / temp / total GiB per chip | HBM GiB | collective MiB per chip per step | "
        f"TFLOP per chip per step (est.) | ideal step s, 100% MFU (est.) | "
        f"MFU at {step_time:g} s/step (est.) | attention | compile s |"
    )
    lines = [head, head_rule(head)]
    failures = []
    flops_cache: dict[str, tuple[float, str]] = {}
    for cell, topology in plan(CELLS, TOPOLOGIES):
        report = cell_path(out_dir, cell, topology, ".jsonl")
        failed = cell_path(out_dir, cell, topology, ".failed")
        if failed.exists():
            info = json.loads(failed.read_text())
            failures.append(f"{cell.name} on {topology}: rc={info['rc']}: {info['log_tail'][-1:]}")
            lines.append(f"| {cell.name} | | {topology} | | | compile failed | | | | | | | | |")
            continue
        if not report.exists():
            continue
        for row in map(json.loads, report.read_text().splitlines()):
            if row.get("flops"):  # the compile tool's own (analytic) count
                per_example = row["flops"] / row["batch_size"]
            else:  # reports from before it had one
                if cell.name not in flops_cache:
                    flops_cache[cell.name] = train_flops_per_example(cell_config(cell))
                per_example, _ = flops_cache[cell.name]
            lines.append(format_row(cell, row, per_example, step_time))
    return lines, failures


def head_rule(head: str) -> str:
    return "|" + "---|" * (head.count("|") - 1)


def format_row(cell: Cell, row: dict, per_example: float, step_time: float) -> str:
    m = row["memory_per_chip"]
    mesh = row["mesh"]
    tflop = per_example * row["batch_size"] / row["chips"] / 1e12
    peak = peak_flops(row["device_kind"])
    ideal = tflop * 1e12 / peak if peak else None
    mfu = "-" if ideal is None else f"{100 * ideal / step_time:.0f}%"
    mfu = "> peak" if ideal and ideal > step_time else mfu
    memory = f"{_gib(m.get('arguments'))} / {_gib(m.get('temporaries'))} / {_gib(m['total'])}"
    fits = "yes" if row["fits"] else "**NO**"
    name = f"{cell.name} ({cell.note})" if cell.note else cell.name
    slices = row.get("num_slices", 1)
    topology = f"{slices} x {row['topology']} (DCN)" if slices > 1 else row["topology"]
    return (
        f"| {name} | {row['batch_size']:,} | {topology} | {row['chips']} | "
        f"({mesh['data']}, {mesh['fsdp']}, {mesh['tensor']}) | {fits} | {memory} | "
        f"{row['hbm_per_chip'] / GIB:.0f} | {collective_mib(row)} | {_num(tflop)} | "
        f"{'-' if ideal is None else f'{ideal:.3g}'} | "
        f"{mfu} | {row.get('attention') or '-'} | {row['compile_s']:.0f} |"
    )


def cmd_table(args) -> None:
    import jax

    jax.config.update("jax_platforms", "cpu")
    lines, failures = table_rows(Path(args.out_dir), args.step_time)
    print("\n".join(lines))
    if failures:
        print("\nCells whose compile failed:\n" + "\n".join(f"- {f}" for f in failures))


def cmd_plan(args) -> None:
    out_dir = Path(args.out_dir)
    for cell, topology in plan(select(CELLS, args.cells), select(TOPOLOGIES, args.only)):
        argv = command(cell, topology, cell_path(out_dir, cell, topology, ".jsonl"), "train_step")
        print(" ".join(argv[3:]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=("run", "table", "plan"))
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks" / "tpu_readiness"))
    parser.add_argument("--only", help=f"comma list of topologies (of {', '.join(TOPOLOGIES)})")
    parser.add_argument("--cells", help="comma list of cells (default: all)")
    parser.add_argument("--functions", default="train_step")
    parser.add_argument(
        "--stale",
        action="store_true",
        help="also recompile cells whose report counts loop bodies' collectives once",
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per compile")
    parser.add_argument("--step-time", type=float, default=2.0, help="for the MFU column")
    args = parser.parse_args(argv)
    {"run": cmd_run, "table": cmd_table, "plan": cmd_plan}[args.action](args)


if __name__ == "__main__":
    main()
