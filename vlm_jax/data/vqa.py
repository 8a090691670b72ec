"""VQA and captioning over the embedded shapes world; answers are true by construction.

Questions are generated from the structured scene (`shapes.Scene`), never from the pixels:

    colour   "what colour is the circle?"                      -> "red"
    shape    "what shape is the blue object?"                  -> "square"
    count    "how many circles are there?"                     -> "two"
    spatial  "is the red circle left of the blue square?"      -> "yes" / "no"
    exists   "is there a red circle?"   (a present object)     -> "yes"
    absent   "is there a green cross?"  (an absent object)     -> "no"
    caption  "describe the image."                             -> the scene's caption

`exists` and `absent` share one template, so only the image tells them apart; the false-"yes"
rate on `absent` is the hallucination probe. Prompts use a chat template with one `<image>`
placeholder per image ("user: <image> {question} assistant:"); a batch carries images as
[b, K, S, S, 3] so multi-image prompts need no format change.

Model inputs (`VQAInputs`): tokens = prompt + answer + EOS + pad, `prefix_len` = prompt
length (the bidirectional prefix), `loss_mask` = 1 on answer and EOS tokens (the targets).
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import ml_collections
import numpy as np

from vlm_jax.data import preprocess, shapes
from vlm_jax.data.pipeline import batched
from vlm_jax.data.records import BadRecords, CheckedSource, check_image, counters
from vlm_jax.data.sources import DATA, DATA_SOURCES, SHAPES, shapes_world
from vlm_jax.data.tokenizers import Tokenizer
from vlm_jax.schema import Key, Schema, resolve

QUESTION_TYPES = ("colour", "shape", "count", "spatial", "exists", "absent", "caption")
IMAGE_PLACEHOLDER = "<image>"
TEMPLATE = "user: {images} {question} assistant:"
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
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
    (index into QUESTION_TYPES), "caption": str, "id": int}.
    """

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


def image_token_id(tokenizer: Tokenizer) -> int:
    """The id of `<image>` in a word tokenizer built with `vocabulary()`."""
    ids = getattr(tokenizer, "ids", {})
    if IMAGE_PLACEHOLDER not in ids:
        raise ValueError(
            f"the tokenizer has no {IMAGE_PLACEHOLDER!r} token; use tokenizer.name='words' with "
            "words=vlm_jax.data.vqa.vocabulary()"
        )
    return ids[IMAGE_PLACEHOLDER]


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Prompt ids with each `<image>` placeholder as one image token (the tokenizer's word
    splitter would cut it into '<', 'image', '>')."""
    parts = prompt.split(IMAGE_PLACEHOLDER)
    ids = tokenizer.encode(parts[0])
    for part in parts[1:]:
        ids += [image_token_id(tokenizer), *tokenizer.encode(part)]
    return ids


def encode_example(
    tokenizer: Tokenizer, prompt: str, answer: str | None, max_len: int
) -> dict[str, np.ndarray]:
    """{"tokens": int32[L], "prefix_len": int32[], "loss_mask": int32[L]}; answer None: the
    prompt alone (for generation)."""
    prompt_ids = encode_prompt(tokenizer, prompt)
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


class VQAInputs(grain.transforms.Map):
    """Record -> {"image": float32[1, S, S, 3], "tokens", "prefix_len", "loss_mask",
    "question_type", "id", and the `records.COUNTERS` the record has}."""

    def __init__(self, tokenizer: Tokenizer, max_len: int, image_size: int):
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.image_size = image_size

    def map(self, record: dict) -> dict:
        image = preprocess.to_float(preprocess.fit_image(record["image"], self.image_size))
        example = encode_example(self.tokenizer, record["prompt"], record["answer"], self.max_len)
        example["image"] = image[None]
        example["question_type"] = np.int32(record["question_type"])
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
) -> grain.IterDataset:
    """Per-process VQA batches; the iterator supports get_state/set_state (Grain). Records are
    checked as in `build_pipeline` (images only: prompts and answers are made here)."""
    where = f"data.source={config.data.source!r} split={split!r}"
    bad = BadRecords(resolve("data", config.data, DATA).on_error, where)
    return batched(
        CheckedSource(ShapesVQASource(config.data, split), check_image, bad),
        [VQAInputs(tokenizer, config.tokenizer.max_len, config.data.image_size)],
        batch_size=batch_size,
        process_index=process_index,
        process_count=process_count,
        shuffle=shuffle,
        seed=seed,
        num_epochs=num_epochs,
        worker_count=worker_count,
        name=where,
    )
