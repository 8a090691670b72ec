"""experiments/contrastive_claims.py: its arms reach the trainer's resolved config as claimed
(examples seen constant across batch sizes, the loss, positives and hard negatives each arm
names), the claims pair the arms they say, and the intervals are Student-t intervals."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
from scipy import stats

from vlm_jax.train.cli import parse_args
from vlm_jax.train.trainer import prepare_workdir
from vlm_jax.train.validate import validate_config

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location(
    "contrastive_claims", REPO / "experiments" / "contrastive_claims.py"
)
claims = importlib.util.module_from_spec(spec)
spec.loader.exec_module(claims)


def trainer_config_json(cmd: list[str], workdir: Path) -> str:
    """The config.json the trainer writes for `cmd` (the CLI's parsing and validation, then the
    trainer's own writer), without training."""
    assert cmd[1:4] == ["-m", "vlm_jax.train", "--config"]
    config, options = parse_args(cmd[3:], "train")
    validate_config(config)
    prepare_workdir(Path(options["workdir"]), config, is_primary=True)
    return (workdir / "config.json").read_text()


def resolved_arms(tmp_path, argv: list[str]) -> dict[str, dict]:
    args = claims.parse(["--data", str(tmp_path / "digits"), "--out", str(tmp_path), *argv])
    selected, _ = claims.planned(args)
    resolved = {}
    for arm, overrides in selected.items():
        workdir = claims.run_dir(tmp_path, arm, 2)
        cmd = claims.command(args.data, workdir, overrides, 2, args.set)
        resolved[arm] = claims.resolved_settings(trainer_config_json(cmd, workdir))
        claims.check_arm(arm, overrides, 2, resolved[arm])
    return resolved


def test_arms_reach_the_trainer_config_as_claimed(tmp_path):
    resolved = resolved_arms(tmp_path, ["--examples", "1024", "--batches", "16,64,256"])
    batch_arms = {f"{loss}/b{b}" for loss in ("sigmoid", "softmax") for b in (16, 64, 256)}
    assert set(resolved) == batch_arms | {"same_caption/b64", "hard_k8/b64"}
    assert {r["examples_seen"] for r in resolved.values()} == {1024}
    assert {arm: r["total_steps"] for arm, r in resolved.items() if "/b16" in arm} == {
        "sigmoid/b16": 64,
        "softmax/b16": 64,
    }
    assert {arm: r["loss"] for arm, r in resolved.items() if "/b256" in arm} == {
        "sigmoid/b256": "sigmoid",
        "softmax/b256": "softmax",
    }
    assert resolved["same_caption/b64"] == resolved["sigmoid/b64"] | {"positives": "same_caption"}
    assert resolved["hard_k8/b64"] == resolved["sigmoid/b64"] | {"hard_k": 8}
    assert {r["seed"] for r in resolved.values()} == {2}
    assert {r["positives"] for a, r in resolved.items() if a != "same_caption/b64"} == {"diagonal"}


def test_a_set_that_overrides_an_arm_is_caught(tmp_path):
    args = ["--claims", "b", "--set", "loss.positives=same_label"]
    with pytest.raises(RuntimeError, match=r"positives.*same_label"):
        resolved_arms(tmp_path, args)


def test_claims_pair_treatment_and_control(tmp_path):
    args = claims.parse(["--data", "d", "--out", str(tmp_path), "--claims", "b,c",
                         "--reference-batch", "32", "--hard-k", "3"])  # fmt: skip
    selected, pairs = claims.planned(args)
    assert pairs == {"b": [("same_caption/b32", "sigmoid/b32")],
                     "c": [("hard_k3/b32", "sigmoid/b32")]}  # fmt: skip
    assert list(selected) == ["same_caption/b32", "sigmoid/b32", "hard_k3/b32"]
    with pytest.raises(ValueError, match="not a multiple of batch size 48"):
        claims.schedule(48, 1000)


def test_t_interval_and_paired_differences():
    mean, low, high = claims.t_interval([0.8, 0.9, 0.7])
    # By hand: mean 0.8, s = 0.1, t_{0.975, 2} = 4.302653: half-width 0.1 * 4.302653 / sqrt(3).
    assert mean == pytest.approx(0.8)
    assert high - mean == pytest.approx(mean - low) == pytest.approx(0.248414, abs=1e-6)
    values = [0.91, 0.95, 0.88, 0.97, 0.9]
    expected = stats.t.interval(0.95, 4, loc=sum(values) / 5, scale=stats.sem(values))
    assert claims.t_interval(values)[1:] == pytest.approx(expected)
    assert all(math.isnan(v) for v in claims.t_interval([0.5])[1:])

    runs = [{"arm": "x", "seed": s, "zeroshot_top1": v} for s, v in ((0, 0.9), (1, 0.8), (2, 0.7))]
    runs += [{"arm": "y", "seed": s, "zeroshot_top1": v} for s, v in ((0, 0.6), (1, 0.6))]
    (diff,) = claims.paired_differences(runs, {"b": [("x", "y")], "c": [("x", "z")]})
    assert diff["seeds"] == [0, 1]  # only the seeds both arms have; no row without a control
    assert diff["deltas"] == pytest.approx([0.3, 0.2])
    t = stats.t.ppf(0.975, 1)
    assert (diff["low"], diff["high"]) == pytest.approx((0.25 - t * 0.05, 0.25 + t * 0.05))
    json.dumps(diff)  # results.json holds it
