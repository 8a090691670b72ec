"""VQA / instruction data for the "vlm" task: the record contract, its check and encoding, the
pipeline, and one source of such records, VQA over the embedded shapes world.

RECORD CONTRACT. A VQA source is a registered data source (`build_source(config.data, split)`,
see data/sources.py) whose records are dicts with

    image          uint8[H, W, 3] (or what any source may give: encoded bytes, grey, RGBA), or a
                   list of K of them; K is the same for every record of a source
    prompt         str: the text the model reads before the answer, chat template included,
                   with one `<image>` marker per image where that image's visual tokens go; a
                   prompt with no marker gets all K at its front ("<image> " * K + prompt)
    answer         str, not empty: the target (the loss is on its tokens and EOS; evaluation
                   compares the greedy answer with it)
    question_type  optional: a str, or an int indexing the source's `question_types`;
                   evaluation reports `acc_<type>` for each type present (a type named "absent"
                   also gets `absent_false_yes`, one named "caption" `caption_token_acc`)
    id             optional int, carried into the batch for the logs

and, optionally, the source attributes `images_per_record` (K, default 1), `question_types`
(type names) and `blank_colour` (uint8 RGB of the grounding probe's empty canvas; default
NEUTRAL_GREY). A record that breaks the contract is a bad record (reasons bad_image,
bad_prompt, bad_answer): replaced, counted and logged, or fatal with data.on_error="fail", as
every source's. Sources: "shapes_vqa" (below) and "vqa_folder" (data/vqa_folder.py: images with
a JSONL or CSV manifest of prompts and answers). Conversation sources ("llava_json",
"messages_json", "conversation_shards": data/conversations.py) give multi-turn "messages"
instead, and a `record_check(tokenizer, max_len)` of their own that checks them and encodes
them through a chat template (tokens, loss_mask and prefix_len made there, VQAInputs keeps them).

`<image>` is an added special token of whichever tokenizer is configured (`build_vqa_tokenizer`):
one id that encoding never splits, the word tokenizer's own where its vocabulary holds it (as
`vocabulary()` does, so shapes runs keep `model.image_token_id`), else the first id past the
vocabulary.

Model inputs (`VQAInputs`): tokens = prompt + answer + EOS + pad, `prefix_len` = prompt
length (the bidirectional prefix), `loss_mask` = 1 on answer and EOS tokens (the targets), and
images float32[K, S, S, 3], so a batch carries [b, K, S, S, 3] and multi-image prompts need no
format change.

THE SHAPES SOURCE. Questions are generated from the structured scene (`shapes.Scene`), never
from the pixels, so answers are true by construction:

    colour   "what colour is the circle?"                      -> "red"
    shape    "what shape is the blue object?"                  -> "square"
    count    "how many circles are there?"                     -> "two"
    spatial  "is the red circle left of the blue square?"      -> "yes" / "no"
    exists   "is there a red circle?"   (a present object)     -> "yes"
    absent   "is there a green cross?"  (an absent object)     -> "no"
    caption  "describe the image."                             -> the scene's caption

`exists` and `absent` share one template, so only the image tells them apart; the false-"yes"
rate on `absent` is the hallucination probe. Prompts use a chat template with one `<image>`
placeholder ("user: <image> {question} assistant:").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from vlm_jax.data import preprocess, shapes
from vlm_jax.data.packing import PackedRows
from vlm_jax.data.pipeline import batched
from vlm_jax.data.records import (
    SUBSTITUTE,
    BadRecordError,
    BadRecords,
    CheckedSource,
    as_rgb,
    counters,
)
from vlm_jax.data.sources import DATA, DATA_SOURCES, SHAPES, build_source, shapes_world
from vlm_jax.data.tokenizers import Tokenizer, build_tokenizer
from vlm_jax.schema import Key, Schema, resolve

QUESTION_TYPES = ("colour", "shape", "count", "spatial", "exists", "absent", "caption")
IMAGE_PLACEHOLDER = "<image>"
# The empty canvas of a source without `blank_colour`: the middle of the input range (0 after
# preprocess.to_float), an image with no content and no bias toward any colour.
NEUTRAL_GREY = (128, 128, 128)
TEMPLATE = "user: {images} {question} assistant:"
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
ENCODED_FIELDS = ("tokens", "prefix_len", "loss_mask")  # encode_example's (VQAInputs)
_QUESTION_WORDS = ("user", "assistant", "what", "colour", "is", "are", "the", "shape", "object",
                   "objects", "how", "many", "there", "yes", "no", "describe", "image", ".", "?",
                   ":")  # fmt: skip


def vocabulary() -> list[str]:
    """Every word of a prompt, answer or caption, plus the placeholder (for the word tokenizer)."""
    words = set(shapes.vocabulary()) | set(_QUESTION_WORDS) | set(COUNT_WORDS.values())
    return [*sorted(words), IMAGE_PLACEHOLDER]


def _ref(group: tuple[int, str, str, str]) -> str:
    """'the red circle' / 'the red circles'."""
    count, colour, kind, _ = group
    return f"the {colour} {kind if count == 1 else shapes.PLURALS[kind]}"


def _colour(scene, world, rng):
    kinds = [g[2] for g in scene.groups]
    options = [g for g in scene.groups if kinds.count(g[2]) == 1]
    if not options:
        return None
    count, colour, kind, _ = options[rng.integers(len(options))]
    if count == 1:
        return f"what colour is the {kind}?", colour
    return f"what colour are the {shapes.PLURALS[kind]}?", colour


def _shape(scene, world, rng):
    colours = [g[1] for g in scene.groups]
    options = [g for g in scene.groups if colours.count(g[1]) == 1]
    if not options:
        return None
    count, colour, kind, _ = options[rng.integers(len(options))]
    noun = "is the {} object" if count == 1 else "are the {} objects"
    return f"what shape {noun.format(colour)}?", kind


def _count(scene, world, rng):
    kinds = sorted({g[2] for g in scene.groups})
    kind = kinds[rng.integers(len(kinds))]
    total = sum(g[0] for g in scene.groups if g[2] == kind)
    return f"how many {shapes.PLURALS[kind]} are there?", COUNT_WORDS[total]


def _spatial(scene, world, rng):
    if scene.relation is None:
        return None
    first, second, relation = scene.groups[0], scene.groups[1], scene.relation
    if rng.random() < 0.5:  # state it from the other group's side
        first, second, relation = second, first, shapes.INVERSE_RELATION[relation]
    if rng.random() < 0.5:
        return f"is {_ref(first)} {relation} {_ref(second)}?", "yes"
    false = [r for r in shapes.RELATIONS if r != relation]
    return f"is {_ref(first)} {false[rng.integers(len(false))]} {_ref(second)}?", "no"


def _exists(scene, world, rng):
    _, colour, kind, _ = scene.groups[rng.integers(len(scene.groups))]
    return f"is there a {colour} {kind}?", "yes"


def _absent(scene, world, rng):
    present = {(g[1], g[2]) for g in scene.groups}
    options = [(c, k) for c in world.colours for k in world.kinds if (c, k) not in present]
    colour, kind = options[rng.integers(len(options))]
    return f"is there a {colour} {kind}?", "no"


def _caption(scene, world, rng):
    return "describe the image.", shapes.describe(scene)


_GENERATORS = {
    "colour": _colour,
    "shape": _shape,
    "count": _count,
    "spatial": _spatial,
    "exists": _exists,
    "absent": _absent,
    "caption": _caption,
}


def make_question(
    scene: shapes.Scene,
    world: shapes.World,
    types: Sequence[str],
    rng: np.random.Generator,
    first_choice: str | None = None,
) -> tuple[str, str, str]:
    """(question type, question, answer) for `scene`; `first_choice` is tried first, then a
    random type of `types` that applies to the scene (every scene has count/exists/caption)."""
    order = [types[i] for i in rng.permutation(len(types))]
    if first_choice is not None:
        order.remove(first_choice)
        order.insert(0, first_choice)
    for kind in order:
        qa = _GENERATORS[kind](scene, world, rng)
        if qa is not None:
            return kind, *qa
    raise ValueError(f"no question of types {tuple(types)} applies to scene {scene}")


SHAPES_VQA = SHAPES | Schema(
    {
        "question_types": Key(
            tuple,
            QUESTION_TYPES,
            "the question types asked",
            valid=lambda types: bool(types) and all(t in QUESTION_TYPES for t in types),
            expect=f"a non-empty tuple, each one of: {', '.join(QUESTION_TYPES)}",
        )
    }
)


@DATA_SOURCES.register("shapes_vqa", schema=SHAPES_VQA)
class ShapesVQASource:
    """One question per scene of the shapes world's `split` ("train" or "val").

    Train records draw a random applicable type; held-out records cycle through the types
    (record i asks type i mod T where it applies), so per-type accuracies are balanced.
    Record: {"image": uint8[S, S, 3], "prompt": str, "answer": str, "question_type": int
    (index into QUESTION_TYPES), "caption": str, "id": int}. The grounding probe's blank
    canvas is the world's background.
    """

    question_types = QUESTION_TYPES
    blank_colour = shapes.BACKGROUND
    images_per_record = 1

    def __init__(self, config: ml_collections.ConfigDict, split: str):
        self.world = shapes_world(config)
        self.split = split
        self.types = tuple(resolve("data", config, DATA).question_types)
        self.length = self.world.split_size(split)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        scene = shapes.sample_scene(self.world, self.split, index)
        rng = np.random.default_rng([self.world.seed, shapes.SPLIT_IDS[self.split], index, 7])
        cycle = None if self.split == "train" else self.types[index % len(self.types)]
        kind, question, answer = make_question(scene, self.world, self.types, rng, cycle)
        return {
            "image": shapes.render(scene, self.world),
            "prompt": TEMPLATE.format(images=IMAGE_PLACEHOLDER, question=question),
            "answer": answer,
            "question_type": QUESTION_TYPES.index(kind),
            "caption": shapes.describe(scene),
            "id": index,
        }

    def __repr__(self) -> str:  # Grain checks it on restore
        return f"ShapesVQASource(split={self.split!r}, types={self.types}, world={self.world})"


def encode_example(
    tokenizer: Tokenizer, prompt: str, answer: str | None, max_len: int
) -> dict[str, np.ndarray]:
    """{"tokens": int32[L], "prefix_len": int32[], "loss_mask": int32[L]}; answer None: the
    prompt alone (for generation)."""
    prompt_ids = tokenizer.encode(prompt)  # each <image> one id (build_vqa_tokenizer)
    answer_ids = [] if answer is None else [*tokenizer.encode(answer), tokenizer.eos_id]
    ids = prompt_ids + answer_ids
    if len(ids) > max_len:
        raise ValueError(
            f"tokenizer.max_len={max_len} is too short for {len(ids)} tokens: {prompt!r} {answer!r}"
        )
    tokens = np.full((max_len,), tokenizer.pad_id, np.int32)
    tokens[: len(ids)] = ids
    loss_mask = np.zeros((max_len,), np.int32)
    loss_mask[len(prompt_ids) : len(ids)] = 1
    return {"tokens": tokens, "prefix_len": np.int32(len(prompt_ids)), "loss_mask": loss_mask}


def build_vqa_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
    """`config.tokenizer` -> its tokenizer with `<image>` as an added special token."""
    return build_tokenizer(config, special_tokens=(IMAGE_PLACEHOLDER,))


def run_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
    """The tokenizer a run's model reads: a "vlm" model's with `<image>` added
    (`build_vqa_tokenizer`), any other model's as `config.tokenizer` configures it."""
    if config.model.name == "vlm":
        return build_vqa_tokenizer(config.tokenizer)
    return build_tokenizer(config.tokenizer)


def image_token_id(tokenizer: Tokenizer) -> int:
    """The id of `<image>` in a tokenizer made by `build_vqa_tokenizer`."""
    if IMAGE_PLACEHOLDER not in tokenizer.special_tokens:
        raise ValueError(
            f"the tokenizer has no {IMAGE_PLACEHOLDER!r} special token; build it with "
            "vlm_jax.data.vqa.build_vqa_tokenizer(config.tokenizer)"
        )
    return tokenizer.special_tokens[IMAGE_PLACEHOLDER]


def images_per_record(source: Any) -> int:
    """K, the images of each record of a VQA source (its `images_per_record`, default 1)."""
    return int(getattr(source, "images_per_record", 1))


def blank_colour(source: Any) -> tuple[int, int, int]:
    """The grounding probe's empty canvas for a VQA source (its `blank_colour`, or grey)."""
    return tuple(getattr(source, "blank_colour", NEUTRAL_GREY))


def question_type_name(source: Any, record: dict) -> str:
    """A record's question type as a name ("" when it has none): a str as it is, an int
    through the source's `question_types`."""
    kind = record.get("question_type")
    if kind is None or isinstance(kind, str):
        return kind or ""
    return source.question_types[int(kind)]


def with_image_markers(prompt: str, num_images: int) -> str:
    """`prompt` with one `<image>` per image: as it is when it has `num_images` of them, all in
    front when it has none; BadRecordError("bad_prompt") for any other count."""
    count = prompt.count(IMAGE_PLACEHOLDER)
    if count == 0:
        return " ".join([IMAGE_PLACEHOLDER] * num_images + [prompt]).strip()
    if count != num_images:
        raise BadRecordError(
            "bad_prompt", f"{count} {IMAGE_PLACEHOLDER} markers for {num_images} images: {prompt!r}"
        )
    return prompt


class VQARecordCheck:
    """A record of the contract -> {"image": K arrays uint8[H, W, 3], "prompt" with its K
    markers, "answer" stripped, the rest as it is}; BadRecordError (bad_image, bad_prompt,
    bad_answer) when it breaks the contract."""

    def __init__(self, images_per_record: int, max_aspect_ratio: float):
        self.images_per_record = images_per_record
        self.max_aspect_ratio = max_aspect_ratio

    def __call__(self, record: dict) -> dict:
        images = record.get("image")
        images = list(images) if isinstance(images, list | tuple) else [images]
        if len(images) != self.images_per_record:
            detail = f"{len(images)} images; the source has {self.images_per_record} per record"
            raise BadRecordError("bad_image", detail)
        prompt, answer = record.get("prompt"), record.get("answer")
        if not isinstance(prompt, str):
            raise BadRecordError("bad_prompt", f"prompt is a {type(prompt).__name__}, not a str")
        if not isinstance(answer, str) or not answer.strip():
            raise BadRecordError("bad_answer", f"answer {answer!r} is not a non-empty str")
        return {
            **record,
            "image": [as_rgb(image, self.max_aspect_ratio) for image in images],
            "prompt": with_image_markers(prompt, self.images_per_record),
            "answer": answer.strip(),
        }


def checked_vqa_source(
    config: ml_collections.ConfigDict, split: str, tokenizer: Tokenizer | None = None
) -> CheckedSource:
    """The VQA source `config.data` names, for `split`, its records checked (bad ones replaced,
    counted and logged, or raising, per data.on_error): by `VQARecordCheck`, or by the source's
    own `record_check(tokenizer, max_len)` where it has one (conversation sources, which
    encode their records there: data/conversations.py; its `check_first(source)` runs now)."""
    data = resolve("data", config.data, DATA)
    source = build_source(data, split)
    if hasattr(source, "record_check"):
        tokenizer = tokenizer or build_vqa_tokenizer(config.tokenizer)
        check = source.record_check(tokenizer, config.tokenizer.max_len)
        check.check_first(source)
    else:
        check = VQARecordCheck(images_per_record(source), data.max_aspect_ratio)
    return CheckedSource(source, check, BadRecords(data.on_error, vqa_where(config, split)))


def vqa_where(config: ml_collections.ConfigDict, split: str) -> str:
    return f"data.source={config.data.source!r} split={split!r}"


def held_out_records(
    config: ml_collections.ConfigDict, split: str, count: int
) -> tuple[Any, list[dict]]:
    """(the source of `split`, its first `count` good records, checked): evaluation data, each
    record once (a bad record's slot, refilled by the next good record, is left out)."""
    checked = checked_vqa_source(config, split)
    records = []
    for index in range(len(checked)):
        if len(records) == count:
            break
        record = checked[index]
        if not record[SUBSTITUTE]:
            records.append(record)
    return checked.source, records


class VQAInputs(grain.transforms.Map):
    """Checked record -> {"image": float32[K, S, S, 3], "tokens", "prefix_len", "loss_mask"
    (encoded here, or by the record check where a record holds them already), "id" (when the
    record has one), and the `records.COUNTERS` the record has}."""

    def __init__(self, tokenizer: Tokenizer, max_len: int, image_size: int):
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.image_size = image_size

    def map(self, record: dict) -> dict:
        images = [preprocess.fit_image(image, self.image_size) for image in record["image"]]
        if ENCODED_FIELDS[0] in record:
            example = {key: record[key] for key in ENCODED_FIELDS}
        else:
            example = encode_example(
                self.tokenizer, record["prompt"], record["answer"], self.max_len
            )
        example["image"] = preprocess.to_float(np.stack(images))
        if "id" in record:
            example["id"] = np.int64(record["id"])
        return example | counters(record)


def build_vqa_pipeline(
    config: ml_collections.ConfigDict,
    tokenizer: Tokenizer,
    split: str,
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    shuffle: bool = True,
    seed: int = 0,
    num_epochs: int | None = None,
    worker_count: int = 0,
    worker_buffer_size: int = 1,
    packing: bool = False,
) -> grain.IterDataset:
    """Per-process VQA batches of the source `config.data` names; the iterator supports
    get_state/set_state (Grain). Records are checked against the contract (`VQARecordCheck`).
    `packing`: several examples per row (data/packing.py), K = the source's images per row."""
    checked = checked_vqa_source(config, split, tokenizer)
    pack = None
    if packing:
        budgets = dict(
            max_len=config.tokenizer.max_len,
            max_images=images_per_record(checked.source),
            image_token_id=image_token_id(tokenizer),
            pad_id=tokenizer.pad_id,
        )
        pack = lambda stream: PackedRows(stream, **budgets)
    return batched(
        checked,
        [VQAInputs(tokenizer, config.tokenizer.max_len, config.data.image_size)],
        batch_size=batch_size,
        process_index=process_index,
        process_count=process_count,
        shuffle=shuffle,
        seed=seed,
        num_epochs=num_epochs,
        worker_count=worker_count,
        worker_buffer_size=worker_buffer_size,
        name=vqa_where(config, split),
        pack=pack,
    )
