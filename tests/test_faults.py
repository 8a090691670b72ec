"""Fault summary: inject each fault the framework promises to survive, through the entry points
a run uses, and print a table of fault -> what happened (shown even without `pytest -s`).

Every row is an injection made and checked here, in-process. The faults that need whole
training processes have their own tests: SIGTERM / repeated SIGKILL and resume compared with
an uninterrupted run (tests/test_preemption.py), a multi-process run preempted on one process
(tests/test_multihost.py), NaN batches under both policies (tests/test_numerics.py).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_contrastive_config
from test_bad_input import (
    IMAGE_SIZE,
    TOKENIZER,
    folder_config,
    pixels,
    png_bytes,
    write_folder,
)
from test_checkpoint_integrity import DAMAGE, resume, save_steps, state_at
from test_config_fuzz import INVALID, no_compile
from test_numerics import guarded_step

from vlm_jax.checkpoint import Checkpointer
from vlm_jax.config import parse_cli
from vlm_jax.data import build_pipeline, records
from vlm_jax.train import numerics, trainer


@dataclass
class Fault:
    name: str
    expected: str
    inject: Callable  # (tmp_path, monkeypatch) -> observed outcome (str); raises if mishandled


def folder_batches(root, **data) -> list[dict]:
    stream = build_pipeline(
        folder_config(root, **data), TOKENIZER, "train", batch_size=2, num_epochs=1,
        shuffle=False, drop_remainder=False,
    )  # fmt: skip
    return [{k: np.asarray(v) for k, v in batch.items()} for batch in stream]


def one_bad_row(tmp_path, image: bytes | None = None, caption: str = "bad one") -> list[dict]:
    """A folder of 4 good rows and row 1 replaced by `image`/`caption`; its batches."""
    files = {f"{i}.png": png_bytes(pixels((9, 9, 3), i)) for i in range(4)}
    files["bad.png"] = image if image is not None else files["1.png"]
    rows = [{"image": f"imgs/{i}.png", "caption": f"good {i}"} for i in range(4)]
    rows[1] = {"image": "imgs/bad.png", "caption": caption}
    write_folder(tmp_path / "data", rows, files)
    return tmp_path / "data"


def summed(batches: list[dict], key: str) -> int:
    return sum(int(b[key].sum()) for b in batches)


def corrupt_image(tmp_path, _):
    batches = folder_batches(one_bad_row(tmp_path, b"\x89PNG\r\n\x1a\n cut short"))
    ids = [int(i) for b in batches for i in b["id"]]
    assert 1 not in ids and len(ids) == 4 and summed(batches, "bad_records") == 1
    return "record id=1 replaced by the next good one, counted (bad_records=1)"


def grey_and_rgba_images(tmp_path, _):
    root = one_bad_row(tmp_path, png_bytes(pixels((9, 9, 4))))  # RGBA
    (root / "imgs" / "0.png").write_bytes(png_bytes(pixels((9, 9))))  # grey
    batches = folder_batches(root)
    assert all(b["image"].shape[1:] == (IMAGE_SIZE, IMAGE_SIZE, 3) for b in batches)
    assert summed(batches, "bad_records") == 0
    return "converted to RGB, kept"


def empty_caption(tmp_path, _):
    batches = folder_batches(one_bad_row(tmp_path, caption="   "))
    assert 1 not in [int(i) for b in batches for i in b["id"]]
    assert summed(batches, "bad_records") == 1
    return "record id=1 dropped, logged, counted"


def long_caption(tmp_path, _):
    root = one_bad_row(tmp_path, caption="long " * 40)
    truncated = summed(folder_batches(root), "truncated_captions")
    bad = summed(folder_batches(root, long_captions="bad"), "bad_records")
    assert (truncated, bad) == (1, 1)
    return "truncated and counted; or a bad record (data.long_captions='bad')"


def tokenizer_failure(tmp_path, _):
    batches = folder_batches(one_bad_row(tmp_path, caption="a # b"))  # the tokenizer raises
    assert summed(batches, "bad_records") == 1
    return "bad record (tokenizer_error), replaced, counted"


def bad_record_in_fail_mode(tmp_path, _):
    root = one_bad_row(tmp_path, b"not an image")
    with pytest.raises(records.BadRecordError, match="undecodable_image.*id=1") as info:
        folder_batches(root, on_error="fail")
    return f"BadRecordError: {str(info.value)[:60]}..."


def source_shorter_than_batch(tmp_path, _):
    root = one_bad_row(tmp_path)
    with pytest.raises(ValueError, match="4 records") as info:
        build_pipeline(folder_config(root), TOKENIZER, "train", batch_size=16)
    return f"error at build time: {str(info.value)[:60]}..."


def nonfinite_gradients(tmp_path, _):
    old, (state, out) = guarded_step(np.nan)
    assert float(out[numerics.FLAG]) == 1.0
    same = jax.tree.map(np.array_equal, old.params, state.params)
    assert all(jax.tree.leaves(same))
    return "update skipped (params, opt state kept), flagged in the step"


def bf16_overflow(tmp_path, _):
    _, (_, out) = guarded_step(1e38, jnp.bfloat16)
    assert float(out[numerics.FLAG]) == 1.0
    return "caught before the update"


def bad_config(overrides: dict, pattern: str) -> Callable:
    def inject(tmp_path, monkeypatch):
        no_compile(monkeypatch)
        argv = ["--config", "configs/siglip_shapes.py", "--workdir", str(tmp_path)]
        argv += [f"--config.{k}={v}" for k, v in overrides.items()]
        with pytest.raises(ValueError, match=pattern) as info:
            config, _ = parse_cli(argv)
            trainer.train(config, tmp_path / "run")
        return f"rejected before compile: {str(info.value)[:60]}..."

    return inject


def workdir_of_another_experiment(tmp_path, monkeypatch):
    no_compile(monkeypatch)
    config = tiny_contrastive_config()
    other = json.loads(trainer.to_json(config))
    other["seed"] = 7
    (tmp_path / "config.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="different experiment.*seed: 7"):
        trainer.train(config, tmp_path)
    return "refused, naming the differing keys"


def checkpoint_of_another_model(tmp_path, _):
    ckpt = Checkpointer(tmp_path, async_save=False)
    state = {"params": {"img": {"kernel": jnp.ones((2, 3))}}, "step": jnp.int32(1)}
    ckpt.save(1, state, None, {"step": 1}, force=True)
    other = {"img": {"kernel": jax.ShapeDtypeStruct((2, 5), jnp.float32)}}
    with pytest.raises(ValueError, match=r"img/kernel: checkpoint \(2, 3\) vs model \(2, 5\)"):
        ckpt.restore_params(None, other)
    ckpt.close()
    return "refused, naming img/kernel (2, 3) vs (2, 5)"


def damaged_newest_checkpoint(damage: str) -> Callable:
    def inject(tmp_path, _):
        save_steps(tmp_path)
        DAMAGE[damage](tmp_path / "2")
        state, step, _ = resume(tmp_path)
        assert step == 1 and (tmp_path / "2.corrupt").is_dir()
        np.testing.assert_array_equal(state["params"]["w"], state_at(1)["params"]["w"])
        return "logged, moved to 2.corrupt, resumed from intact step 1"

    return inject


def save_killed_mid_write(tmp_path, _):
    save_steps(tmp_path)
    shutil.copytree(tmp_path / "2", tmp_path / "3.orbax-checkpoint-tmp")  # what a kill leaves
    (tmp_path / "3.orbax-checkpoint-tmp" / "state" / "_METADATA").unlink()
    _, step, _ = resume(tmp_path)
    assert step == 2
    return "reported as cut off, resumed from step 2"


CONFIG_FAULTS = {
    "unknown config key": INVALID[0],
    "wrong value type": INVALID[1],
    "invalid choice": INVALID[3],
    "mesh product != devices": INVALID[9],
    "batch not divisible by data axes": INVALID[12],
}
FAULTS = [
    Fault("corrupt image bytes", "skipped, counted, logged", corrupt_image),
    Fault("grey / RGBA image", "converted", grey_and_rgba_images),
    Fault("empty caption", "skipped, logged, counted", empty_caption),
    Fault("over-long caption", "truncated or bad, counted", long_caption),
    Fault("tokenizer raises", "skipped, counted", tokenizer_failure),
    Fault("bad record, on_error=fail", "error naming the record", bad_record_in_fail_mode),
    Fault("source shorter than batch", "error before training", source_shorter_than_batch),
    Fault("NaN in gradients", "update skipped", nonfinite_gradients),
    Fault("bf16 overflow", "update skipped", bf16_overflow),
    *[Fault(name, "rejected before compile", bad_config(*c)) for name, c in CONFIG_FAULTS.items()],
    Fault("workdir of another run", "refused", workdir_of_another_experiment),
    Fault("checkpoint of another model", "refused naming params", checkpoint_of_another_model),
    *[
        Fault(
            f"newest checkpoint: {damage}",
            "older intact step used",
            damaged_newest_checkpoint(damage),
        )
        for damage in ("truncated array chunk", "changed bytes in array chunk", "deleted meta")
    ],
    Fault("save killed mid-write", "previous step used", save_killed_mid_write),
]


# After a failed read, Orbax's async machinery may report into its already closed event loop.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_fault_summary_table(tmp_path, monkeypatch, capsys):
    rows, failed = [], []
    for number, fault in enumerate(FAULTS):
        directory = tmp_path / str(number)
        directory.mkdir()
        try:
            with monkeypatch.context() as patch:
                observed, ok = fault.inject(directory, patch), "ok"
        except Exception as e:
            observed, ok = f"{type(e).__name__}: {e}"[:90], "FAILED"
            failed.append(fault.name)
        rows.append((fault.name, fault.expected, observed, ok))
    with capsys.disabled():
        print("\n" + table(("fault injected", "expected", "observed", ""), rows))
    assert not failed, f"faults not handled as promised: {failed}"


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in [header, *rows]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)
