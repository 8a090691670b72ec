"""TPU topologies by the names users write, their chips' HBM, and their compile-only devices.

    parse_topology("v5p-64")    -> Topology(v5p, shape=(2, 4, 4))   # 64 TensorCores = 32 chips
    parse_topology("v5e-256")   -> Topology(v5e, shape=(16, 16))    # 256 chips
    parse_topology("v5p:4x4x4") -> Topology(v5p, shape=(4, 4, 4))   # chips per torus dim

Google's accelerator-type names count TensorCores for v4 and v5p (two per chip: v4-8 and
v5p-8 are 4 chips) and chips for v5e and v6e (v5litepod-4 and v6e-4 are 4 chips); see
cloud.google.com/tpu/docs/v4, /v5p, /v5e, /v6e ("TPU versions" and "accelerator types").
A device here is a chip: v4 and v5p are compiled in megacore mode (both TensorCores of a
chip are one jax device), as they run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from vlm_jax.config import UserError


@dataclasses.dataclass(frozen=True)
class Generation:
    name: str  # as in topology names: "v4", "v5p", "v5e", "v6e"
    torus_dims: int  # 3: v4, v5p (3-D torus); 2: v5e, v6e
    cores_in_name: int  # what one chip counts for in "NAME-N": TensorCores (2) or chips (1)
    hbm_gib: int  # HBM per chip, GiB (Cloud TPU docs, "system architecture" of each version)
    device_kind: str  # jax's device_kind of its chips
    accelerator_prefix: str  # gcloud's accelerator type: "v5litepod" in "v5litepod-16"


GENERATIONS = {
    g.name: g
    for g in (
        Generation("v4", 3, 2, 32, "TPU v4", "v4"),
        Generation("v5p", 3, 2, 95, "TPU v5", "v5p"),
        Generation("v5e", 2, 1, 16, "TPU v5 lite", "v5litepod"),
        Generation("v6e", 2, 1, 32, "TPU v6 lite", "v6e"),
    )
}
ALIASES = {"v5litepod": "v5e"}  # gcloud's accelerator type for v5e
VALID_FORMS = (
    "v4-N or v5p-N (N TensorCores = 2 x chips, e.g. v4-128, v5p-64), "
    "v5e-N or v6e-N (N chips, e.g. v5e-256, v6e-256), or chips per torus dim: "
    "v4:AxBxC, v5p:AxBxC (e.g. v5p:4x4x4), v5e:AxB, v6e:AxB (e.g. v6e:16x16)"
)
_NAME = re.compile(r"^(?P<gen>[a-z0-9]+)(?P<sep>[-:])(?P<size>\d+(?:x\d+)*)$")


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as the user wrote it
    generation: Generation
    shape: tuple[int, ...]  # chips per torus dim

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def libtpu_name(self) -> str:
        """The form libtpu's `get_topology_desc` takes: "v5p:2x4x4"."""
        return f"{self.generation.name}:{'x'.join(map(str, self.shape))}"

    @property
    def hbm_bytes(self) -> int:
        return self.generation.hbm_gib * 2**30

    @property
    def accelerator_type(self) -> str:
        """gcloud's name of one slice, as a TPU VM's TPU_ACCELERATOR_TYPE holds it: "v5p-8"."""
        gen = self.generation
        return f"{gen.accelerator_prefix}-{self.chips * gen.cores_in_name}"


def _invalid(name: str, why: str) -> UserError:
    return UserError(f"--topology={name!r} {why}; valid forms: {VALID_FORMS}")


def torus_shape(chips: int, dims: int) -> tuple[int, ...]:
    """Chips per torus dim of a power-of-two slice, as Cloud TPU shapes them: as cubic (square)
    as possible, smaller dims first (32 chips: 2x4x4; 128 chips: 8x16); 4 chips of a 3-D
    torus: 2x2x1 (one host)."""
    if dims == 3 and chips == 4:
        return (2, 2, 1)
    exponent = int(math.log2(chips))
    parts = [exponent // dims + (i >= dims - exponent % dims) for i in range(dims)]
    return tuple(2**p for p in parts)


def parse_topology(name: str) -> Topology:
    """A Topology from "v5p-64" (Google's accelerator-type name) or "v5p:4x4x4"."""
    match = _NAME.match(name.strip().lower())
    gen_name = match and ALIASES.get(match["gen"], match["gen"])
    if not match or gen_name not in GENERATIONS:
        raise _invalid(name, "is not a known TPU topology")
    gen = GENERATIONS[gen_name]
    if match["sep"] == ":":
        shape = tuple(int(s) for s in match["size"].split("x"))
        if len(shape) != gen.torus_dims or min(shape) < 1:
            raise _invalid(name, f"needs {gen.torus_dims} positive dims for {gen.name}")
        return Topology(name, gen, shape)
    count = int(match["size"])
    chips, rest = divmod(count, gen.cores_in_name)
    smallest = 4 if gen.torus_dims == 3 else 1
    if rest or chips < smallest or chips & (chips - 1):
        counts = "TensorCores, 2 per chip" if gen.cores_in_name == 2 else "chips"
        raise _invalid(
            name,
            f"is not a power-of-two slice of at least {smallest} chip(s) ({gen.name}-N counts "
            f"{counts})",
        )
    return Topology(name, gen, torus_shape(chips, gen.torus_dims))


def require_libtpu() -> None:
    """libtpu compiles for TPUs; it is optional (the [tpu] extra), so say how to get it."""
    from vlm_jax.config import require_package

    require_package(
        "libtpu",
        "compiling for a TPU topology (python -m vlm_jax.compile)",
        "pip install 'vlm_jax[tpu]'",
    )


def compile_only_environment(topology: Topology) -> None:
    """What libtpu would read from a TPU VM's metadata, for a host that only compiles (set
    before libtpu loads; values the user set are kept). Without the first two libtpu prints
    warnings ("could not determine TPU accelerator type", "unexpected worker hostname");
    without the third it takes the host-wide /tmp/libtpu_lockfile, and a second process
    loading libtpu meanwhile fails ("ABORTED: ... libtpu multi-process lockfile"). They change
    nothing that is compiled: the topology comes from `get_topology_desc` (same device kinds
    and memory numbers with and without them, also with another generation's type)."""
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", topology.accelerator_type)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no chips here to guard


def topology_devices(topology: Topology, num_slices: int = 1) -> list:
    """The compile-only jax devices (one per chip) of `num_slices` copies of `topology`;
    multi-slice devices carry `slice_index`. Creates nothing on them."""
    require_libtpu()
    compile_only_environment(topology)
    from jax.experimental import topologies

    megacore = {"chip_config_name": "megacore"} if topology.generation.torus_dims == 3 else {}
    desc = topologies.get_topology_desc(
        topology_name=topology.libtpu_name, platform="tpu", num_slices=num_slices, **megacore
    )
    devices = list(desc.devices)
    if len(devices) != topology.chips * num_slices:
        raise RuntimeError(
            f"libtpu gave {len(devices)} devices for {topology.libtpu_name} x {num_slices} "
            f"slice(s); expected one per chip ({topology.chips * num_slices})"
        )
    return devices
