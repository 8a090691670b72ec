"""An embedded synthetic world: 1-3 coloured shapes on a dark canvas, with true captions.

Every record is a pure function of (world seed, split, index): the scene is sampled from a
NumPy generator seeded by those integers, drawn with PIL at `supersample`x resolution and
box-downsampled (anti-aliasing), and described by a caption generated from the same scene.
So any process or worker that asks for index i gets the same image and caption, and no
download or cache is needed.

A scene is one or two *groups*. A group is `count` identical shapes (colour, kind, size);
two groups differ in (colour, kind) and stand in a spatial relation that holds for every
pair of their shapes: fully apart along the relation's axis, which clearly dominates (so
"left of" is never as much "above"):

    "two small red circles left of a large blue square"

Held-out splits ("val": image-caption pairs for retrieval, "zeroshot": single shapes with a
class label) are disjoint from "train" at the level of the scene: a train (or val) scene
whose description quantised to the output pixel grid equals a held-out one is re-drawn.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

# The full world. Configs pick subsets; indices in record metadata refer to these tuples, so
# they do not change meaning when a config narrows the world.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "orange": (250, 140, 20),
    "yellow": (240, 225, 40),
    "green": (40, 175, 55),
    "cyan": (40, 215, 225),
    "blue": (45, 75, 240),
    "purple": (155, 60, 210),
    "white": (245, 245, 245),
}
KINDS = ("circle", "square", "triangle", "diamond", "cross")
PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "diamond": "diamonds",
    "cross": "crosses",
}
SIZES = ("small", "large")
# Half-extent of a shape as a fraction of the image side, per size class: [low, high).
SIZE_RADIUS = {"small": (0.09, 0.12), "large": (0.16, 0.19)}
RELATIONS = ("left of", "right of", "above", "below")
INVERSE_RELATION = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
}
# Axis of each relation (0: x, 1: y pointing down) and the sign of (B - A) along it.
_AXIS_SIGN = {"left of": (0, 1), "right of": (0, -1), "above": (1, 1), "below": (1, -1)}
NUMBER_WORDS = {1: "a", 2: "two", 3: "three"}
CAPTION_PREFIXES = ("a picture of", "an image of", "a photo of")
# Zero-shot classes are "colour kind"; captions name a size, so the prompt ensemble spans sizes
# (as CLIP's "a photo of a big/small {}") and averages them out.
ZEROSHOT_TEMPLATES = ("a {}", "a small {}", "a large {}", "a picture of a {}")
BACKGROUND = (28, 28, 32)
MAX_SHAPES = 3
SPLIT_IDS = {"train": 0, "val": 1, "zeroshot": 2}
# Held-out splits each split must avoid (priority order: zeroshot, then val, then train).
_AVOIDS = {"zeroshot": (), "val": ("zeroshot",), "train": ("zeroshot", "val")}
# Margins as fractions of the image side: to the border, and between two shapes' boxes.
_BORDER = 0.05
_GAP = 0.04
_DOMINANCE = 1.5
_CANDIDATES = (64, 1024)  # layouts drawn per try in `_place`
_HELD_OUT_LOCK = threading.RLock()  # re-entrant: train's table is built from val's scenes


@dataclasses.dataclass(frozen=True)
class World:
    """What a config chooses about the world; hashable so derived tables can be cached."""

    image_size: int = 32
    colours: tuple[str, ...] = tuple(COLOURS)
    kinds: tuple[str, ...] = KINDS
    seed: int = 0
    supersample: int = 4
    relation_prob: float = 0.6  # probability that a scene has two related groups
    caption_variation: float = 0.25  # train captions: probability of each optional rewording
    split_sizes: tuple[tuple[str, int], ...] = (
        ("train", 1_000_000),
        ("val", 1_000),
        ("zeroshot", 1_000),
    )

    def __post_init__(self):
        for name in ("relation_prob", "caption_variation"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)} is not a probability in [0, 1]")
        if self.image_size < 8 or self.supersample < 1 or self.seed < 0:
            raise ValueError(
                f"need image_size >= 8, supersample >= 1, seed >= 0; got {self.image_size}, "
                f"{self.supersample}, {self.seed}"
            )
        _check_subset("colours", self.colours, tuple(COLOURS))
        _check_subset("kinds", self.kinds, KINDS)
        if len(self.colours) * len(self.kinds) < 2:
            raise ValueError("the shapes world needs at least two (colour, kind) combinations")

    def split_size(self, split: str) -> int:
        sizes = dict(self.split_sizes)
        if split not in sizes:
            raise ValueError(f"split={split!r} is not one of: {', '.join(sizes)}")
        return sizes[split]


def _check_subset(name: str, chosen: Sequence[str], valid: Sequence[str]) -> None:
    bad = [value for value in chosen if value not in valid]
    if bad or not chosen:
        raise ValueError(f"{name}={tuple(chosen)!r}: each must be one of: {', '.join(valid)}")


@dataclasses.dataclass(frozen=True)
class Shape:
    colour: str
    kind: str
    size: str
    center: tuple[float, float]  # (x, y) in output pixels, y pointing down
    radius: float  # half-extent in output pixels


@dataclasses.dataclass(frozen=True)
class Scene:
    """groups[g] = (count, colour, kind, size); shapes are listed group by group."""

    groups: tuple[tuple[int, str, str, str], ...]
    relation: str | None  # groups[0] <relation> groups[1]
    shapes: tuple[Shape, ...]

    def key(self) -> tuple:
        """The scene quantised to the output pixel grid: equal keys look the same."""
        return tuple(
            sorted(
                (s.colour, s.kind, s.size, round(s.center[0]), round(s.center[1]))
                for s in self.shapes
            )
        )


def scene_rng(world: World, split: str, index: int, attempt: int) -> np.random.Generator:
    """A generator that depends only on integers: identical in every process."""
    return np.random.default_rng([world.seed, SPLIT_IDS[split], index, attempt])


def sample_scene(world: World, split: str, index: int) -> Scene:
    """The scene of one record, re-drawn (next attempt) while it collides with a held-out one."""
    if not 0 <= index < world.split_size(split):
        raise IndexError(f"index {index} is out of range for split {split!r}")
    avoid = held_out_keys(world, split)
    attempt = 0
    while True:
        scene = _sample_scene_once(world, split, scene_rng(world, split, index, attempt), index)
        if scene.key() not in avoid:
            return scene
        attempt += 1


def held_out_keys(world: World, split: str) -> frozenset:
    """Keys of every scene in the splits that `split` must not repeat (cached per process;
    the lock keeps Grain's reader threads from each building the same table at once)."""
    with _HELD_OUT_LOCK:
        return _held_out_keys(world, split)


@functools.cache
def _held_out_keys(world: World, split: str) -> frozenset:
    keys = set()
    for other in _AVOIDS[split]:
        keys.update(sample_scene(world, other, i).key() for i in range(world.split_size(other)))
    return frozenset(keys)


def _sample_scene_once(world: World, split: str, rng: np.random.Generator, index: int) -> Scene:
    while True:
        groups, relation = _sample_groups(world, split, rng, index)
        shapes = _place(groups, relation, world.image_size, rng)
        if shapes is not None:
            return Scene(groups, relation, shapes)


def _sample_groups(
    world: World, split: str, rng: np.random.Generator, index: int
) -> tuple[tuple[tuple[int, str, str, str], ...], str | None]:
    """Attributes of the groups: zeroshot scenes are one shape of class `index % classes`."""
    size = SIZES[rng.integers(len(SIZES))]
    if split == "zeroshot":
        colour, kind = class_of_label(world, index % num_classes(world))
        return ((1, colour, kind, size),), None
    first = _pick_attributes(world, rng)
    if rng.random() >= world.relation_prob:
        return ((int(rng.integers(1, MAX_SHAPES + 1)), *first),), None
    second = _pick_attributes(world, rng)
    while second[:2] == first[:2]:
        second = _pick_attributes(world, rng)
    counts = ((1, 1), (1, 2), (2, 1))[rng.integers(3)]
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    return ((counts[0], *first), (counts[1], *second)), relation


def _pick_attributes(world: World, rng: np.random.Generator) -> tuple[str, str, str]:
    colour = world.colours[rng.integers(len(world.colours))]
    kind = world.kinds[rng.integers(len(world.kinds))]
    return colour, kind, SIZES[rng.integers(len(SIZES))]


def _place(
    groups: tuple[tuple[int, str, str, str], ...],
    relation: str | None,
    image_size: int,
    rng: np.random.Generator,
) -> tuple[Shape, ...] | None:
    """The first valid of a batch of random layouts, drawn and checked at once; a larger batch
    if none is (crowded scenes such as three large shapes); None if that fails too."""
    spec = [(g, *group[1:]) for g, group in enumerate(groups) for _ in range(group[0])]
    low, high = np.asarray([SIZE_RADIUS[size] for *_, size in spec]).T  # float[n] each
    group_ids = np.asarray([g for g, *_ in spec])
    for candidates in _CANDIDATES:
        radius = rng.uniform(low, high, (candidates, len(spec))) * image_size  # [K, n]
        lo = radius + _BORDER * image_size
        unit = rng.random((*radius.shape, 2))  # [K, n, 2] position in each shape's free range
        if relation is not None:  # the group that comes first along the axis: first half
            axis, sign = _AXIS_SIGN[relation]
            first_group = 0 if sign > 0 else 1
            unit[..., axis] = 0.5 * unit[..., axis] + np.where(group_ids == first_group, 0, 0.5)
        center = lo[..., None] + unit * (image_size - 2 * lo)[..., None]
        ok = _valid(center, radius, group_ids, relation, _GAP * image_size)  # bool[K]
        if ok.any():
            k = int(np.argmax(ok))
            return tuple(
                Shape(colour, kind, size, tuple(center[k, i].tolist()), float(radius[k, i]))
                for i, (_, colour, kind, size) in enumerate(spec)
            )
    return None


@functools.cache
def _pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(n, 1)


def _valid(
    center: np.ndarray, radius: np.ndarray, group_ids: np.ndarray, relation: str | None, gap: float
) -> np.ndarray:
    """center: float[K, n, 2]; radius: float[K, n] -> bool[K]: boxes `gap` apart; and for
    `group 0 <relation> group 1`: every cross-group pair fully separated along the relation's
    axis, with the offset along it at least `_DOMINANCE` times the offset across it."""
    first, second = _pairs(len(group_ids))  # pairs i < j: [P] each
    delta = center[:, second] - center[:, first]  # [K, P, 2]
    both = radius[:, first] + radius[:, second]  # [K, P]
    ok = (np.abs(delta) >= (both + gap)[..., None]).any(-1).all(-1)
    if relation is None:
        return ok
    axis, sign = _AXIS_SIGN[relation]
    along, across = sign * delta[..., axis], np.abs(delta[..., 1 - axis])  # [K, P]
    holds = (along >= both) & (along >= _DOMINANCE * across)
    within_group = group_ids[first] == group_ids[second]  # [P]; else first is in group 0
    return ok & (holds | within_group).all(-1)


def num_classes(world: World) -> int:
    return len(world.colours) * len(world.kinds)


def class_of_label(world: World, label: int) -> tuple[str, str]:
    """Labels are colour-major: label = colour_index * len(kinds) + kind_index."""
    return world.colours[label // len(world.kinds)], world.kinds[label % len(world.kinds)]


def classnames(world: World) -> list[str]:
    """Zero-shot class names, indexed by the zeroshot split's "label": ["red circle", ...]."""
    return [" ".join(class_of_label(world, label)) for label in range(num_classes(world))]


def render(scene: Scene, world: World) -> np.ndarray:
    """Draw at `supersample`x and box-downsample: uint8[S, S, 3], anti-aliased."""
    scale = world.supersample
    canvas = Image.new("RGB", (world.image_size * scale,) * 2, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for shape in scene.shapes:
        cx, cy = shape.center[0] * scale, shape.center[1] * scale
        _draw_shape(draw, shape.kind, cx, cy, shape.radius * scale, COLOURS[shape.colour])
    return np.asarray(canvas.reduce(scale), np.uint8)


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill):
    """Every kind fits the box [c - r, c + r]^2 and spans at least 1.5 r along each axis."""
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "square":
        h = 0.8 * r
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif kind == "triangle":
        half_base = 0.95 * r
        draw.polygon(
            [(cx, cy - 0.8 * r), (cx + half_base, cy + 0.8 * r), (cx - half_base, cy + 0.8 * r)],
            fill=fill,
        )
    elif kind == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif kind == "cross":
        w = 0.32 * r
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:
        raise ValueError(f"kind={kind!r} is not one of: {', '.join(KINDS)}")


def describe(scene: Scene, rng: np.random.Generator | None = None, variation: float = 0.0) -> str:
    """A true caption. With `rng`, optional rewordings each apply with probability `variation`:
    drop a size word, "one" for "a", a "a picture of" prefix, or state the relation from the
    other group ("B right of A"). Without `rng` the caption is canonical (a function of the
    scene's description, which is what retrieval over held-out pairs needs)."""

    def maybe() -> bool:
        return rng is not None and rng.random() < variation

    phrases = [_group_phrase(group, drop_size=maybe(), one=maybe()) for group in scene.groups]
    if scene.relation is None:
        text = phrases[0]
    elif maybe():
        text = f"{phrases[1]} {INVERSE_RELATION[scene.relation]} {phrases[0]}"
    else:
        text = f"{phrases[0]} {scene.relation} {phrases[1]}"
    if maybe():
        text = f"{CAPTION_PREFIXES[rng.integers(len(CAPTION_PREFIXES))]} {text}"
    return text


def _group_phrase(group: tuple[int, str, str, str], drop_size: bool, one: bool) -> str:
    count, colour, kind, size = group
    number = "one" if count == 1 and one else NUMBER_WORDS[count]
    noun = kind if count == 1 else PLURALS[kind]
    words = [number] + ([] if drop_size else [size]) + [colour, noun]
    return " ".join(words)


def vocabulary() -> list[str]:
    """Every word a caption or zero-shot prompt of the full world can contain, sorted."""
    words = set(COLOURS) | set(KINDS) | set(PLURALS.values()) | set(SIZES)
    words |= set(NUMBER_WORDS.values()) | {"one"}
    for phrase in (*RELATIONS, *CAPTION_PREFIXES, *ZEROSHOT_TEMPLATES):
        words |= set(phrase.replace("{}", " ").split())
    return sorted(words)


def metadata(scene: Scene) -> dict[str, np.ndarray]:
    """Fixed-size numeric description (padded to MAX_SHAPES with -1) so records batch."""
    n = len(scene.shapes)
    pad = MAX_SHAPES - n
    group_of = [g for g, group in enumerate(scene.groups) for _ in range(group[0])]

    def column(values: list[int]) -> np.ndarray:
        return np.asarray(values + [-1] * pad, np.int32)

    centers = np.full((MAX_SHAPES, 2), -1.0, np.float32)
    centers[:n] = [s.center for s in scene.shapes]
    radii = np.full((MAX_SHAPES,), -1.0, np.float32)
    radii[:n] = [s.radius for s in scene.shapes]
    colour_names = list(COLOURS)
    return {
        "num_shapes": np.int32(n),
        "shape_colour": column([colour_names.index(s.colour) for s in scene.shapes]),
        "shape_kind": column([KINDS.index(s.kind) for s in scene.shapes]),
        "shape_size": column([SIZES.index(s.size) for s in scene.shapes]),
        "shape_group": column(group_of),
        "shape_center": centers,
        "shape_radius": radii,
        "relation": np.int32(-1 if scene.relation is None else RELATIONS.index(scene.relation)),
    }


def make_record(world: World, split: str, index: int) -> dict:
    """{"image": uint8[S, S, 3], "caption": str, "id": int, ["label": int], **metadata}."""
    scene = sample_scene(world, split, index)
    if split == "train":
        caption_rng = np.random.default_rng([world.seed, SPLIT_IDS[split], index, 2**31])
        caption = describe(scene, caption_rng, world.caption_variation)
    else:
        caption = describe(scene)
    record = {"image": render(scene, world), "caption": caption, "id": index}
    if split == "zeroshot":
        record["label"] = index % num_classes(world)
    record.update(metadata(scene))
    return record
