"""The shapes world: determinism, disjoint splits, and captions that are true to the pixels.

Truth is checked from the image alone wherever possible: pixels are classified by nearest
palette colour, shapes are connected components, their kind is the best-matching analytic
silhouette (written down here, independently of the PIL drawing code), their size class comes
from their pixel area, and the caption's relation is checked on component bounding boxes.
"""

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from vlm_jax.data import preprocess, shapes

PALETTE = np.asarray(list(shapes.COLOURS.values()), np.float64)  # [C, 3]
COLOUR_NAMES = list(shapes.COLOURS)
NUMBERS = {"a": 1, "one": 1, "two": 2, "three": 3}
GROUP = r"(a|one|two|three) (?:(small|large) )?(\w+) (\w+)"
RELATION = r"(left of|right of|above|below)"
CAPTION = re.compile(rf"^(?:(?:a picture|an image|a photo) of )?{GROUP}(?: {RELATION} {GROUP})?$")
# Silhouettes in units of the shape's half-extent r, (x, y) with y pointing down.
SILHOUETTES = {
    "circle": lambda x, y: x**2 + y**2 <= 1,
    "square": lambda x, y: np.maximum(abs(x), abs(y)) <= 0.8,
    "diamond": lambda x, y: abs(x) + abs(y) <= 1,
    "cross": lambda x, y: (np.minimum(abs(x), abs(y)) <= 0.32) & (np.maximum(abs(x), abs(y)) <= 1),
    "triangle": lambda x, y: (abs(y) <= 0.8) & (abs(x) <= 0.95 * (y + 0.8) / 1.6),
}
AREA = {"circle": np.pi, "square": 2.56, "diamond": 2.0, "cross": 2.1504, "triangle": 1.52}


def singular(noun: str, count: int) -> str:
    kind = noun if count == 1 else {shapes.PLURALS[k]: k for k in shapes.KINDS}.get(noun)
    assert kind in shapes.KINDS, f"{noun!r} is not a kind (count {count})"
    return kind


def parse_caption(caption: str) -> tuple[list[tuple[int, str | None, str, str]], str | None]:
    """Caption -> groups [(count, size or None, colour, kind)] and relation (or None)."""
    match = CAPTION.match(caption)
    assert match, f"caption outside the grammar: {caption!r}"
    parts = match.groups()
    groups = []
    for number, size, colour, noun in (parts[0:4], parts[5:9]):
        if number is not None:
            assert colour in shapes.COLOURS, caption
            groups.append((NUMBERS[number], size, colour, singular(noun, NUMBERS[number])))
    return groups, parts[4]


def find_shapes(image: np.ndarray) -> list[dict]:
    """Connected components of pixels that clearly have one palette colour; center: of the box."""
    pixels = image.astype(np.float64)
    distance = np.linalg.norm(pixels[:, :, None] - PALETTE, axis=-1)  # [H, W, C]
    nearest = distance.argmin(-1)
    core = distance.min(-1) < 45
    found = []
    for c, name in enumerate(COLOUR_NAMES):
        labels, count = ndimage.label(core & (nearest == c), structure=np.ones((3, 3)))
        for component in range(1, count + 1):
            mask = labels == component
            if mask.sum() < 4:
                continue
            ys, xs = np.nonzero(mask)
            box = (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1)
            center = ((box[0] + box[1]) / 2, (box[2] + box[3]) / 2)
            found.append({"colour": name, "mask": mask, "center": center, "box": box})
    return found


def best_kind(mask: np.ndarray, center: tuple[float, float], radius: float) -> str:
    """The silhouette at (center, radius) with the highest IoU with the component's pixels."""
    ys, xs = np.mgrid[: mask.shape[0], : mask.shape[1]] + 0.5
    x, y = (xs - center[0]) / radius, (ys - center[1]) / radius

    def iou(kind):
        ideal = SILHOUETTES[kind](x, y)
        return (ideal & mask).sum() / (ideal | mask).sum()

    return max(SILHOUETTES, key=iou)


def check_caption_true(record: dict, image_size: int) -> None:
    """Everything the caption says is visible in the image (and agrees with the metadata)."""
    groups, relation = parse_caption(record["caption"])
    found = find_shapes(record["image"])
    assert sum(count for count, *_ in groups) == len(found) == record["num_shapes"]
    centers = record["shape_center"][: len(found)]
    radii = record["shape_radius"][: len(found)]
    for shape in found:
        # The metadata shape at this component; the component's kind and size from pixels.
        i = int(np.argmin(np.linalg.norm(centers - np.asarray(shape["center"]), axis=1)))
        assert np.linalg.norm(centers[i] - shape["center"]) < 1.0
        shape["kind"] = best_kind(shape["mask"], tuple(centers[i]), radii[i])
        area_radius = np.sqrt(shape["mask"].sum() / AREA[shape["kind"]])
        shape["size"] = "small" if area_radius < 0.14 * image_size else "large"
        assert COLOUR_NAMES[record["shape_colour"][i]] == shape["colour"]
        assert shapes.KINDS[record["shape_kind"][i]] == shape["kind"]
        assert shapes.SIZES[record["shape_size"][i]] == shape["size"]
    members = []
    for count, size, colour, kind in groups:
        member = [s for s in found if (s["colour"], s["kind"]) == (colour, kind)]
        assert len(member) == count, (record["caption"], [(s["colour"], s["kind"]) for s in found])
        assert size is None or all(s["size"] == size for s in member), record["caption"]
        members.append(member)
    if relation is not None:
        assert relation_visible(relation, *members), record["caption"]


def relation_visible(relation: str, group_a: list[dict], group_b: list[dict]) -> bool:
    """For every (a, b) pair: bounding boxes fully apart along the relation's axis, and box
    centres offset more along that axis than across it."""
    axis, sign = {"left of": (0, 1), "right of": (0, -1), "above": (1, 1), "below": (1, -1)}[
        relation
    ]
    for a in group_a:
        for b in group_b:
            a_low, a_high = a["box"][2 * axis : 2 * axis + 2]
            b_low, b_high = b["box"][2 * axis : 2 * axis + 2]
            offset = np.subtract(b["center"], a["center"])
            apart = a_high <= b_low if sign > 0 else b_high <= a_low
            if not (apart and sign * offset[axis] > abs(offset[1 - axis])):
                return False
    return True


WORLD = shapes.World(image_size=96, caption_variation=0.5)


@pytest.mark.parametrize("split", ["train", "val", "zeroshot"])
def test_captions_true_to_pixels(split):
    for index in range(40):
        record = shapes.make_record(WORLD, split, index)
        check_caption_true(record, WORLD.image_size)


def corruptions(caption: str) -> list[str]:
    """Captions that each change one fact: a colour, kind, count, size or relation word."""
    other = {"two": "three", "three": "two", "small": "large", "large": "small"}
    other |= {"left": "right", "right": "left", "above": "below", "below": "above"}
    other |= {c: COLOUR_NAMES[(i + 1) % len(COLOUR_NAMES)] for i, c in enumerate(COLOUR_NAMES)}
    kinds = list(shapes.KINDS)
    for i, kind in enumerate(kinds):
        other[kind] = kinds[(i + 1) % len(kinds)]
        other[shapes.PLURALS[kind]] = shapes.PLURALS[kinds[(i + 1) % len(kinds)]]
    words = caption.split(" ")
    return [
        " ".join([*words[:i], other[word], *words[i + 1 :]])
        for i, word in enumerate(words)
        if word in other
    ]


def test_truth_check_catches_false_captions():
    checked = 0
    for index in range(15):
        record = shapes.make_record(WORLD, "train", index)
        for caption in corruptions(record["caption"]):
            with pytest.raises(AssertionError):
                check_caption_true(dict(record, caption=caption), WORLD.image_size)
            checked += 1
    assert checked > 40


def test_flipped_records_stay_true():
    flipped_relations = 0
    for index in range(40):
        record = shapes.make_record(WORLD, "val", index)
        flipped = preprocess.hflip_record(record)
        check_caption_true(flipped, WORLD.image_size)
        flipped_relations += flipped["caption"] != record["caption"]
    assert flipped_relations > 5  # left/right relations were present and mirrored


def test_captions_true_at_default_resolution():
    """At 32 px small shapes are a few pixels wide: colours, counts and relations still hold."""
    world = shapes.World()
    for index in range(60):
        record = shapes.make_record(world, "train", index)
        groups, _ = parse_caption(record["caption"])
        found = find_shapes(record["image"])
        colours = sorted(c for count, _, c, _ in groups for _ in range(count))
        assert sorted(s["colour"] for s in found) == colours, record["caption"]


def test_zeroshot_split_is_single_labelled_shapes():
    names = shapes.classnames(WORLD)
    assert len(names) == len(WORLD.colours) * len(WORLD.kinds) == len(set(names))
    labels = []
    for index in range(2 * len(names)):
        record = shapes.make_record(WORLD, "zeroshot", index)
        groups, relation = parse_caption(record["caption"])
        [(count, _, colour, kind)] = groups
        assert (count, relation) == (1, None)
        assert names[record["label"]] == f"{colour} {kind}"
        labels.append(record["label"])
    assert np.bincount(labels).tolist() == [2] * len(names)  # balanced classes


def test_same_index_same_record():
    first = shapes.make_record(WORLD, "train", 123)
    second = shapes.make_record(WORLD, "train", 123)
    assert first["caption"] == second["caption"]
    np.testing.assert_array_equal(first["image"], second["image"])
    other = shapes.make_record(WORLD, "train", 124)
    assert not np.array_equal(first["image"], other["image"])


def fingerprint(world: shapes.World, split: str, indices) -> list[str]:
    digests = []
    for index in indices:
        record = shapes.make_record(world, split, index)
        digests.append(hashlib.sha256(record["image"].tobytes() + record["caption"].encode()))
    return [d.hexdigest() for d in digests]


def test_same_record_in_another_process():
    code = (
        "from vlm_jax.data import shapes\n"
        "from tests.test_data_shapes import fingerprint\n"
        "print(' '.join(fingerprint(shapes.World(), 'train', [0, 7, 99_999])))\n"
    )
    output = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[1],
    ).stdout.split()
    assert output == fingerprint(shapes.World(), "train", [0, 7, 99_999])


def test_splits_disjoint():
    world = shapes.World()
    keys = {
        split: [shapes.sample_scene(world, split, i).key() for i in range(n)]
        for split, n in (("train", 3000), ("val", 1000), ("zeroshot", 1000))
    }
    assert not set(keys["train"]) & set(keys["val"])
    assert not set(keys["train"]) & set(keys["zeroshot"])
    assert not set(keys["val"]) & set(keys["zeroshot"])
    # Held-out pairs are varied enough for retrieval: mostly distinct scenes and captions.
    captions = [shapes.make_record(world, "val", i)["caption"] for i in range(300)]
    assert len(set(keys["val"])) > 990
    assert len(set(captions)) > 200


def test_collisions_with_held_out_scenes_are_redrawn():
    """In a tiny world first draws often repeat held-out scenes; the split still never does."""
    world = shapes.World(
        image_size=8,
        colours=("red", "blue"),
        kinds=("circle",),
        split_sizes=(("train", 400), ("val", 100), ("zeroshot", 100)),
    )
    held_out = shapes.held_out_keys(world, "train")
    first_draws = [
        shapes._sample_scene_once(world, "train", shapes.scene_rng(world, "train", i, 0), i).key()
        for i in range(400)
    ]
    assert sum(key in held_out for key in first_draws) > 0
    assert not {shapes.sample_scene(world, "train", i).key() for i in range(400)} & held_out


def test_world_rejects_unknown_names():
    with pytest.raises(ValueError, match="magenta.*red, orange"):
        shapes.World(colours=("red", "magenta"))
    with pytest.raises(ValueError, match="relation_prob=1.5 is not a probability"):
        shapes.World(relation_prob=1.5)
    with pytest.raises(ValueError, match="split='test' is not one of: train, val, zeroshot"):
        shapes.make_record(shapes.World(), "test", 0)
    with pytest.raises(IndexError):
        shapes.make_record(shapes.World(), "val", 1000)
