"""Conversation sources (LLaVA JSON, `messages` JSON, their array_record shards) over real photos
(scikit-image's samples as JPEG files): prompts through a chat template, loss on assistant
tokens only (token by token against transformers' assistant mask), the supervision check, long
sequences, bad records, and a tiny VLM trained on them through the CLI."""

import json
import shutil
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from compile_cache import compilation_cache  # noqa: F401 (autouse: a resume compiles again)
from conftest import TINY_VLM, tiny_vlm_config
from PIL import Image
from skimage import data as photos
from test_tokenizers_hf import bpe_release, reference

from vlm_jax.data import write_shards
from vlm_jax.data.conversations import SupervisionMismatch, TemplateNotIncremental
from vlm_jax.data.pipeline import default_data_config
from vlm_jax.data.records import SUBSTITUTE, BadRecordError, RecordError
from vlm_jax.data.sources import build_source
from vlm_jax.data.vqa import build_vqa_pipeline, build_vqa_tokenizer, checked_vqa_source
from vlm_jax.train.cli import main as train_main

PHOTOS = {
    "astronaut.jpg": (photos.astronaut, "an astronaut in a white suit"),
    "coffee.jpg": (photos.coffee, "a cup of coffee on a saucer"),
    "cat.jpg": (photos.chelsea, "a ginger cat"),
    "rocket.jpg": (photos.rocket, "a rocket on its launch pad"),
}
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>\n' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def human(text):
    return {"from": "human", "value": text}


def gpt(text):
    return {"from": "gpt", "value": text}


def good_rows() -> list[dict]:
    """Captions and multi-turn questions over each photo, and a text-only record."""
    rows = []
    for i, (name, (_, caption)) in enumerate(PHOTOS.items()):
        caption_turns = [human("<image>\nDescribe the image briefly."), gpt(caption)]
        rows.append({"id": f"cap{i}", "image": f"imgs/{name}", "conversations": caption_turns})
        rows.append(
            {
                "id": f"qa{i}",
                "image": f"imgs/{name}",
                "conversations": [
                    human("What is in the picture?\n<image>"),
                    gpt(caption.split(" ", 1)[1]),
                    human("Is it a photo?"),
                    gpt("yes"),
                ],
            }
        )
    rows.append({"id": "text", "conversations": [human("Say hi."), gpt("hi")]})
    return rows


BAD_ROWS = {  # id -> (row, reason)
    "two_markers": (
        {"image": "imgs/cat.jpg", "conversations": [human("<image> <image>"), gpt("a")]},
        "bad_prompt",
    ),
    "no_marker": (
        {"image": "imgs/cat.jpg", "conversations": [human("what?"), gpt("a cat")]},
        "bad_prompt",
    ),
    "missing": (
        {"image": "imgs/gone.jpg", "conversations": [human("<image>"), gpt("a")]},
        "missing_file",
    ),
    "empty_answer": ({"conversations": [human("hi"), gpt("  ")]}, "bad_answer"),
    "ends_on_human": (
        {"conversations": [human("hi"), gpt("hello"), human("bye")]},
        "bad_conversation",
    ),
    "not_a_str": ({"conversations": [human("hi"), gpt(7)]}, "bad_conversation"),
    "too_long": ({"conversations": [human("tell me. " * 40), gpt("no")]}, "long_sequence"),
}


def write_photos(root):
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    for name, (image, _) in PHOTOS.items():
        Image.fromarray(image()).convert("RGB").save(root / "imgs" / name, quality=90)


def write_json(root, name: str, rows: list[dict]) -> str:
    path = root / name
    path.write_text(json.dumps(rows))
    return str(path)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    root = tmp_path_factory.mktemp("conversations")
    write_photos(root)
    return root


@pytest.fixture(scope="module")
def chatml_release(tmp_path_factory):
    """A byte-level BPE release (test_tokenizers_hf) with ChatML's tokens and template."""
    from tokenizers import AddedToken, Tokenizer

    directory = bpe_release(tmp_path_factory.mktemp("hf") / "release")
    backend = Tokenizer.from_file(str(directory / "tokenizer.json"))
    backend.add_special_tokens(
        [AddedToken(t, special=True) for t in ("<|im_start|>", "<|im_end|>")]
    )
    backend.save(str(directory / "tokenizer.json"))
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config |= {"chat_template": CHATML, "eos_token": "<|im_end|>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def release_with_template(release, directory, template: str):
    """A copy of release directory `release` in `directory` with chat template `template`."""
    directory.mkdir(exist_ok=True)
    for file in release.iterdir():
        (directory / file.name).write_bytes(file.read_bytes())
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def conversation_config(path: str, source: str = "llava_json", **data) -> ml_collections.ConfigDict:
    """The tiny VLM of tests/conftest.py on a conversation file, with the byte tokenizer."""
    config = tiny_vlm_config(**{"train.batch_size": "8", "eval.tasks": "()"})
    with config.unlocked():
        config.data = default_data_config(source)
        config.data.update(path=path, image_size=16, flip=False, **data)
        config.tokenizer = ml_collections.ConfigDict({"name": "bytes", "max_len": 128})
        config.model.image_token_id = 260  # the first id past the 260 of the bytes tokenizer
        config.model.lm.vocab_size = 264
    return config


def hf_config(path: str, release, **data) -> ml_collections.ConfigDict:
    config = conversation_config(path, **data)
    with config.unlocked():
        config.tokenizer = ml_collections.ConfigDict(
            {"name": "hf", "path": str(release), "max_len": 128}
        )
    return config


def checked_records(config, split="train") -> list[dict]:
    checked = checked_vqa_source(config, split)
    return [checked[i] for i in range(len(checked))]


def test_llava_json_records_and_the_plain_template(tmp):
    config = conversation_config(write_json(tmp, "good.json", good_rows()))
    source = build_source(config.data, "train")
    assert len(source) == 9 and source.images_per_record == 1
    first = source[0]
    assert first["image"][0].shape == (512, 512, 3) and first["name"] == "cap0"
    assert first["messages"][0] == {
        "role": "user",
        "content": "<image>\nDescribe the image briefly.",
    }
    tokenizer = build_vqa_tokenizer(config.tokenizer)
    records = checked_records(config)
    text = records[-1]  # text-only: one blank slot, no marker
    assert (text["tokens"] == 260).sum() == 0 and text["image"][0].shape == (1, 1, 3)
    for record in records[:-1]:
        assert (record["tokens"] == 260).sum() == 1 and record["truncated_sequences"] == 0
    qa = records[1]
    ids, mask = qa["tokens"].tolist(), qa["loss_mask"].tolist()
    supervised = tokenizer.detokenize_text([i for i, m in zip(ids, mask) if m and i != 1])
    assert supervised == " astronaut in a white suit yes"  # two assistant turns
    end = ids.index(0)
    text_ids = [i for i, m in zip(ids[:end], mask) if not m and i != 260]
    unsupervised = tokenizer.detokenize_text(text_ids)
    assert (
        unsupervised == "user: What is in the picture?\n assistant:user: Is it a photo? assistant:"
    )
    assert [i for i, m in zip(ids, mask) if m].count(1) == 2  # EOS ends each assistant turn
    assert qa["prefix_len"] == mask.index(1) and qa["answer"] == "astronaut in a white suit"


def test_loss_mask_token_by_token_equals_transformers_assistant_mask(tmp, chatml_release):
    """Our tokens and loss mask == transformers' apply_chat_template(return_assistant_tokens_mask)
    on the release's template, for every record (multi-turn, images, text-only)."""
    config = hf_config(write_json(tmp, "good.json", good_rows()), chatml_release)
    expected = assistant_masks(reference(chatml_release), good_rows())
    for row, record, (ids, mask) in zip(good_rows(), checked_records(config), expected):
        assert record["tokens"][: len(ids)].tolist() == ids, row["id"]
        assert record["loss_mask"][: len(ids)].tolist() == mask, row["id"]
        assert not record["loss_mask"][len(ids) :].any() and sum(mask) > 0


def assistant_masks(ref, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(ids, assistant mask) of each llava_json row through transformers' tokenizer `ref`:
    apply_chat_template(return_assistant_tokens_mask=True) on the release's template."""
    roles = {"human": "user", "gpt": "assistant"}
    out = []
    for row in rows:
        messages = [{"role": roles[t["from"]], "content": t["value"]} for t in row["conversations"]]
        expected = ref.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        out.append((expected["input_ids"], expected["assistant_masks"]))
    return out


def test_a_template_that_loses_the_assistant_text_fails_at_build_naming_the_record(
    tmp, chatml_release
):
    path = write_json(tmp, "good.json", good_rows())
    good_turn = "{{ message['content'] + '<|im_end|>\n' }}{% endgeneration"
    broken = CHATML.replace(good_turn, "{{ '<|im_end|>\n' }}{% endgeneration")  # no assistant text
    assert broken != CHATML
    release = release_with_template(chatml_release, tmp / "broken_release", broken)
    shown = r"record id 'cap0'.*decode to \['\\n'\].*turns are \['an astronaut in a white suit'\]"
    with pytest.raises(SupervisionMismatch, match=shown):
        checked_vqa_source(hf_config(path, release), "train")


def test_a_template_that_is_not_incremental_or_missing_is_refused(tmp, chatml_release):
    """The assistant text is the difference of two renders: a template that renders a turn
    differently once more follow it cannot say where the loss goes; a tokenizer without one
    cannot be data.chat_template='tokenizer'."""
    path = write_json(tmp, "good.json", good_rows())
    closing = CHATML + "{% if not add_generation_prompt %}{{ '<|im_end|>' }}{% endif %}"
    release = release_with_template(chatml_release, tmp / "closing_release", closing)
    with pytest.raises(TemplateNotIncremental, match="assistant turn 3"):
        checked_vqa_source(hf_config(path, release), "train")
    with pytest.raises(ValueError, match="no chat template; use one of: llava_v1, plain"):
        checked_vqa_source(conversation_config(path, chat_template="tokenizer"), "train")


def test_the_debug_check_decodes_every_record(tmp):
    """The word tokenizer maps words outside its vocabulary to <unk>: the supervised tokens then
    say something else than the answer. Only records past the first ones: found only with
    data.check_supervision, as an error naming the record and both strings."""
    words = ["user", "assistant", ":", "hi", "is", "it", "red", "?"]
    rows = [{"id": f"r{i}", "conversations": [human("is it red?"), gpt("hi")]} for i in range(9)]
    rows.append({"id": "unknown_word", "conversations": [human("is it red?"), gpt("zebra")]})
    config = conversation_config(write_json(tmp, "words.json", rows))
    with config.unlocked():
        config.tokenizer = ml_collections.ConfigDict(
            {"name": "words", "words": words, "max_len": 16}
        )
        config.model.image_token_id = len(words) + 4
    assert len(checked_records(config)) == 10  # the first 8 are checked only
    config.data.check_supervision = True
    with pytest.raises(RecordError, match=r"record id 'unknown_word'.*\['<unk>'\].*\['zebra'\]"):
        checked_records(config)


def test_long_sequences_truncate_on_the_text_side_or_drop(tmp):
    long_answer = "a long answer " * 10
    rows = [
        {
            "id": "long",
            "image": "imgs/cat.jpg",
            "conversations": [human("<image>\nWhat?"), gpt(long_answer)],
        },
        {
            "id": "late_image",
            "image": "imgs/cat.jpg",
            "conversations": [
                human("hi"),
                gpt(long_answer),
                human("<image> and this?"),
                gpt("a cat"),
            ],
        },
        {"id": "short", "conversations": [human("hi"), gpt("hello")]},
    ]
    config = conversation_config(write_json(tmp, "long.json", rows))
    config.tokenizer.max_len = 64
    checked = checked_vqa_source(config, "train")
    long, short = checked[0], checked[2]
    assert long["truncated_sequences"] == 1 and long["tokens"][-1] != 0
    assert (long["tokens"] == 260).sum() == 1 and long["loss_mask"][-1] == 1
    assert short["truncated_sequences"] == 0 and short["bad_records"] == 0
    assert checked[1][SUBSTITUTE] == 1 and checked.bad.counts == {"long_sequence": 1}
    config.data.long_sequences = "drop"
    dropped = checked_vqa_source(config, "train")
    assert dropped[0][SUBSTITUTE] == 1 and dropped[0]["name"] == "short"
    config.data.on_error = "fail"
    with pytest.raises(BadRecordError, match=r"long_sequence.*id 'long'.*> tokenizer.max_len=64"):
        checked_vqa_source(config, "train")[0]


def test_bad_records_are_counted_by_reason_named_and_nothing_else_is_lost(tmp):
    good = good_rows()
    bad = [{"id": name, **row} for name, (row, _) in BAD_ROWS.items()]
    rows = [row for pair in zip(good, bad) for row in pair] + good[len(bad) :]
    config = conversation_config(write_json(tmp, "bad.json", rows))
    config.tokenizer.max_len = 80
    checked = checked_vqa_source(config, "train")
    records = [checked[i] for i in range(len(checked))]
    reasons = sorted(reason for _, reason in BAD_ROWS.values())
    assert sorted(checked.bad.counts.elements()) == reasons
    kept = [r["name"] for r in records if not r[SUBSTITUTE]]
    assert kept == [row["id"] for row in good]
    tokenizer = build_vqa_tokenizer(config.tokenizer)
    pipeline = build_vqa_pipeline(
        config, tokenizer, "train", batch_size=4, shuffle=False, num_epochs=1
    )
    batches = list(pipeline)
    assert sum(int(b["bad_records"].sum()) for b in batches) == len(BAD_ROWS)
    for name, (_, reason) in BAD_ROWS.items():
        path = write_json(tmp, "one.json", [{"id": name, **BAD_ROWS[name][0]}])
        single = conversation_config(path, on_error="fail")
        single.tokenizer.max_len = 80
        with pytest.raises(BadRecordError, match=rf"{reason}: .*id '{name}'"):
            checked_vqa_source(single, "train")[0]


def test_messages_json_with_several_images_and_content_parts(tmp):
    """The `messages` format: a system turn, content as a str or as parts, up to K images."""
    rows = [
        {
            "id": 1,
            "images": ["imgs/cat.jpg", "imgs/coffee.jpg"],
            "messages": [
                {"role": "system", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [
                        {"type": "image"},
                        {"type": "text", "text": " or "},
                        {"type": "image"},
                        {"type": "text", "text": "?"},
                    ],
                },
                {"role": "assistant", "content": "the cat"},
            ],
        },
        {
            "id": 2,
            "image": "imgs/rocket.jpg",
            "messages": [
                {"role": "user", "content": "<image> what is it?"},
                {"role": "assistant", "content": "a rocket"},
            ],
        },
        {
            "id": 3,
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
            ],
        },
    ]
    config = conversation_config(write_json(tmp, "messages.json", rows), "messages_json")
    config.data.max_images = 2
    records = checked_records(config)
    assert [r["name"] for r in records] == ["1", "2", "3"]
    assert not any(r[SUBSTITUTE] for r in records)
    assert [int((r["tokens"] == 260).sum()) for r in records] == [2, 1, 0]
    assert records[0]["messages"][1]["content"] == "<image> or <image>?"
    assert records[0]["prompt"] == "Be brief. user: <image> or <image>? assistant:"
    tokenizer = build_vqa_tokenizer(config.tokenizer)
    batch = next(iter(build_vqa_pipeline(config, tokenizer, "train", batch_size=3, shuffle=False)))
    assert batch["image"].shape == (3, 2, 16, 16, 3)
    np.testing.assert_array_equal(batch["image"][1, 1], batch["image"][2, 0])  # blank slots
    config.data.max_images = 1
    checked = checked_vqa_source(config, "train")
    assert checked[0]["name"] == "2" and checked.bad.counts == {"bad_image": 1}


def test_array_record_shards_give_the_same_records_and_batches(tmp):
    rows = [*good_rows(), {"id": "missing", **BAD_ROWS["missing"][0]}]
    write_json(tmp, "train.json", rows)
    src, out = str(tmp / "{split}.json"), str(tmp / "shards")
    flags = ["--splits", "train", "--num_shards", "3"]
    write_shards.main(["--conversations", "llava_json", "--src", src, "--out", out, *flags])
    meta = json.loads((tmp / "shards" / "meta.json").read_text())
    assert meta["splits"]["train"] == {"written": 9, "skipped": {"missing_file": 1}}
    direct = conversation_config(write_json(tmp, "good.json", good_rows()))
    sharded = conversation_config(str(tmp / "shards"), "conversation_shards")
    assert len(build_source(sharded.data, "train")) == len(good_rows())
    assert_same_records_and_batches(direct, sharded)


def assert_same_records_and_batches(direct, other) -> None:
    """Config `other`'s source gives config `direct`'s checked records and first batches."""
    for ours, theirs in zip(checked_records(direct), checked_records(other), strict=True):
        assert ours.keys() == theirs.keys()
        for key in ours:
            np.testing.assert_equal(ours[key], theirs[key], err_msg=key)
    tokenizer = build_vqa_tokenizer(direct.tokenizer)
    pipeline = lambda config: iter(build_vqa_pipeline(config, tokenizer, "train", batch_size=4))
    streams = [pipeline(direct), pipeline(other)]
    for _ in range(3):
        first, second = next(streams[0]), next(streams[1])
        for key in first:
            np.testing.assert_array_equal(first[key], second[key], err_msg=key)


def build_conversation_tfds(data_dir, root, rows: list[dict]) -> None:
    """Prepare a TFDS dataset (array_record) in `data_dir` of llava_json `rows`: the turns as
    JSON text, the image files under `root` as encoded images (none: text-only), the row's id."""
    import tensorflow_datasets as tfds

    class TinyConversations(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {
                "id": tfds.features.Text(),
                "conversations": tfds.features.Text(),
                "images": tfds.features.Sequence(tfds.features.Image()),
            }
            return tfds.core.DatasetInfo(  # the rows' order, as the JSON file has them
                builder=self, features=tfds.features.FeaturesDict(features), disable_shuffling=True
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, row in enumerate(rows):
                paths = [row["image"]] if "image" in row else []
                yield (
                    i,
                    {
                        "id": row["id"],
                        "conversations": json.dumps(row["conversations"]),
                        "images": [(root / path).read_bytes() for path in paths],
                    },
                )

    TinyConversations(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def test_a_tfds_dataset_of_the_records_gives_the_same_records_and_batches(tmp):
    build_conversation_tfds(tmp / "tfds", tmp, good_rows())
    direct = conversation_config(write_json(tmp, "good.json", good_rows()))
    tfds_config = conversation_config("", "conversation_tfds")
    with tfds_config.unlocked():
        del tfds_config.data.path
        tfds_config.data.update(
            tfds_name="tiny_conversations",
            tfds_data_dir=str(tmp / "tfds"),
            tfds_splits={"train": "train"},
        )
    source = build_source(tfds_config.data, "train")
    assert [source[i]["name"] for i in range(len(source))] == [r["id"] for r in good_rows()]
    assert_same_records_and_batches(direct, tfds_config)


def cli_args(workdir, path: str, **extra: str) -> list[str]:
    """The trainer CLI on the LLaVA JSON: configs/vlm_shapes.py's tiny VLM (TINY_VLM sizes),
    switched to the llava_json source and the byte tokenizer (plain template); `extra`: more
    overrides ("data.packing": "true" as data__packing="true")."""
    overrides = {
        **TINY_VLM,
        "data.source": "llava_json",
        "data.path": path,
        "data.flip": "false",
        "tokenizer.name": "bytes",
        "tokenizer.max_len": "128",
        "model.image_token_id": "260",
        "model.lm.vocab_size": "264",
        "train.batch_size": "8",
        "train.total_steps": "4",
        "train.log_every": "1",
        "train.checkpoint_every": "2",
        "eval.tasks": "()",
        **{key.replace("__", "."): value for key, value in extra.items()},
    }
    flags = [f"--config.{key}={value}" for key, value in overrides.items()]
    return ["--config", "configs/vlm_shapes.py", "--workdir", str(workdir), *flags]


def read_rows(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_tiny_vlm_trains_on_the_llava_json_through_the_cli_and_resumes_exactly(tmp):
    path = write_json(tmp, "train.json", good_rows())
    full = tmp / "run"
    train_main(cli_args(full, path))
    rows = read_rows(full)
    losses = [row["train/loss"] for row in rows]  # the loss on assistant tokens
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert losses[-1] < losses[0] - 0.5, losses
    config = conversation_config(path)  # the run's data: the same batches
    tokenizer = build_vqa_tokenizer(config.tokenizer)
    batches = iter(build_vqa_pipeline(config, tokenizer, "train", batch_size=8, seed=config.seed))
    for row, batch in zip(rows, batches):
        assert row["train/supervised_tokens"] == batch["loss_mask"][:, 1:].sum() > 0
        assert row["data/bad_records"] == 0 and row["data/truncated_sequences"] == 0

    assert_resumes_exactly(full, tmp / "stopped", cli_args, path)


def numeric(row: dict) -> dict:
    return {key: value for key, value in row.items() if not key.startswith("perf/")}


def assert_resumes_exactly(full, stopped, args, path: str, **extra: str) -> None:
    """A copy of run `full` stopped after its step-2 checkpoint, resumed through the CLI, logs
    every metrics.jsonl row (timings aside) as the uninterrupted run did."""
    shutil.copytree(full, stopped)
    shutil.rmtree(stopped / "checkpoints" / "4")
    train_main(args(stopped, path, **extra))
    assert [numeric(r) for r in read_rows(stopped)] == [numeric(r) for r in read_rows(full)]


@pytest.mark.slow
def test_a_packed_vlm_run_on_the_llava_json_resumes_exactly_through_the_cli(tmp):
    """data.packing=True: rows hold several conversations (the waiting example of a row in
    progress is part of the checkpointed iterator state), and the resumed run logs every row as
    the uninterrupted one, the packing counters included."""
    path = write_json(tmp, "train.json", good_rows())
    full = tmp / "packed_run"
    packing = dict(data__packing="true", data__max_images="2", tokenizer__max_len="192")
    train_main(cli_args(full, path, **packing))  # rows of two photo conversations fit
    rows = read_rows(full)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    config = conversation_config(path, packing=True, max_images=2)  # the run's packed rows
    config.tokenizer.max_len = 192
    tokenizer = build_vqa_tokenizer(config.tokenizer)
    batches = build_vqa_pipeline(
        config, tokenizer, "train", batch_size=8, seed=config.seed, packing=True
    )
    packed = 0  # data/ counters are run totals
    for row, batch in zip(rows, iter(batches)):
        assert row["train/supervised_tokens"] == batch["loss_mask"][:, 1:].sum() > 0
        packed += int(batch["packed_conversations"].sum())
        assert row["data/packed_conversations"] == packed > 8 * row["step"]
    assert_resumes_exactly(full, tmp / "packed_stopped", cli_args, path, **packing)


def test_llava_config_reads_llava_data_as_its_docstring_says():
    """configs/llava.py's documented switch to LLaVA's own JSON (and file evaluators) is a
    valid config: the conversation source's keys replace the folder's."""
    from vlm_jax.config import parse_cli
    from vlm_jax.train.validate import CONFIG, validate_config

    flags = [
        "--config.data.source=llava_json",
        "--config.data.path=/data/llava_v1_5_mix665k.json",
        "--config.data.image_root=/data/llava_images",
        "--config.data.chat_template=llava_v1",
        "--config.eval.tasks=('vqa_file','text_perplexity')",
        "--config.eval.vqa_path=/data/q.jsonl",
        "--config.eval.text_path=/data/t.txt",
    ]
    doc = Path("configs/llava.py").read_text()
    for flag in flags[:4]:
        assert flag.split("=")[0] in doc
    config, _ = parse_cli(["--config", "configs/llava.py:stage2", *flags], CONFIG)
    validate_config(config)
    assert (config.data.source, config.data.chat_template) == ("llava_json", "llava_v1")


def import_hf_towers(root, release) -> tuple[Path, Path]:
    """A tiny random-weight Llama on `release`'s tokenizer (its rows: the tokenizer's ids) and a
    tiny random-weight SigLIP, at TINY_VLM's LM and vision sizes, saved as HF releases and
    converted with `python -m vlm_jax.convert --from hf` -> (the LM run, the SigLIP run)."""
    from vlm_jax.convert import __main__ as convert_cli
    from vlm_jax.convert.torch_compat import ensure_torchvision

    ensure_torchvision()
    import torch
    import transformers

    torch.manual_seed(0)
    size = lambda key: int(TINY_VLM[key])
    lm_release = root / "llama"
    shutil.copytree(release, lm_release)
    llama = transformers.LlamaConfig(
        vocab_size=len(transformers.AutoTokenizer.from_pretrained(release)),
        hidden_size=size("model.lm.width"),
        num_hidden_layers=size("model.lm.depth"),
        num_attention_heads=size("model.lm.num_heads"),
        num_key_value_heads=size("model.lm.num_kv_heads"),
        head_dim=size("model.lm.head_dim"),
        intermediate_size=size("model.lm.mlp_dim"),
        tie_word_embeddings=True,  # as configs/vlm_shapes.py's LM
        bos_token_id=None,
        eos_token_id=None,
    )
    transformers.LlamaForCausalLM(llama).save_pretrained(lm_release)
    tower = dict(
        hidden_size=size("model.image.width"),
        num_hidden_layers=size("model.image.depth"),
        num_attention_heads=size("model.image.num_heads"),
        intermediate_size=size("model.image.mlp_dim"),
    )
    siglip = transformers.SiglipConfig(
        text_config=dict(tower, vocab_size=64, max_position_embeddings=8),
        vision_config=dict(tower, image_size=size("model.image.image_size"), patch_size=4),
    )
    transformers.SiglipModel(siglip).save_pretrained(root / "siglip")
    for name, src in (("lm", lm_release), ("vision", root / "siglip")):
        convert_cli.main(["--from", "hf", "--src", str(src), "--out", str(root / name)])
    return root / "lm", root / "vision"


@pytest.mark.slow
def test_a_vlm_of_imported_hf_towers_trains_on_the_llava_json_generates_and_resumes(
    tmp, chatml_release, capsys
):
    """Issue 15's end to end run on the photos, with a tiny Llama (the ChatML release's
    tokenizer and template) and SigLIP imported through `convert --from hf` as init.lm_checkpoint
    and init.vision_checkpoint: the loss on assistant tokens falls, the supervised tokens logged
    are the batches' loss-mask sums (each batch's mask token by token as transformers' assistant
    mask), `generate --chat` answers, and the run resumes exactly."""
    from vlm_jax import generate
    from vlm_jax.config import parse_cli
    from vlm_jax.data.vqa import run_tokenizer
    from vlm_jax.train.validate import CONFIG

    lm, vision = import_hf_towers(tmp / "imported", chatml_release)
    tokenizer_path = lm / "tokenizer"  # the release's, copied into the converted run
    rows = len(reference(tokenizer_path)) - 1  # the release's ids; <image> is the next one
    pad_id = build_vqa_tokenizer(
        ml_collections.ConfigDict({"name": "hf", "path": str(tokenizer_path)})
    ).pad_id
    imported = dict(
        tokenizer__name="hf",
        tokenizer__path=str(tokenizer_path),
        data__chat_template="tokenizer",
        model__image_token_id=str(rows),
        model__pad_id=str(pad_id),
        model__lm__vocab_size=str(rows + 2),  # <image>, and a row that keeps the vocab even
        init__lm_checkpoint=str(lm),
        init__vision_checkpoint=str(vision),
        optim__lr="1e-2",  # HF's initialisation (std 0.02) starts slower than ours
    )
    path = write_json(tmp, "train.json", good_rows())
    full = tmp / "imported_run"
    train_main(cli_args(full, path, **imported))
    logged = read_rows(full)
    assert [row["step"] for row in logged] == [1, 2, 3, 4]
    losses = [row["train/loss"] for row in logged]  # the loss on assistant tokens
    assert losses[-1] < losses[0] - 0.5, losses

    config, _ = parse_cli(cli_args(full, path, **imported), CONFIG)  # the run's data
    tokenizer = run_tokenizer(config)
    assert tokenizer.special_tokens["<image>"] == rows
    batches = iter(build_vqa_pipeline(config, tokenizer, "train", batch_size=8, seed=config.seed))
    expected = assistant_masks(reference(tokenizer_path), good_rows())
    for row, batch in zip(logged, batches):
        assert row["train/supervised_tokens"] == batch["loss_mask"][:, 1:].sum() > 0
        assert row["data/bad_records"] == 0 and row["data/truncated_sequences"] == 0
        for tokens, mask in zip(batch["tokens"].tolist(), batch["loss_mask"].tolist()):
            (ids, want), *_ = [(i, m) for i, m in expected if tokens[: len(i)] == i]
            assert mask[: len(ids)] == want and not any(mask[len(ids) :])  # token by token

    photo = str(tmp / "imgs" / "cat.jpg")
    generate.main(["--workdir", str(full), "--image", photo, "--prompt", "What is in the picture?",
                   "--chat", "--print_ids", "--max_new_tokens", "6"])  # fmt: skip
    answer = [int(i) for i in capsys.readouterr().out.strip().splitlines()[-1].split(",")]
    assert 0 < len(answer) <= 6 and all(0 <= i < rows for i in answer), answer

    assert_resumes_exactly(full, tmp / "imported_stopped", cli_args, path, **imported)
