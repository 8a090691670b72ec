"""Connector x fusion x visual-token budget x seed ablation for the VLM task.

    python experiments/ablate_connectors.py --out runs/ablate --grid tiny --seeds 0,1 \
        [--base configs/vlm_shapes.py] [--parallel 1] [--set train.total_steps=400 ...] \
        [--reeval 700]

Every (cell, seed) is one `python -m vlm_jax.train` run in OUT/runs/<cell>__s<seed>, ending
with the VQA evaluation (accuracy per question type, swapped / blank image probes, false-yes
rate, visual tokens, prefill FLOPs). The runner is resumable: finished runs (result.json
present) are skipped and an interrupted run resumes from its last checkpoint. A run counts as
finished only once its metrics reach train.total_steps (a run stopped by Ctrl-C or preemption
saves a checkpoint and exits 0, and is resumed next time); result.json records the --base and
--set it ran with, and a finished run is not reused for other settings. Ctrl-C (or a signal that
stops any one run) starts no further run. A failed run is reported and the others go on. It writes
OUT/results.csv (one row per run: this invocation's and earlier ones in OUT with the same
--base and --set), OUT/table.md (mean ± sample std over seeds per cell) and PNG plots: accuracy
per question type vs visual tokens, and train step time vs visual tokens.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
QUESTION_TYPES = ("colour", "shape", "count", "spatial", "exists", "absent", "caption")

# name -> config overrides. Token budgets assume the base config's 8x8 patch grid (64 patches).
# The resamplers' sizes (width 64, MLP 128, depth 2, 4 heads) are the ones every run of this
# ablation used: configs/vlm_shapes.py's connector section holds only the chosen connector's keys.
RESAMPLER = {"model.connector.width": 64, "model.connector.mlp_dim": 128}


def _resampler(name: str, num_tokens: int, **more) -> dict:
    return (
        {"model.connector.name": name, "model.connector.num_tokens": num_tokens} | RESAMPLER | more
    )


CELLS = {
    "text_only": {"model.fusion": "none"},
    "mlp64/early": {"model.connector.name": "mlp", "model.fusion": "early"},
    "linear64/early": {"model.connector.name": "linear", "model.fusion": "early"},
    "pool16/early": {"model.connector.name": "pool", "model.connector.pool_size": 2},
    "perceiver16/early": _resampler("perceiver", 16),
    "perceiver32/early": _resampler("perceiver", 32),
    "perceiver64/early": _resampler("perceiver", 64),
    "qformer16/early": _resampler("qformer", 16),
    "qformer32/early": _resampler("qformer", 32),
    "qformer64/early": _resampler("qformer", 64),
    "mlp64/xattn": {"model.connector.name": "mlp", "model.fusion": "cross_attention"},
    "perceiver32/xattn": _resampler("perceiver", 32, **{"model.fusion": "cross_attention"}),
    "qformer32/xattn": _resampler("qformer", 32, **{"model.fusion": "cross_attention"}),
}
GRIDS = {
    "tiny": (
        "text_only",
        "mlp64/early",
        "pool16/early",
        "perceiver32/early",
        "qformer32/early",
        "mlp64/xattn",
    ),
    "full": tuple(CELLS),
}
TABLE_METRICS = (
    ("acc", "acc"),
    *((f"acc_{t}", t) for t in QUESTION_TYPES if t != "caption"),
    ("caption_token_acc", "caption tok"),
    ("swapped_acc", "swapped"),
    ("blank_acc", "blank"),
    ("absent_false_yes", "false-yes"),
)


def run_dir(out: Path, cell: str, seed: int) -> Path:
    return out / "runs" / f"{cell.replace('/', '_')}__s{seed}"


def command(
    module: str, base: str, workdir: Path, cell: str, seed: int, extra: list[str]
) -> list[str]:
    """`python -m vlm_jax.{train,evaluate}` for one run, with the cell's overrides."""
    overrides = {**CELLS[cell], "seed": seed}
    flags = [f"--config.{k}={v}" for k, v in overrides.items()]
    flags += [f"--config.{kv}" for kv in extra]
    return [sys.executable, "-m", module, "--config", base, "--workdir", str(workdir), *flags]


class RunStopped(RuntimeError):
    """A run stopped by a signal before train.total_steps (Ctrl-C, preemption): the grid stops
    launching runs, and the next invocation resumes this one from its checkpoint."""


class NotStarted(RuntimeError):
    """A queued run skipped because an earlier run was stopped by a signal."""


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _run_logged(cmd: list[str], workdir: Path, what: str) -> None:
    with open(workdir / "log.txt", "a") as log:
        done = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=False)
    if -done.returncode in STOP_SIGNALS:  # killed by the signal (e.g. a second Ctrl-C)
        raise RunStopped(f"{what} stopped by signal {-done.returncode}; see {workdir}/log.txt")
    if done.returncode:
        raise RuntimeError(f"{what} failed (rc={done.returncode}); see {workdir}/log.txt")


def reevaluate(base: str, out: Path, cell: str, seed: int, extra: list[str], examples: int):
    """Evaluate a finished run's final checkpoint on `examples` held-out questions."""
    workdir = run_dir(out, cell, seed)
    result = json.loads((workdir / "result.json").read_text())
    if result.get("eval_examples") == examples:
        return result
    flags = [*extra, f"eval.num_examples={examples}"]
    _run_logged(command("vlm_jax.evaluate", base, workdir, cell, seed, flags), workdir, cell)
    newest = max(workdir.glob("eval_*.json"), key=lambda p: p.stat().st_mtime)
    scores = json.loads(newest.read_text())
    result.update({k.removeprefix("eval/"): v for k, v in scores.items() if k.startswith("eval/")})
    result["eval_examples"] = examples
    (workdir / "result.json").write_text(json.dumps(result, indent=2))
    return result


def settings(base: str, extra: list[str]) -> dict:
    """What a run was launched with besides its cell and seed (recorded in result.json)."""
    return {"base": base, "set": sorted(extra)}


def summarise(workdir: Path) -> dict[str, float]:
    """Final eval metrics and the mean logged step time of a finished run."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    total = json.loads((workdir / "config.json").read_text())["train"]["total_steps"]
    reached = max((r["step"] for r in rows), default=0)
    if reached < total:  # stopped by a signal (checkpoint saved, exit 0): not finished
        raise RunStopped(
            f"{workdir}: stopped at step {reached} of {total}; run the same command to resume it"
        )
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    if not evals:
        raise RuntimeError(f"{workdir}: no eval row in metrics.jsonl")
    result = {k.removeprefix("eval/"): v for k, v in evals[-1].items() if k.startswith("eval/")}
    times = [r["perf/step_time_s"] for r in rows if "perf/step_time_s" in r]
    result["step_time_s"] = float(np.median(times)) if times else float("nan")
    result["final_train_loss"] = next(
        (r["train/loss"] for r in reversed(rows) if "train/loss" in r), float("nan")
    )
    return result


def run_one(base: str, out: Path, cell: str, seed: int, extra: list[str]) -> dict:
    workdir = run_dir(out, cell, seed)
    result_file = workdir / "result.json"
    if result_file.exists():
        result = json.loads(result_file.read_text())
        recorded = result.get("settings")  # absent in results written before it was recorded
        if recorded is not None and recorded != settings(base, extra):
            raise RuntimeError(
                f"{workdir} finished with {recorded}, not {settings(base, extra)}: "
                "use another --out for other settings"
            )
        return result
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    _run_logged(command("vlm_jax.train", base, workdir, cell, seed, extra), workdir, cell)
    result = {"cell": cell, "seed": seed, "settings": settings(base, extra)}
    result |= {"wall_s": time.time() - start, **summarise(workdir)}
    result_file.write_text(json.dumps(result, indent=2))
    return result


def write_csv(results: list[dict], path: Path) -> None:
    keys = sorted({k for r in results for k in r} - {"cell", "seed", "settings"})
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, ["cell", "seed", *keys], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(sorted(results, key=lambda r: (r["cell"], r["seed"])))


def _by_cell(results: list[dict], cells: tuple[str, ...]) -> dict[str, list[dict]]:
    grouped = {cell: [r for r in results if r["cell"] == cell] for cell in cells}
    return {cell: rows for cell, rows in grouped.items() if rows}


def _mean_std(rows: list[dict], key: str, scale: float = 1.0, digits: int = 2) -> str:
    values = np.asarray([r.get(key, np.nan) for r in rows], float) * scale
    values = values[~np.isnan(values)]
    if not len(values):
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"  # sample std


def markdown_table(results: list[dict], cells: tuple[str, ...]) -> str:
    """Mean ± sample std over seeds per cell: accuracy per type, probes, tokens, FLOPs, step
    time; "seeds" counts the runs with an accuracy."""
    header = ["cell", "seeds", "vis tok", *(label for _, label in TABLE_METRICS)]
    header += ["prefill GFLOP", "step ms"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for cell, rows in _by_cell(results, cells).items():
        seeds = sum(not np.isnan(r.get("acc", np.nan)) for r in rows)
        cols = [cell, str(seeds), f"{rows[0].get('visual_tokens', 0):.0f}"]
        cols += [_mean_std(rows, key) for key, _ in TABLE_METRICS]
        cols += [_mean_std(rows, "prefill_gflops", digits=3)]
        cols += [_mean_std(rows, "step_time_s", scale=1e3, digits=0)]
        lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines)


def plot(results: list[dict], cells: tuple[str, ...], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = _by_cell(results, cells)
    mean = lambda rows, key: float(np.nanmean([r.get(key, np.nan) for r in rows]))
    types = [t for t in QUESTION_TYPES if t != "caption"]
    fig, axes = plt.subplots(1, len(types), figsize=(3.2 * len(types), 3.2), sharey=True)
    markers = "o^sDvP*xX<>"
    for ax, qtype in zip(axes, types):
        for i, (cell, rows) in enumerate(grouped.items()):
            x = mean(rows, "visual_tokens")
            ax.scatter(x, mean(rows, f"acc_{qtype}"), label=cell, marker=markers[i % len(markers)])
        ax.set_title(qtype)
        ax.set_xlabel("visual tokens")
    axes[0].set_ylabel("exact-match accuracy")
    axes[-1].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    acc_path = out / "accuracy_vs_visual_tokens.png"
    fig.savefig(acc_path, dpi=110)
    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    for cell, rows in grouped.items():
        ax.scatter(mean(rows, "visual_tokens"), 1e3 * mean(rows, "step_time_s"), label=cell)
    ax.set_xlabel("visual tokens")
    ax.set_ylabel("train step time (ms)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    time_path = out / "step_time_vs_visual_tokens.png"
    fig.savefig(time_path, dpi=110)
    plt.close("all")
    return [acc_path, time_path]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="configs/vlm_shapes.py")
    parser.add_argument("--out", required=True)
    parser.add_argument("--grid", default="tiny", choices=sorted(GRIDS))
    parser.add_argument("--cells", default="", help="comma-separated cells (overrides --grid)")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--parallel", type=int, default=1, help="concurrent training processes")
    parser.add_argument("--set", action="append", default=[], help="extra key=value overrides")
    parser.add_argument(
        "--reeval",
        type=int,
        default=0,
        help="re-evaluate every finished run on this many held-out questions (0: keep)",
    )
    args = parser.parse_args(argv)
    cells = tuple(args.cells.split(",")) if args.cells else GRIDS[args.grid]
    unknown = [c for c in cells if c not in CELLS]
    if unknown:
        parser.error(f"cells {unknown} are not among: {', '.join(CELLS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(cell, seed) for seed in seeds for cell in cells]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    results, failures = run_all(args, out, jobs)
    if args.reeval:
        results = [reevaluate(args.base, out, r["cell"], r["seed"], args.set, args.reeval)
                   for r in results]  # fmt: skip
    results = with_earlier_results(results, out, settings(args.base, args.set))
    shown = tuple(c for c in CELLS if any(r["cell"] == c for r in results))
    write_csv(results, out / "results.csv")
    table = markdown_table(results, shown)
    (out / "table.md").write_text(table + "\n")
    plots = plot(results, shown, out) if results else []
    print(table)
    print("wrote", out / "results.csv", out / "table.md", *plots)
    if failures:
        raise SystemExit("failed runs (the others are in the outputs):\n" + "\n".join(failures))


def run_all(args, out: Path, jobs: list[tuple[str, int]]) -> tuple[list[dict], list[str]]:
    """Every job's result, and a line per failed job.

    Ctrl-C or SIGTERM reaches the training processes too (one process group); each saves a
    checkpoint and exits before its total steps. A worker that sees its run stop that way sets
    `stop` itself, so no further run is launched whichever thread the signal woke first; the
    main thread waits in short slices so that its KeyboardInterrupt is raised at once.
    """
    results, failures = [], []
    stop = threading.Event()

    def launch(cell: str, seed: int) -> dict:
        if stop.is_set():
            raise NotStarted("not started: an earlier run was stopped by a signal")
        try:
            return run_one(args.base, out, cell, seed, args.set)
        except RunStopped:
            stop.set()
            raise

    pool = concurrent.futures.ThreadPoolExecutor(max(1, args.parallel))
    try:
        futures = {pool.submit(launch, c, s): (c, s) for c, s in jobs}
        for future in _as_completed_interruptibly(futures):
            cell, seed = futures[future]
            try:
                result = future.result()
            except Exception as e:  # reported at the end; the other runs go on
                failures.append(f"{cell} seed {seed}: {e}")
                print(f"FAILED {failures[-1]}", flush=True)
                continue
            print(f"done {cell} seed {seed}: acc={result.get('acc', float('nan')):.3f} "
                  f"({result.get('wall_s', 0):.0f}s)", flush=True)  # fmt: skip
            results.append(result)
    except BaseException:
        stop.set()  # Ctrl-C in the main thread: queued runs must not start
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results, failures


def _as_completed_interruptibly(futures, poll_s: float = 0.2):
    """`as_completed` that waits in slices: a signal delivered to a worker thread only marks
    the main thread's handler as pending, and a main thread blocked without a timeout would run
    it only when the next future completed."""
    pending = set(futures)
    while pending:
        done, pending = concurrent.futures.wait(
            pending, timeout=poll_s, return_when=concurrent.futures.FIRST_COMPLETED
        )
        yield from done


def with_earlier_results(results: list[dict], out: Path, current: dict) -> list[dict]:
    """`results` plus finished runs in OUT from earlier invocations with the same settings."""
    seen = {(r["cell"], r["seed"]) for r in results}
    merged = list(results)
    for path in sorted(out.glob("runs/*/result.json")):
        earlier = json.loads(path.read_text())
        key = (earlier.get("cell"), earlier.get("seed"))
        if key not in seen and earlier.get("settings") == current:
            merged.append(earlier)
            seen.add(key)
    return merged


if __name__ == "__main__":
    main()
