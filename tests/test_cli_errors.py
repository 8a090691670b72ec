"""A user's mistake that a CLI can name ends in one `error:` line naming the bad path or value,
exit status 2 and no traceback, before anything is compiled: a missing data folder or manifest,
a missing checkpoint directory (train's init.*checkpoint keys, evaluate, generate, convert), a
missing tokenizer file and a missing optional package."""

import os
import subprocess
import sys

import pytest

MISSING = "/nonexistent/vlm_jax_test"
NO_SENTENCEPIECE = "import sys; sys.modules['sentencepiece'] = None"  # its import raises
RUN_TRAIN = "import runpy; runpy.run_module('vlm_jax.train', run_name='__main__')"


def train(config: str, *overrides: str) -> list[str]:
    return ["-m", "vlm_jax.train", "--config", f"configs/{config}.py", "--workdir", "{tmp}/run"] + [
        f"--config.{override}" for override in overrides
    ]


SIGLIP_B16 = train("siglip_b16", f"tokenizer.model_path={MISSING}/spiece.model")
CASES = {
    "data_folder": (
        train("digits_folder", f"data.path={MISSING}"),
        f"data.path='{MISSING}' is not a directory",
    ),
    "manifest": (
        train("digits_folder", "data.path={tmp}"),
        "no manifest for split 'train': looked for {tmp}/train.jsonl",
    ),
    "init_checkpoint": (
        train("siglip_shapes", f"init.checkpoint={MISSING}"),
        f"init.checkpoint='{MISSING}': no checkpoint directory at '{MISSING}'",
    ),
    "tokenizer_file": (SIGLIP_B16, f"tokenizer.model_path='{MISSING}/spiece.model' does not exist"),
    "optional_package": (
        ["-c", f"{NO_SENTENCEPIECE}; {RUN_TRAIN}", *SIGLIP_B16[2:]],
        "tokenizer.name='sentencepiece' needs the package 'sentencepiece'",
    ),
    "evaluate_checkpoint": (
        ["-m", "vlm_jax.evaluate", "--config", "configs/siglip_shapes.py", "--workdir", MISSING],
        f"no checkpoints in '{MISSING}'",
    ),
    "evaluate_no_steps": (
        ["-m", "vlm_jax.evaluate", "--config", "configs/siglip_shapes.py", "--workdir", "{tmp}"],
        "no checkpoint in {tmp}/checkpoints (no saved step)",
    ),
    "generate_workdir": (
        ["-m", "vlm_jax.generate", "--workdir", MISSING, "--image", "x.png", "--prompt", "hi"],
        f"--workdir '{MISSING}' is not a training run: expected {MISSING}/config.json",
    ),
    "convert_src": (
        ["-m", "vlm_jax.convert", "--to", "hf", "--src", MISSING, "--out", "{tmp}/hf"],
        f"--src '{MISSING}' does not exist: expected a vlm_jax run directory",
    ),
}


def run_cli(argv: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True)


@pytest.mark.parametrize("case", CASES)
def test_user_mistakes_end_in_one_error_line_and_exit_2(case, tmp_path):
    argv, expected = CASES[case]
    if case == "evaluate_no_steps":
        (tmp_path / "checkpoints").mkdir()
    proc = run_cli([arg.replace("{tmp}", str(tmp_path)) for arg in argv])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert expected.replace("{tmp}", str(tmp_path)) in errors[0]


PLANT_BUG = (
    "import vlm_jax.train.trainer as t\n"
    "def bug(*a, **k): raise ValueError('planted bug in a training step')\n"
    "t.next_global_batch = bug\n"
)
TINY = ["train.total_steps=2", "data.val_size=64", "data.zeroshot_size=64", "train.worker_count=0"]


def test_a_config_error_found_while_building_is_one_error_line(tmp_path):
    """A size the model's own check rejects (found while the state is built) is the config's."""
    argv = train("siglip_shapes", "model.image.num_heads=3", *TINY)
    proc = run_cli([arg.replace("{tmp}", str(tmp_path)) for arg in argv])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "width=128 is not divisible by num_heads=3" in errors[0]


def test_a_crash_while_training_keeps_its_traceback(tmp_path):
    """A ValueError raised once steps run is a bug, not a user mistake: traceback, exit 1."""
    argv = train("siglip_shapes", *TINY)
    code = f"{PLANT_BUG}{RUN_TRAIN}"
    proc = run_cli(["-c", code, *[arg.replace("{tmp}", str(tmp_path)) for arg in argv[2:]]])
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" in proc.stderr and "ValueError: planted bug" in proc.stderr
    assert not any(line.startswith("error:") for line in proc.stderr.splitlines())


HELP_CLIS = {
    "train": "vlm_jax.train.cli",
    "evaluate": "vlm_jax.evaluate.__main__",
    "generate": "vlm_jax.generate",
    "compile": "vlm_jax.compile.__main__",
    "compile.kernel_coverage": "vlm_jax.compile.kernel_coverage",
}


@pytest.mark.parametrize("cmd", HELP_CLIS)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_the_usage_and_exits_0(cmd, flag, capsys, monkeypatch):
    """`--help` is not a flag missing its value: the description and usage on stdout, exit 0,
    whatever else is on the line (nothing is parsed, loaded or compiled)."""
    import importlib

    main = importlib.import_module(HELP_CLIS[cmd]).main
    monkeypatch.setattr(sys, "argv", ["prog", "--config", MISSING, flag])
    with pytest.raises(SystemExit) as exit_:
        main()
    out, err = capsys.readouterr()
    assert exit_.value.code == 0 and not err
    assert f"usage: python -m vlm_jax.{cmd} " in out
    assert len(out.splitlines()) > 2  # the description too, not only the usage line
