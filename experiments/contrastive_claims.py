"""Issue 18's contrastive claims on the digits folder, with seeds and 95% t-intervals.

    python experiments/contrastive_claims.py --data /tmp/digits --out runs/claims \
        [--claims a,b,c] [--seeds 0,1,2] [--examples 19200] [--batches 16,64,256] \
        [--reference-batch 64] [--hard-k 8] [--set key=value ...]

  (a) sigmoid vs softmax loss at each batch size, every arm seeing the same number of examples
      (train.total_steps = examples / batch, warm-up a tenth of the steps, the same lr): the
      SigLIP paper finds sigmoid better at small batches and equal at large ones;
  (b) duplicate-aware targets: loss.positives="same_caption" vs "diagonal" (the digits' captions
      are 4 templates x 10 class names, so a batch holds many identical captions);
  (c) hard negatives (loss.hard_negatives.k = --hard-k, default weight and guard) vs none.
(b) and (c) run at --reference-batch with the sigmoid loss; their control is (a)'s sigmoid arm
at that batch (one run serves all three claims).

Every (arm, seed) is one `python -m vlm_jax.train --config configs/digits_folder.py` run in
OUT/runs/<arm>__s<seed>, ending with the zero-shot evaluation on the 300 held-out digits. The
seed sets the model init and the data order. After each run the trainer's config.json is read
back through `validate.resolved_sections` (the sections as the code read them) and checked
against the arm: a run whose loss, positives, hard negatives, batch or examples seen differ is
an error, not a result. Finished runs (result.json) are reused when their --data/--set match.
The runs compile through a persistent XLA cache (OUT/xla_cache unless JAX_COMPILATION_CACHE_DIR
is set): a hit loads the executable compiled before for the same program, so no number changes.

Writes OUT/results.json (settings, one entry per run, the comparisons) and OUT/table.md: per
arm the mean zero-shot top-1 with its 95% t-interval over seeds, and per claim the paired
difference (treatment - control at the same seed, i.e. the same init and data order) with its
95% t-interval.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling runner's helpers
from ablate_connectors import REPO, RunStopped, _run_logged, summarise

CONFIG = "configs/digits_folder.py"
METRIC = "zeroshot_top1"
CONFIDENCE = 0.95
# What defines an arm: result key -> config key (its path in the resolved config).
ARM_KEYS = {
    "loss": "loss.name",
    "positives": "loss.positives",
    "hard_k": "loss.hard_negatives.k",
    "batch_size": "train.batch_size",
    "total_steps": "train.total_steps",
    "seed": "seed",
}


def schedule(batch_size: int, examples: int) -> dict:
    """Overrides for `examples` examples seen at `batch_size` (warm-up: a tenth of the steps)."""
    if examples % batch_size:
        raise ValueError(f"--examples={examples} is not a multiple of batch size {batch_size}")
    steps = examples // batch_size
    return {
        "train.batch_size": batch_size,
        "train.total_steps": steps,
        "train.checkpoint_every": steps,
        "optim.warmup_steps": max(1, steps // 10),
    }


def loss_overrides(name: str, positives: str = "diagonal", hard_k: int = 0) -> dict:
    return {"loss.name": name, "loss.positives": positives, "loss.hard_negatives.k": hard_k}


def arms(examples: int, batches: Sequence[int], reference_batch: int, hard_k: int) -> dict:
    """arm name -> config overrides (every loss setting explicit, none left to defaults)."""
    table = {
        f"{loss}/b{batch}": schedule(batch, examples) | loss_overrides(loss)
        for batch in dict.fromkeys([*batches, reference_batch])
        for loss in ("sigmoid", "softmax")
    }
    reference = schedule(reference_batch, examples)
    table[f"same_caption/b{reference_batch}"] = reference | loss_overrides(
        "sigmoid", positives="same_caption"
    )
    table[f"hard_k{hard_k}/b{reference_batch}"] = reference | loss_overrides(
        "sigmoid", hard_k=hard_k
    )
    return table


def comparisons(
    batches: Sequence[int], reference_batch: int, hard_k: int
) -> dict[str, list[tuple[str, str]]]:
    """claim -> (treatment arm, control arm) pairs."""
    return {
        "a": [(f"sigmoid/b{b}", f"softmax/b{b}") for b in batches],
        "b": [(f"same_caption/b{reference_batch}", f"sigmoid/b{reference_batch}")],
        "c": [(f"hard_k{hard_k}/b{reference_batch}", f"sigmoid/b{reference_batch}")],
    }


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, ...]:
    """(mean, low, high): mean ± t_{(1+c)/2, n-1} s / sqrt(n), s the sample std (ddof=1);
    the bounds are nan for fewer than two values."""
    values = np.asarray(values, float)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf((1 + confidence) / 2, len(values) - 1) * values.std(ddof=1)
    half /= math.sqrt(len(values))
    return mean, mean - half, mean + half


def run_dir(out: Path, arm: str, seed: int) -> Path:
    return out / "runs" / f"{arm.replace('/', '_')}__s{seed}"


def command(data: str, workdir: Path, overrides: dict, seed: int, extra: list[str]) -> list[str]:
    flags = [
        f"--config.{k}={v}" for k, v in ({"data.path": data, **overrides, "seed": seed}).items()
    ]
    flags += [f"--config.{kv}" for kv in extra]
    return [sys.executable, "-m", "vlm_jax.train", "--config", CONFIG, "--workdir", str(workdir),
            *flags]  # fmt: skip


def resolved_settings(config_json: str) -> dict:
    """The arm-defining settings of a run, read from its config.json as the code read it."""
    from vlm_jax.train.validate import resolved_sections

    sections = resolved_sections(config_json)
    settings = {}
    for name, key in ARM_KEYS.items():
        value = sections
        for part in key.split("."):
            value = value[part]
        settings[name] = value
    settings["examples_seen"] = settings["batch_size"] * settings["total_steps"]
    return settings


def check_arm(arm: str, overrides: dict, seed: int, resolved: dict) -> None:
    """Raise when the trainer's resolved config is not the arm's (a --set that overrode it)."""
    launched = overrides | {"seed": seed}
    expected = {name: launched[key] for name, key in ARM_KEYS.items()}
    wrong = {k: (v, resolved[k]) for k, v in expected.items() if resolved[k] != v}
    if wrong:
        raise RuntimeError(f"arm {arm} seed {seed} ran with other settings (arm, run): {wrong}")


def run_one(args, out: Path, arm: str, overrides: dict, seed: int) -> dict:
    workdir = run_dir(out, arm, seed)
    settings = {"data": args.data, "set": sorted(args.set), "overrides": overrides}
    result_file = workdir / "result.json"
    if result_file.exists():
        result = json.loads(result_file.read_text())
        if result["settings"] != settings:
            raise RuntimeError(f"{workdir} finished with other settings; use another --out")
        return result
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    _run_logged(command(args.data, workdir, overrides, seed, args.set), workdir, arm)
    resolved = resolved_settings((workdir / "config.json").read_text())
    check_arm(arm, overrides, seed, resolved)
    result = {"arm": arm, "seed": seed, "settings": settings, "resolved": resolved}
    result |= {"wall_s": time.time() - start, **summarise(workdir)}
    result_file.write_text(json.dumps(result, indent=2))
    return result


def _by_arm(runs: list[dict]) -> dict[str, dict[int, float]]:
    grouped: dict[str, dict[int, float]] = {}
    for run in runs:
        grouped.setdefault(run["arm"], {})[run["seed"]] = run[METRIC]
    return grouped


def paired_differences(runs: list[dict], pairs: dict[str, list[tuple[str, str]]]) -> list[dict]:
    """Per (claim, treatment, control): treatment - control at each seed both have."""
    scores = _by_arm(runs)
    rows = []
    for claim, claim_pairs in pairs.items():
        for treatment, control in claim_pairs:
            a, b = scores.get(treatment, {}), scores.get(control, {})
            seeds = sorted(set(a) & set(b))
            if not seeds:
                continue
            deltas = [a[s] - b[s] for s in seeds]
            mean, low, high = t_interval(deltas)
            rows.append({"claim": claim, "treatment": treatment, "control": control,
                         "seeds": seeds, "deltas": deltas, "mean": mean, "low": low,
                         "high": high})  # fmt: skip
    return rows


def _interval(mean: float, low: float, high: float) -> str:
    return f"{mean:.3f}" if math.isnan(low) else f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def markdown_tables(runs: list[dict], differences: list[dict]) -> str:
    """Per arm: settings, mean top-1 [95% t-interval], per-seed values; then the paired
    differences per claim."""
    header = "| arm | loss | batch | steps | examples | positives | hard k | seeds | "
    header += f"zero-shot top-1, mean [{CONFIDENCE:.0%} CI] | per seed |"
    lines = [header, "|" + "---|" * 10]
    by_arm: dict[str, list[dict]] = {}
    for run in sorted(runs, key=lambda r: (r["arm"], r["seed"])):
        by_arm.setdefault(run["arm"], []).append(run)
    for arm, arm_runs in by_arm.items():
        r = arm_runs[0]["resolved"]
        values = [run[METRIC] for run in arm_runs]
        cols = [arm, r["loss"], r["batch_size"], r["total_steps"], r["examples_seen"],
                r["positives"], r["hard_k"], len(values), _interval(*t_interval(values)),
                ", ".join(f"{v:.3f}" for v in values)]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cols)) + " |")
    lines += ["", f"| claim | treatment - control | seeds | Δ top-1, mean [{CONFIDENCE:.0%} "
              "CI, paired t] | per seed |", "|---|---|---|---|---|"]  # fmt: skip
    for d in differences:
        cols = [d["claim"], f"{d['treatment']} - {d['control']}", len(d["seeds"]),
                _interval(d["mean"], d["low"], d["high"]),
                ", ".join(f"{v:+.3f}" for v in d["deltas"])]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cols)) + " |")
    return "\n".join(lines)


def ensure_digits(data: Path) -> None:
    """Write the digits folder (configs/digits_folder.py) unless it is there."""
    if not (data / "train.jsonl").exists():
        subprocess.run([sys.executable, str(REPO / CONFIG), str(data)], cwd=REPO, check=True)


def parse(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="the digits folder (made if missing)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--claims", default="a,b,c")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--examples", type=int, default=19_200, help="examples seen per run")
    parser.add_argument("--batches", default="16,64,256", help="claim (a)'s batch sizes")
    parser.add_argument("--reference-batch", type=int, default=64, help="claims (b), (c)")
    parser.add_argument("--hard-k", type=int, default=8, help="claim (c)'s hard negatives")
    parser.add_argument("--set", action="append", default=[], help="extra key=value overrides")
    args = parser.parse_args(argv)
    args.data = str(Path(args.data).absolute())
    args.batches = [int(b) for b in args.batches.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.claims = args.claims.split(",")
    unknown = [c for c in args.claims if c not in "abc" or len(c) != 1]
    if unknown:
        parser.error(f"--claims {unknown} are not among: a, b, c")
    return args


def planned(args) -> tuple[dict[str, dict], dict[str, list[tuple[str, str]]]]:
    """The arms the chosen claims need (overrides by name) and the claims' pairs."""
    table = arms(args.examples, args.batches, args.reference_batch, args.hard_k)
    pairs = comparisons(args.batches, args.reference_batch, args.hard_k)
    pairs = {claim: pairs[claim] for claim in args.claims}
    needed = dict.fromkeys(arm for claim_pairs in pairs.values() for p in claim_pairs for arm in p)
    return {arm: table[arm] for arm in needed}, pairs


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    ensure_digits(Path(args.data))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(out / "xla_cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    selected, pairs = planned(args)
    runs, failures = [], []
    for seed in args.seeds:  # seed-major: every finished seed completes each comparison
        for arm, overrides in selected.items():
            try:
                result = run_one(args, out, arm, overrides, seed)
            except RunStopped:
                raise SystemExit(
                    f"{arm} seed {seed} was stopped; run the same command to resume"
                ) from None
            except RuntimeError as e:  # reported at the end; the other runs go on
                failures.append(f"{arm} seed {seed}: {e}")
                print(f"FAILED {failures[-1]}", flush=True)
                continue
            print(f"done {arm} seed {seed}: {METRIC}={result[METRIC]:.3f} "
                  f"({result['wall_s']:.0f}s)", flush=True)  # fmt: skip
            runs.append(result)
    differences = paired_differences(runs, pairs)
    settings = dict(vars(args))
    (out / "results.json").write_text(
        json.dumps({"settings": settings, "runs": runs, "differences": differences}, indent=2)
    )
    table = markdown_tables(runs, differences)
    (out / "table.md").write_text(table + "\n")
    print(table)
    print("wrote", out / "results.json", out / "table.md")
    if failures:
        raise SystemExit("failed runs (the others are in the outputs):\n" + "\n".join(failures))


if __name__ == "__main__":
    main()
