"""What a compiled program does between chips, read from its optimized HLO text.

    collectives(hlo_text) -> {"all-gather": {"count": 37, "bytes": 123456}, ...}
    tpu_custom_calls(hlo_text) -> 6   # Pallas kernels lowered through Mosaic
    tpu_kernels(hlo_text) -> {"flash_fwd": 2, "flash_bwd_dkv": 2, "flash_bwd_dq": 2}
    largest_buffers(hlo_text, 5) -> [{"name", "op", "shape", "bytes"}, ...]

Bytes are each op's result per chip (the SPMD program is one chip's view), e.g. an
all-gather's gathered array. `collectives` counts per step: an op inside a loop body (the scan
over layers, a ring loss, gradient-cache chunks) counts once per iteration, by the trip count
XLA annotates on the while loop (`known_trip_count`, which XLA:CPU writes) or, where the loop
carries none (libtpu's optimized programs do not), the count its condition and body spell out:
the counter at tuple index k starts at a constant, the body adds a constant to it and the
condition compares it with a constant (`_inferred_trips`). A loop that fits neither counts
once, and the report's `loops_without_trip_count` says how many there were.
"""

from __future__ import annotations

import re
from collections.abc import Callable

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# `%name = SHAPE op(` or `op-start(` (async pairs; the matching `-done` moves nothing new)
_OP = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.+?)\s+"
    rf"(?P<op>{'|'.join(COLLECTIVES)})(?P<start>-start)?\("
)
_ARRAY = re.compile(r"\b(?P<dtype>pred|[a-z]+\d+[a-z0-9]*)\[(?P<dims>[\d,]*)\]")
_CONTEXT_SCALARS = ("u32", "s32")  # an async start's sync flags: (operands, results, u32[], u32[])


def _array_bytes(dtype: str, dims: str) -> int:
    bits = 8 if dtype == "pred" else int(re.match(r"[a-z]+(\d+)", dtype).group(1))
    count = 1
    for d in filter(None, dims.split(",")):
        count *= int(d)
    return count * max(bits, 8) // 8


def result_bytes(shape: str, start: bool, op: str) -> int:
    """Bytes of an op's result shape. An async all-gather / permute start returns
    (operands, results[, flags]): only the results count."""
    arrays = [(m["dtype"], m["dims"]) for m in _ARRAY.finditer(shape)]
    if start and op != "all-reduce":
        arrays = [a for a in arrays if not (a[1] == "" and a[0] in _CONTEXT_SCALARS)]
        arrays = arrays[len(arrays) // 2 :]
    return sum(_array_bytes(d, s) for d, s in arrays)


# `%name (params) -> shape {` or `ENTRY %name ...{`: a computation's first line
_HEADER = re.compile(r"^(?P<entry>ENTRY\s+)?%(?P<name>[\w.\-]+)\s*\(.*\{\s*$")
_BODY = re.compile(r"\bbody=%(?P<name>[\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(?P<n>\d+)"')
_CALLED = re.compile(
    r"\b(?:to_apply|calls|branch_computations)=\{?(?P<names>%[^}\s,]+(?:,\s*%[^}\s,]+)*)"
)
_OUTSIDE = ""  # lines before any computation header (a bare list of instructions)


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
    """({computation name: its instruction lines}, the ENTRY computation's name)."""
    bodies: dict[str, list[str]] = {_OUTSIDE: []}
    current, entry = _OUTSIDE, _OUTSIDE
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header["name"]
            bodies[current] = []
            entry = current if header["entry"] else entry
        elif line.strip() == "}":
            current = _OUTSIDE
        else:
            bodies[current].append(line)
    return bodies, entry


_CONDITION = re.compile(r"\bcondition=%(?P<name>[\w.\-]+)")
_DEFINITION = re.compile(r"^\s*(?P<root>ROOT\s+)?%(?P<name>[\w.\-]+)\s*=\s*(?P<rest>.*)$")
_CONSTANT = re.compile(r"\bconstant\((?P<value>-?\d+)\)")
_ELEMENT = re.compile(r"\bget-tuple-element\(%[\w.\-]+\), index=(?P<index>\d+)")
_COMPARE = re.compile(
    r"\bcompare\(%(?P<a>[\w.\-]+), %(?P<b>[\w.\-]+)\), direction=(?P<direction>LT|LE|GT|GE)\b"
)
_OPERANDS = re.compile(r"\b(?P<op>tuple|add|while)\((?P<args>[^)]*)\)")
_SWAPPED = {"GT": "LT", "GE": "LE"}  # constant > counter reads as counter < constant


def _definitions(lines: list[str]) -> dict[str, str]:
    """{instruction name: its right-hand side}; the ROOT instruction also under ""."""
    found = {}
    for line in lines:
        match = _DEFINITION.match(line)
        if match:
            found[match["name"]] = match["rest"]
            if match["root"]:
                found[""] = match["rest"]
    return found


def _operands(rest: str | None, op: str) -> list[str]:
    """The operand names of `op(...)` in an instruction's right-hand side ([] if not that op)."""
    match = _OPERANDS.search(rest or "")
    if not match or match["op"] != op:
        return []
    args = re.sub(r"/\*.*?\*/", "", match["args"])
    return [a.strip().lstrip("%") for a in args.split(",") if a.strip()]


_FORWARD = re.compile(r"\s(?:copy|bitcast|copy-done|convert)\(%(?P<name>[\w.\-]+)\)")


def _constant(rest: str | None, definitions: dict[str, str] | None = None) -> int | None:
    """The integer a scalar constant holds, through copies (libtpu copies a loop's initial
    counter) when `definitions` are given; None for anything else."""
    for _ in range(8):
        match = _CONSTANT.search(rest or "")
        if match and " constant(" in f" {rest}":
            return int(match["value"])
        forward = _FORWARD.search(f" {rest}") if definitions is not None else None
        if not forward:
            return None
        rest = definitions.get(forward["name"])
    return None


def _element(rest: str | None) -> int | None:
    match = _ELEMENT.search(rest or "")
    return int(match["index"]) if match else None


Definitions = Callable[[str], dict[str, str]]  # computation name -> its `_definitions`


def _inferred_trips(line: str, caller: dict[str, str], definitions: Definitions) -> int | None:
    """A while loop's trip count from its condition, body and initial tuple, when they spell
    out a counted loop (as lax.scan / fori_loop lower): the condition's ROOT compares tuple
    element k with a constant, the loop's initial tuple holds a constant at k, and the body's
    ROOT tuple holds element k plus a constant. None for anything else."""
    condition, body = _CONDITION.search(line), _BODY.search(line)
    if not condition or not body:
        return None
    test = definitions(condition["name"])
    compare = _COMPARE.search(test.get("", ""))
    if not compare:
        return None
    a, b, direction = compare["a"], compare["b"], compare["direction"]
    if _constant(test.get(a)) is not None:  # constant OP counter
        a, b, direction = b, a, _SWAPPED.get(direction)
    index, bound = _element(test.get(a)), _constant(test.get(b))
    if index is None or bound is None or direction not in ("LT", "LE"):
        return None
    init = _operands(caller.get((_operands(line.split("=", 1)[-1], "while") or [""])[0]), "tuple")
    steps = definitions(body["name"])
    out = _operands(steps.get(""), "tuple")
    if len(init) <= index or len(out) <= index:
        return None
    start = _constant(caller.get(init[index]), caller)
    step = [_constant(steps.get(x), steps) for x in _operands(steps.get(out[index]), "add")]
    step = [s for s in step if s is not None]
    if start is None or len(step) != 1 or step[0] <= 0:
        return None
    end = bound + (direction == "LE")
    return max(0, -(-(end - start) // step[0]))


def _callees(
    line: str, caller: dict[str, str], definitions: Definitions
) -> list[tuple[str, int | None]]:
    """(computation, times per execution of `line`) it runs: a while loop's body its trip
    count (XLA's annotation, else `_inferred_trips` from the calling computation's and the
    loop's `_definitions`; None: neither), anything called, applied or branched to once."""
    body = _BODY.search(line)
    if body and " while(" in line:
        trips = _TRIP_COUNT.search(line)
        if trips:
            return [(body["name"], int(trips["n"]))]
        return [(body["name"], _inferred_trips(line, caller, definitions))]
    found = []
    for match in _CALLED.finditer(line):
        found += [(name.strip().lstrip("%"), 1) for name in match["names"].split(",")]
    return found


def executions(hlo_text: str) -> tuple[dict[str, int], int]:
    """({computation: times it runs per execution of the program}, loops without a trip
    count). Instructions outside any computation count as the entry's."""
    return _executions(*_computations(hlo_text))


def _executions(bodies: dict[str, list[str]], entry: str) -> tuple[dict[str, int], int]:
    """`executions` of the parsed program (`_computations`)."""
    times: dict[str, int] = {}
    parsed: dict[str, dict[str, str]] = {}  # per computation, on first use
    unknown = 0

    def definitions(name: str) -> dict[str, str]:
        if name not in parsed:
            parsed[name] = _definitions(bodies.get(name, []))
        return parsed[name]

    def visit(name: str, count: int, depth: int = 0) -> None:
        nonlocal unknown
        if name not in bodies or depth > 64:
            return
        times[name] = times.get(name, 0) + count
        for line in bodies[name]:
            for callee, trips in _callees(line, definitions(name), definitions):
                unknown += trips is None
                visit(callee, count * (1 if trips is None else trips), depth + 1)

    visit(entry, 1)
    if entry != _OUTSIDE:
        visit(_OUTSIDE, 1)
    return times, unknown


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{op: {"count", "bytes"}} per step for every collective kind in COLLECTIVES (zeros
    included); `collective_report` also says how many loops were counted once."""
    return collective_report(hlo_text)[0]


def collective_report(hlo_text: str) -> tuple[dict[str, dict[str, int]], int]:
    """(`collectives`, loops counted once for want of a trip count), the program parsed and
    walked once for both."""
    found = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
    bodies, entry = _computations(hlo_text)
    times, unknown = _executions(bodies, entry)
    for name, lines in bodies.items():
        for line in lines:
            match = _OP.match(line)
            if match and times.get(name, 0):
                entry = found[match["op"]]
                entry["count"] += times[name]
                size = result_bytes(match["shape"], bool(match["start"]), match["op"])
                entry["bytes"] += times[name] * size
    return found, unknown


def tpu_custom_calls(hlo_text: str) -> int:
    """Number of Mosaic kernels (Pallas on TPU) in the program."""
    return hlo_text.count('custom_call_target="tpu_custom_call"')


# a Mosaic kernel's pallas_call name, from its metadata: op_name=".../jvp(flash_fwd)/pallas_call"
_KERNEL = re.compile(r'op_name="[^"]*?(?P<kernel>\w+)\)*/pallas_call"')


def tpu_kernels(hlo_text: str) -> dict[str, int]:
    """{pallas_call name: count} of the Mosaic kernels in the program ("?" where the
    metadata names none)."""
    found: dict[str, int] = {}
    for line in hlo_text.splitlines():
        if 'custom_call_target="tpu_custom_call"' in line:
            match = _KERNEL.search(line)
            name = match["kernel"] if match else "?"
            found[name] = found.get(name, 0) + 1
    return found


# `%name = f32[8,128]{1,0:T(8,128)} op(`: an instruction with an array result
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%(?P<name>[\w.\-]+)\s*=\s*(?P<dtype>pred|[a-z]+\d+[a-z0-9]*)"
    r"\[(?P<dims>[\d,]*)\]\S*\s+(?P<op>[\w\-]+)\("
)
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")
_NO_BUFFER = ("bitcast", "get-tuple-element", "tuple", "constant")  # views, not new buffers


def largest_buffers(hlo_text: str, top: int = 5) -> list[dict]:
    """The `top` largest array results of the program's instructions, by bytes per chip:
    [{"name", "op", "shape": "bf16[4,128]", "bytes"}, ...]. Instructions inside fused
    computations are skipped (a fusion materialises only its result); tuples, views and
    constants too. Tile padding (the layout's T(8,128)) is not counted."""
    found, fused = [], False
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            fused = "fused" in header["name"] or "fusion" in header["name"]
            continue
        match = _INSTRUCTION.match(line)
        if fused or not match or match["op"] in _NO_BUFFER:
            continue
        found.append(
            {
                "name": match["name"],
                "op": match["op"],
                "shape": f"{match['dtype']}[{match['dims']}]",
                "bytes": _array_bytes(match["dtype"], match["dims"]),
            }
        )
    return sorted(found, key=lambda b: -b["bytes"])[:top]
