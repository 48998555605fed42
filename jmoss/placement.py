"""The placement plan: which weights stay resident, which are streamed each token, and from where.

Batch-1 decode of an offloaded model is bound by the bytes that must move per token (anchors §0.1,
§4.5), so the plan is a small, exact piece of arithmetic over the store's groups (``embed``, one
group per layer, ``head``; see ``jmoss.layout``) and the budgets the user gave. It is
pure Python and deterministic: the same inputs always give the same plan, `jmoss info` prints it,
and the streaming engine allocates exactly what it says.

Tiers
-----
- ``device``: resident where the compute runs (GPU memory on cuda; RAM on cpu: when every group is
  resident in fp16, the store's pages mapped read-only, i.e. the page cache, billed in full).
- ``host``  : (cuda only) pinned host RAM; the group crosses PCIe once per token.
- ``disk``  : read from the store file each token. On cuda the read lands in pinned host staging
  buffers and is then copied to the device; on cpu it lands directly in the device staging slots
  (pread + posix_fadvise(DONTNEED), so the OS page cache never becomes hidden residency).
- ``cpu``   : (cuda, offload "cpu") pinned host RAM, *computed by the CPU kernels* for every forward
  of fewer than ``cpu_min_rows`` rows (decode, short prompt chunks); larger prompt chunks copy it
  to the device like ``host``. Its KV cache lives in host RAM (float32, what the kernels read).
- ``pages`` : (cuda, offload "cpu") like ``cpu`` where the host budget is short: computed from the
  store's mapped pages (the OS keeps what fits in its page cache), read like ``disk`` for large chunks.

Offload modes (cuda): what happens to the groups the card cannot hold
---------------------------------------------------------------------
``stream`` copies them to the device every token (tiers host/disk). ``cpu`` computes them on the
CPU (tiers cpu/pages), as llama.cpp's partial offload does: batch-1 decode then reads those weights
at the CPU's memory speed instead of the link's, and a prompt chunk of ``cpu_min_rows`` or more rows
(batch x tokens) streams them, because the CPU's cost grows with the rows and the link's does not.
``auto`` plans both and keeps the one with the higher predicted decode tok/s at the planned batch,
from ``Figures`` (measured at load: pinned H2D GB/s, the CPU kernels' probe, the device's
bandwidth); ``Plan.reason`` says why and ``Plan.predicted_tok_s`` holds both predictions. The
threshold is the smallest row count at which copying those groups beats computing them on the CPU.

What the device budget pays for (everything jmoss allocates, nothing else)
--------------------------------------------------------------------------
resident weights + static KV cache (of the layers the device computes) + working buffers +
``prefetch_depth`` staging slots + the hand-off buffer (offload cpu) + a fixed runtime reserve
(``RUNTIME_RESERVE``). The host side of an offload-cpu plan pays, from ``host_memory``, for the
cpu-tier weights, the KV cache of the CPU-computed layers, the CPU's working buffers, the pinned
hand-off buffer and the disk staging of pages-tier groups (``host_total_bytes``).

A slot holds what the engine allocates for it
(``slot_allocation``): on cpu one buffer the size of the largest streamed group; on cuda one set of
Vars per layout streamed through it ("layer", "head"), so a slot that streams the head holds a
layer set *and* a head set. The engines allocate exactly ``Plan.slot_layouts`` per slot. On cuda the
CUDA context and library handles (~300-500 MiB, owned by the driver) are *not* in the budget: when
you give ``device_memory`` for a 12 GB card, leave room for them (say 11GiB); when you give
``None``, the caller passes the free memory it measured after the context exists.

The embedding table stays on the host (an mmap of the store): decode needs one row per token, so
only ``n_embd * itemsize`` bytes move per token instead of a 1.3 GB table occupying the device
(anchors §0.5a). It counts against no budget: the OS pages in the rows that are touched.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import numpy as np

from jmoss.config import MossConfig
from jmoss.errors import BudgetError, ContextLengthError, DeviceError
from jmoss.layout import EMBED, HEAD, Group, all_groups, embed_row_bytes, group_nbytes, head_bits, linear_shapes, packed_bits
from jmoss.model import dequant_transient_bytes
from jmoss.sizes import GiB, MiB, format_gb, format_size

Tier = Literal["device", "host", "disk", "cpu", "pages"]

DEVICES = ("cpu", "cuda")
OFFLOAD_MODES = ("auto", "cpu", "stream")
CPU_TIERS = ("cpu", "pages")  # computed by the CPU kernels (below the plan's row threshold)

# llama.cpp's GGML_OP_OFFLOAD_MIN_BATCH: the row threshold used when the figures to derive one are missing.
DEFAULT_CPU_MIN_ROWS = 32
# A stated, not measured, cost per hand-off between backends (a device sync plus a small copy).
HANDOFF_LATENCY_S = 50e-6

# Fixed reserve inside the device budget, per device kind: allocator rounding and fragmentation
# in Jittor's caching allocator, the cuBLAS workspace, rotary tables, masks and other small
# tensors. On cpu it also covers the tokenizer and per-request Python objects. It does NOT cover
# the CUDA context or the Python/Jittor process image, which exist before any weight is loaded.
RUNTIME_RESERVE = {"cuda": 256 * MiB, "cpu": 128 * MiB}

DEFAULT_KV_DTYPE = {"cuda": "float16", "cpu": "float32"}
# Dtype of activations (hidden states, MLP intermediate) in the working buffers.
ACTIVATION_DTYPE = {"cuda": "float16", "cpu": "float32"}
DTYPE_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}

DEFAULT_PREFILL_CHUNK = 512


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one store group lives and how many bytes it has."""

    group: Group
    where: Tier
    nbytes: int

    @property
    def name(self) -> str:
        return f"layer {self.group}" if isinstance(self.group, int) else str(self.group)


@dataclasses.dataclass(frozen=True)
class Figures:
    """The speeds an offload choice is made from: decimal GB/s, GFLOP/s and TFLOP/s.

    ``link_gbps``: pinned host-to-device copies (cuda_runtime's probe). ``cpu_gbps``: the CPU
    kernels reading weights of the store's format at one row (a decode GEMV probe); ``cpu_gflops``:
    the same kernels' rate at many rows (a GEMM probe): the CPU's cost of a chunk of rows is the
    larger of the two bounds. ``device_gbps``: the device's memory bandwidth (its resident layers'
    decode); ``device_tflops`` (optional): its compute, for large chunks; ``disk_gbps`` (optional):
    the store's disk, for disk- and pages-tier groups. ``source`` says where they came from.
    """

    link_gbps: float | None = None
    cpu_gbps: float | None = None
    cpu_gflops: float | None = None
    device_gbps: float | None = None
    device_tflops: float | None = None
    disk_gbps: float | None = None
    source: str = "stated"

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "source" or value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise BudgetError(f"figures: {field.name} must be a positive number (GB/s, GFLOP/s or TFLOP/s), "
                                  f"got {value!r}")

    @property
    def comparable(self) -> bool:
        """Enough to predict both modes' decode: the link, the CPU kernels and the device."""
        return bool(self.link_gbps and self.cpu_gbps and self.device_gbps)

    def describe(self) -> str:
        parts = [f"{label} {value:.4g} {unit}" for label, value, unit in (
            ("link", self.link_gbps, "GB/s"), ("CPU kernels", self.cpu_gbps, "GB/s"),
            ("CPU kernels", self.cpu_gflops, "GFLOP/s"), ("device", self.device_gbps, "GB/s"),
            ("device", self.device_tflops, "TFLOP/s"), ("disk", self.disk_gbps, "GB/s")) if value]
        return f"{', '.join(parts) or 'no speeds'} ({self.source})"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A complete, inspectable memory plan for one model on one device.

    All sizes are bytes. ``placements`` lists every group in execution order (embed, layers,
    head). ``budget_bytes`` is the device budget the plan was checked against (the user's
    ``device_memory``, or the measured free memory when that was None).
    """

    device: str
    device_memory: int | None
    host_memory: int | None
    budget_bytes: int | None
    placements: tuple[Placement, ...]
    embed_location: str
    embed_row_bytes: int
    kv_bytes: int
    kv_dtype: str
    max_seq_len: int
    batch: int
    prefill_chunk: int
    work_bytes: int
    work_breakdown: dict[str, int]
    reserve_bytes: int
    prefetch_depth: int
    staging_slot_bytes: int  # the largest streamed group: a flat buffer (cpu slot, pinned host staging)
    host_staging_bytes: int
    minimum_device_bytes: int
    notes: tuple[str, ...] = ()
    # device bytes of one staging slot by layout (see slot_allocation); empty when nothing streams
    slot_layouts: dict[str, int] = dataclasses.field(default_factory=dict)
    # offload (cuda): "stream" copies what the card cannot hold every token, "cpu" computes it on the CPU
    offload: str = "stream"
    offload_requested: str = "auto"
    # offload cpu: forwards of at least this many rows (batch x tokens) stream the cpu/pages groups
    # to the device; fewer rows compute them on the CPU. None: the CPU computes them always.
    cpu_min_rows: int | None = None
    host_kv_bytes: int = 0  # KV cache of the CPU-computed layers (host RAM, float32)
    host_work_bytes: int = 0  # the CPU kernels' working buffers (host RAM)
    handoff_host_bytes: int = 0  # pinned buffer the hidden state crosses through (host side)
    handoff_device_bytes: int = 0  # device buffer it lands in (device side)
    figures: Figures | None = None
    predicted_tok_s: dict[str, float] = dataclasses.field(default_factory=dict)  # decode, at ``batch``, by mode
    reason: str = ""

    # ---- derived totals -------------------------------------------------------------------
    def _sum(self, where: Tier) -> int:
        return sum(p.nbytes for p in self.placements if p.where == where and p.group != EMBED)

    @property
    def device_slot_bytes(self) -> int:
        """Device bytes of one staging slot: every layout's buffers the engine allocates for it."""
        return sum(self.slot_layouts.values())

    @property
    def staging_bytes(self) -> int:
        """Device bytes of the staging slots streamed groups are copied into."""
        return self.prefetch_depth * self.device_slot_bytes

    @property
    def resident_bytes(self) -> int:
        """Weight bytes resident on the device."""
        return self._sum("device")

    @property
    def host_bytes(self) -> int:
        """Weight bytes held in pinned host memory (cuda only): streamed (host) and CPU-computed (cpu)."""
        return self._sum("host") + self._sum("cpu")

    @property
    def mapped_bytes(self) -> int:
        """Weight bytes the CPU computes from the store's mapped pages (pages tier)."""
        return self._sum("pages")

    @property
    def cpu_bytes_per_token(self) -> int:
        """Weight bytes the CPU kernels read per decode token below the row threshold (cpu and pages tiers)."""
        return self._sum("cpu") + self._sum("pages")

    @property
    def hybrid(self) -> bool:
        """Whether the CPU computes some groups (offload "cpu"): the engine runs two backends."""
        return any(p.where in CPU_TIERS for p in self.placements)

    @property
    def cpu_layers(self) -> list[int]:
        """Layers the CPU computes below the row threshold (their KV cache is in host RAM)."""
        return [p.group for p in self.placements if p.where in CPU_TIERS and isinstance(p.group, int)]

    @property
    def n_layers(self) -> int:
        return sum(1 for p in self.placements if isinstance(p.group, int))

    @property
    def disk_bytes_per_token(self) -> int:
        """Weight bytes read from the store on disk per decode token."""
        return self._sum("disk")

    @property
    def streamed_bytes_per_token(self) -> int:
        """Bytes that move to the device per decode token at batch 1: every non-resident group,
        plus the one embedding row gathered on the host."""
        return self._sum("host") + self._sum("disk") + (self.embed_row_bytes if self.embed_location != "device" else 0)

    @property
    def device_total_bytes(self) -> int:
        """Everything jmoss allocates on the device under this plan."""
        return (self.resident_bytes + self.kv_bytes + self.work_bytes + self.staging_bytes + self.reserve_bytes
                + self.handoff_device_bytes)

    @property
    def host_total_bytes(self) -> int:
        """Host memory jmoss allocates for the plan (cuda): pinned weights (host and cpu tiers), disk
        staging and, with offload cpu, the CPU side's KV cache, working buffers and hand-off buffer."""
        return (self.host_bytes + self.host_staging_bytes + self.host_kv_bytes + self.host_work_bytes
                + self.handoff_host_bytes)

    @property
    def streams(self) -> bool:
        """Whether any weight group (the host-gathered embedding aside) lives off the device: an
        engine must move it there each token or, with offload cpu, compute it on the CPU."""
        return any(p.where != "device" for p in self.placements if p.group != EMBED)

    def groups_on(self, where: Tier) -> list[Group]:
        return [p.group for p in self.placements if p.where == where]

    @property
    def resident_layers(self) -> list[int]:
        return [g for g in self.groups_on("device") if isinstance(g, int)]

    # ---- speed bound ----------------------------------------------------------------------
    def tokens_per_second_bound(self, link_gbps: float | None = None, disk_gbps: float | None = None) -> float | None:
        """Upper bound on batch-1 decode tok/s from the bytes moved per token, assuming perfect
        overlap of disk reads, copies and compute (so the slowest stream sets the pace).

        On cuda, every streamed byte crosses the link (``link_gbps``, decimal GB/s) and disk-tier
        bytes are also read from disk (``disk_gbps``). On cpu only the disk reads count. Returns
        None when nothing relevant was given; ``inf`` when nothing is streamed.
        """
        times = []
        if self.device == "cuda" and link_gbps:
            times.append(self.streamed_bytes_per_token / (link_gbps * 1e9))
        disk = self.disk_bytes_per_token
        if disk_gbps and (self.device == "cpu" or disk):
            times.append(disk / (disk_gbps * 1e9))
        if not times:
            return None
        worst = max(times)
        return math.inf if worst == 0 else 1.0 / worst

    # ---- presentation ---------------------------------------------------------------------
    def describe(self, link_gbps: float | None = None, disk_gbps: float | None = None) -> str:
        """A human-readable table for ``jmoss info``: tiers (runs of layers compressed), the device
        memory bill (and the host's, with offload cpu), bytes moved per token, the offload choice
        and why, the predicted decode tok/s of each mode and, if link/disk speeds are given, the
        streaming bound."""
        budget = "none (all resident)" if self.device_memory is None else format_size(self.device_memory)
        lines = [f"placement plan: device {self.device}, device budget {budget}"]
        if self.device == "cuda":
            host = "unlimited" if self.host_memory is None else format_size(self.host_memory)
            lines[0] += f", host budget {host}"
            if self.streams:
                lines.append(f"offload: {self.offload} (asked {self.offload_requested})"
                             + (f": {self.reason}" if self.reason else ""))
                if self.hybrid:
                    lines.append("  " + self.threshold_text())
        lines.append("")
        lines.append(f"  {'group':<14}{'tier':<8}{'size':>10}")
        for label, where, nbytes in _runs(self.placements):
            extra = ""
            if label == EMBED:
                extra = f"  (mmap of the store; {format_size(self.embed_row_bytes)} row per token)"
            elif where == "cpu":
                extra = "  (computed on the CPU from pinned RAM)"
            elif where == "pages":
                extra = "  (computed on the CPU from the store's mapped pages)"
            lines.append(f"  {label:<14}{where:<8}{format_size(nbytes):>10}{extra}")
        lines.append("")
        budget_line = "" if self.budget_bytes is None else f" of {format_size(self.budget_bytes)}"
        lines.append(f"device memory{budget_line}:")
        slots = f"{_count(self.prefetch_depth, 'slot')} x {format_size(self.device_slot_bytes)}"
        if len(self.slot_layouts) > 1:
            slots += " (" + " + ".join(f"{k} {format_size(n)}" for k, n in self.slot_layouts.items()) + ")"
        if self.hybrid and self.prefetch_depth:
            slots += f", for chunks of {self.cpu_min_rows}+ rows"
        kv_why = f"{self.kv_dtype}, {self.max_seq_len} positions x batch {self.batch}"
        if self.hybrid:
            kv_why += f", the {_count(self.n_layers - len(self.cpu_layers), 'layer')} the device computes"
        bill = [
            ("resident weights", self.resident_bytes, _count(len(self.resident_layers), "layer")
             + (" + head" if HEAD in self.groups_on("device") else "")),
            ("KV cache", self.kv_bytes, kv_why),
            ("working buffers", self.work_bytes, f"prefill chunk {self.prefill_chunk}"),
            ("staging", self.staging_bytes, slots if self.prefetch_depth else "none"),
        ]
        if self.handoff_device_bytes:
            bill.append(("hand-off", self.handoff_device_bytes, "where the hidden state from the host lands"))
        bill.append(("runtime reserve", self.reserve_bytes, ""))
        for name, nbytes, why in bill:
            lines.append(f"  {name:<18}{format_size(nbytes):>10}  {why}".rstrip())
        total = f"  {'total':<18}{format_size(self.device_total_bytes):>10}"
        if self.budget_bytes is not None:
            total += f"  ({format_size(self.budget_bytes - self.device_total_bytes)} unallocated)"
        lines.append(total)
        lines.append(f"  minimum device budget for these settings: {format_size(self.minimum_device_bytes)}")
        if self.device == "cuda" and self.hybrid:
            lines.append("host memory:")
            host_bill = [
                ("pinned weights", self.host_bytes, f"{_count(len(self.groups_on('cpu')), 'group')} computed on the CPU"),
                ("mapped weights", self.mapped_bytes, "the store's pages (the OS page cache; not allocated)"),
                ("KV cache", self.host_kv_bytes, f"float32, the {_count(len(self.cpu_layers), 'layer')} the CPU computes"),
                ("working buffers", self.host_work_bytes, "the CPU kernels'"),
                ("hand-off", self.handoff_host_bytes, "pinned"),
                ("disk staging", self.host_staging_bytes, "pinned, pages-tier groups in large chunks"),
            ]
            for name, nbytes, why in host_bill:
                if nbytes:
                    lines.append(f"  {name:<18}{format_size(nbytes):>10}  {why}")
            lines.append(f"  {'total':<18}{format_size(self.host_total_bytes):>10}  (mapped weights not included)")
        elif self.device == "cuda":
            lines.append(
                f"host memory (pinned): {format_size(self.host_bytes)} weights"
                + (f" + {format_size(self.host_staging_bytes)} disk staging" if self.host_staging_bytes else "")
            )
        lines.append("")
        streamed = self.streamed_bytes_per_token
        how = "over PCIe" if self.device == "cuda" else "read from disk"
        lines.append(
            f"streamed per token (decode, batch 1): {format_gb(streamed)} ({format_size(streamed)}) {how}"
        )
        if self.device == "cuda" and self.disk_bytes_per_token:
            lines.append(f"  of which read from disk: {format_gb(self.disk_bytes_per_token)}")
        if self.hybrid:
            on_cpu = self.groups_on("cpu") + self.groups_on("pages")
            lines.append(f"computed on the CPU per token (decode, batch 1): {format_gb(self.cpu_bytes_per_token)} "
                         f"of weights ({_count(len(self.cpu_layers), 'layer')}"
                         + (" + head)" if HEAD in on_cpu else ")"))
        if self.predicted_tok_s:
            shown = ", ".join(f"{mode} {tok:.2f}" for mode, tok in self.predicted_tok_s.items())
            lines.append(f"expected decode tok/s at batch {self.batch}: {shown}")
            if self.figures is not None:
                lines.append(f"  from {self.figures.describe()}; perfect overlap assumed, real runs are slower")
        bound = self.tokens_per_second_bound(link_gbps, disk_gbps)
        if bound is not None and not self.hybrid:
            speeds = []
            if link_gbps and self.device == "cuda":
                speeds.append(f"link {link_gbps:g} GB/s")
            if disk_gbps and (self.device == "cpu" or self.disk_bytes_per_token):
                speeds.append(f"disk {disk_gbps:g} GB/s")
            shown = "unbounded (nothing streamed)" if math.isinf(bound) else f"{bound:.2f} tok/s"
            lines.append(f"bound at {', '.join(speeds)}: {shown} (perfect overlap; real runs are slower)")
            if self.device == "cuda" and self.disk_bytes_per_token and not disk_gbps:
                lines.append("  (disk reads not counted: pass a disk speed)")
        if self.notes:
            lines.append("")
            lines.append("notes:")
            lines.extend(f"  - {n}" for n in self.notes)
        return "\n".join(lines)

    def threshold_text(self) -> str:
        """When the CPU computes the cpu/pages groups and when they are streamed to the device instead."""
        if self.cpu_min_rows is None:
            return "the CPU computes them for every forward (decode and prompt chunks alike)"
        return (f"forwards of fewer than {self.cpu_min_rows} rows (batch x tokens: decode, short chunks) compute "
                f"them on the CPU; chunks of {self.cpu_min_rows}+ rows stream them to the device")

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain JSON types (group keys as strings), with the derived totals."""
        return {
            "device": self.device,
            "device_memory": self.device_memory,
            "host_memory": self.host_memory,
            "budget_bytes": self.budget_bytes,
            "placements": [{"group": str(p.group), "where": p.where, "nbytes": p.nbytes} for p in self.placements],
            "embed_location": self.embed_location,
            "embed_row_bytes": self.embed_row_bytes,
            "kv_bytes": self.kv_bytes,
            "kv_dtype": self.kv_dtype,
            "max_seq_len": self.max_seq_len,
            "batch": self.batch,
            "prefill_chunk": self.prefill_chunk,
            "work_bytes": self.work_bytes,
            "work_breakdown": dict(self.work_breakdown),
            "reserve_bytes": self.reserve_bytes,
            "prefetch_depth": self.prefetch_depth,
            "staging_slot_bytes": self.staging_slot_bytes,
            "slot_layouts": dict(self.slot_layouts),
            "device_slot_bytes": self.device_slot_bytes,
            "staging_bytes": self.staging_bytes,
            "host_staging_bytes": self.host_staging_bytes,
            "minimum_device_bytes": self.minimum_device_bytes,
            "resident_bytes": self.resident_bytes,
            "resident_layers": self.resident_layers,
            "host_bytes": self.host_bytes,
            "device_total_bytes": self.device_total_bytes,
            "streamed_bytes_per_token": self.streamed_bytes_per_token,
            "disk_bytes_per_token": self.disk_bytes_per_token,
            "notes": list(self.notes),
            "offload": self.offload,
            "offload_requested": self.offload_requested,
            "cpu_min_rows": self.cpu_min_rows,
            "cpu_layers": self.cpu_layers,
            "cpu_bytes_per_token": self.cpu_bytes_per_token,
            "mapped_bytes": self.mapped_bytes,
            "host_kv_bytes": self.host_kv_bytes,
            "host_work_bytes": self.host_work_bytes,
            "handoff_host_bytes": self.handoff_host_bytes,
            "handoff_device_bytes": self.handoff_device_bytes,
            "host_total_bytes": self.host_total_bytes,
            "figures": None if self.figures is None else self.figures.to_dict(),
            "predicted_tok_s": dict(self.predicted_tok_s),
            "reason": self.reason,
        }


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _runs(placements: tuple[Placement, ...]) -> list[tuple[str, str, int]]:
    """Compress consecutive layers on the same tier into one row ("layers 0-11")."""
    rows: list[tuple[str, str, int]] = []
    run: list[Placement] = []

    def flush() -> None:
        if run:
            first, last = run[0].group, run[-1].group
            label = f"layer {first}" if first == last else f"layers {first}-{last}"
            rows.append((label, run[0].where, sum(p.nbytes for p in run)))
            run.clear()

    for p in placements:
        if isinstance(p.group, int):
            if run and run[-1].where != p.where:
                flush()
            run.append(p)
        else:
            flush()
            rows.append((str(p.group), p.where, p.nbytes))
    flush()
    return rows


def kv_cache_bytes(config: MossConfig, max_seq_len: int, batch: int, kv_itemsize: int) -> int:
    """Static KV cache: keys and values for every layer, position and sequence."""
    return 2 * config.n_layer * max_seq_len * config.n_embd * kv_itemsize * batch


def work_buffer_bytes(
    config: MossConfig, *, device: str, max_seq_len: int, batch: int, prefill_chunk: int
) -> dict[str, int]:
    """A conservative bill of the activation buffers one forward step needs, by name.

    Sized for the worst step, a prefill chunk of ``prefill_chunk`` tokens per sequence attending
    to ``max_seq_len`` positions (decode is the same with 1 token). It over-counts on purpose: it
    assumes no buffer is reused within a layer, and keeps two copies where an op is not in place.
    Logits are computed for the last position of each sequence only.
    """
    d, inner, heads = config.n_embd, config.inner_dim, config.n_head
    act = DTYPE_ITEMSIZE[ACTIVATION_DTYPE[device]]
    f32 = 4
    tokens = batch * prefill_chunk
    bill = {}
    if device == "cuda" and packed_bits(config):
        # packed Linears there run through the dequantizing CUDA kernels (jmoss.kernels.cuda_quant):
        # decode dequantizes in registers, prefill one fp32 row tile at a time; the CPU kernels never
        # make a tile
        linears = list(linear_shapes(config).values()) + ([(config.vocab_size, d)] if head_bits(config) else [])
        bill["dequantized_weight"] = dequant_transient_bytes(linears, cuda=True)
    return bill | {
        # residual input, ln_1 output, attention output, MLP output, their sum, one spare
        "hidden": 6 * tokens * d * act,
        "qkv": tokens * 3 * d * act,
        # q and k upcast to float32 for rotary and the scores (as the reference does)
        "qk_fp32": 2 * tokens * d * f32,
        # scores and softmax probabilities, float32
        "attention_scores": 2 * batch * heads * prefill_chunk * max_seq_len * f32,
        # fc_in output and gelu output
        "mlp": 2 * tokens * inner * act,
        # logits and sampling probabilities for one position per sequence, float32
        "logits": 2 * batch * config.vocab_size * f32,
        # sin/cos tables for rotary positions
        "rotary": 2 * max_seq_len * config.rotary_dim * f32,
    }


def slot_layout(group: Group) -> str:
    """The layout a streamed group occupies in a slot: every layer has the same tensors."""
    return "layer" if isinstance(group, int) else str(group)


def slot_allocation(device: str, streamed: list[Group], sizes: dict[Group, int]) -> dict[str, int]:
    """Device bytes one staging slot needs, by layout, exactly as the engine allocates them.

    On cpu a slot is one byte buffer the size of the largest streamed group and every layout is
    a set of views into it. On cuda a jittor Var cannot be reinterpreted, so a slot holds one Var
    set per layout streamed through it, each as large as the largest group of that layout: a
    slot that streams layers and the head costs a layer *plus* the head.
    """
    if not streamed:
        return {}
    if device == "cpu":
        return {"buffer": max(sizes[g] for g in streamed)}
    out: dict[str, int] = {}
    for g in streamed:
        key = slot_layout(g)
        out[key] = max(out.get(key, 0), sizes[g])
    return out


@dataclasses.dataclass(frozen=True)
class _Candidate:
    head_resident: bool
    n_resident_layers: int
    resident_bytes: int
    slot_bytes: int  # device bytes of one slot (the sum of slot_layouts)
    largest: int  # the largest streamed group (a flat host staging buffer per slot)
    slot_layouts: dict


def _candidates(config: MossConfig, sizes: dict[Group, int], device: str) -> list[_Candidate]:
    """Every resident set worth considering: head in or out, plus the first L layers.

    Layers of one model all have the same size, so *which* L layers stay makes no difference to
    the bytes streamed; we keep the first ones so the plan reads as one contiguous run (and the
    engine can start prefetching the first streamed layer while the resident ones compute).
    """
    layers = list(range(config.n_layer))
    out = []
    for head_resident in (True, False):
        for n in range(config.n_layer + 1):
            resident = layers[:n] + ([HEAD] if head_resident else [])
            streamed = layers[n:] + ([] if head_resident else [HEAD])
            allocation = slot_allocation(device, streamed, sizes)
            out.append(
                _Candidate(
                    head_resident=head_resident,
                    n_resident_layers=n,
                    resident_bytes=sum(sizes[g] for g in resident),
                    slot_bytes=sum(allocation.values()),
                    largest=max((sizes[g] for g in streamed), default=0),
                    slot_layouts=allocation,
                )
            )
    return out


def _device_total(c: _Candidate, fixed: int, depth: int) -> int:
    return c.resident_bytes + fixed + (depth * c.slot_bytes if c.slot_bytes else 0)


def plan_placement(
    config: MossConfig,
    *,
    device: str,
    device_memory: int | None,
    host_memory: int | None,
    available_device_bytes: int | None = None,
    available_host_bytes: int | None = None,
    max_seq_len: int | None = None,
    batch: int = 1,
    prefetch_depth: int = 2,
    kv_dtype: str | None = None,
    weight_itemsize: int = 2,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    offload: str = "auto",
    figures: Figures | None = None,
    split: tuple[int, bool] | None = None,
) -> Plan:
    """Decide where every group of ``config``'s model lives under the given budgets.

    The planner is pure: it reads no hardware. The caller measures ``available_device_bytes``
    (free device memory, or free RAM on cpu) and ``available_host_bytes`` and passes them in.

    Policy, in order:
      1. The device pays first for the KV cache, working buffers and the runtime reserve.
      2. Among all resident sets (head in or out, first L layers), keep the one with the most
         resident bytes, i.e. the fewest bytes streamed per token, whose total including
         ``prefetch_depth`` staging slots (each as large as the largest streamed group) fits.
         Ties go to keeping the head. For MOSS the head is the largest group, so streaming it
         would also make every slot 1.31 GB instead of 0.91 GB: keeping it always wins there.
      3. If no set fits with ``prefetch_depth`` slots but one fits with a single slot, use one
         slot (copies then no longer overlap the compute of streamed layers) and say so.
      4. On cuda, streamed groups go to pinned host memory while ``host_memory`` allows, the rest
         to disk (read through pinned staging). On cpu, streamed groups always come from disk.

    ``device_memory=None`` means "everything resident": it must fit in
    ``available_device_bytes`` (when given), else BudgetError with the numbers.

    ``offload`` (cuda with a budget): "stream" is the policy above; "cpu" computes the groups the
    card cannot hold on the CPU (``_cpu_plan``: the device is spared their slots' worth when the CPU
    computes every chunk, and their KV cache, which lives in host RAM); "auto" plans both and keeps
    the faster at decode by ``figures`` (streaming when there are none to compare with, or when only
    one of the two fits). The chosen plan carries both predictions and the reason. ``split=(L, head)``
    (offload cpu) fixes the split instead of choosing it: the first L layers, and the head if
    ``head``, on the device, the rest on the CPU (benchmarks and tests of one split; with
    ``device_memory=None`` the device side is not checked).
    """
    if offload not in OFFLOAD_MODES:
        raise DeviceError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, got {offload!r}")
    if figures is not None and not isinstance(figures, Figures):
        raise BudgetError(f"figures must be a jmoss.placement.Figures, got {type(figures).__name__}")
    if split is not None and (device != "cuda" or offload != "cpu" or not isinstance(split, tuple) or len(split) != 2
                              or not isinstance(split[0], int) or not 0 <= split[0] <= config.n_layer
                              or (split[0] == config.n_layer and split[1])):
        raise BudgetError(f"split=(layers on the device, head on the device) needs device cuda, offload cpu and "
                          f"0 <= layers <= {config.n_layer} with something left for the CPU; got {split!r}")
    if device not in DEVICES:
        raise DeviceError(f"unknown device {device!r}: jmoss runs on {' or '.join(DEVICES)}")
    if max_seq_len is None:
        max_seq_len = config.n_positions
    if not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise BudgetError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
    if max_seq_len > config.n_positions:
        raise ContextLengthError(
            f"max_seq_len {max_seq_len} exceeds the model's {config.n_positions} positions; "
            f"use at most {config.n_positions}"
        )
    if not isinstance(batch, int) or batch < 1:
        raise BudgetError(f"batch must be a positive integer, got {batch!r}")
    if not isinstance(prefetch_depth, int) or prefetch_depth < 1:
        raise BudgetError(
            f"prefetch_depth must be a positive integer (2 overlaps copies with compute), got {prefetch_depth!r}"
        )
    if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
        raise BudgetError(f"prefill_chunk must be a positive integer, got {prefill_chunk!r}")
    kv_dtype = kv_dtype or DEFAULT_KV_DTYPE[device]
    if kv_dtype not in DTYPE_ITEMSIZE:
        raise BudgetError(f"kv_dtype {kv_dtype!r} is not supported; use one of {', '.join(DTYPE_ITEMSIZE)}")
    for name, value in (("device_memory", device_memory), ("host_memory", host_memory),
                        ("available_device_bytes", available_device_bytes),
                        ("available_host_bytes", available_host_bytes)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise BudgetError(
                f"{name} must be a non-negative number of bytes (see jmoss.sizes.parse_size), got {value!r}"
            )

    prefill_chunk = min(prefill_chunk, max_seq_len)
    common = dict(config=config, device_memory=device_memory, host_memory=host_memory,
                  available_host_bytes=available_host_bytes, max_seq_len=max_seq_len, batch=batch,
                  prefetch_depth=prefetch_depth, kv_dtype=kv_dtype, weight_itemsize=weight_itemsize,
                  prefill_chunk=prefill_chunk)
    if split is not None:
        plan = _cpu_plan(figures=figures, split=split, **common)
        predicted = {"cpu": predict_decode_tok_s(plan, config, figures, batch)} if figures and figures.comparable else {}
        return dataclasses.replace(plan, offload_requested=offload, figures=figures, predicted_tok_s=predicted,
                                   reason=f"the split was given: {split[0]} layers on the device")
    if device == "cpu" or device_memory is None:
        plan = _stream_plan(device=device, available_device_bytes=available_device_bytes, **common)
        if device == "cpu" and offload == "cpu":
            plan = dataclasses.replace(plan, notes=plan.notes + (
                "offload applies to cuda: on cpu every layer is computed by the CPU already",))
        return dataclasses.replace(plan, offload_requested=offload, figures=figures)
    if available_device_bytes is not None and device_memory > available_device_bytes:
        raise BudgetError(
            f"device_memory {format_size(device_memory)} is more than the {format_size(available_device_bytes)} "
            f"free on {device}; pass at most {_fmt_arg(available_device_bytes)}"
        )
    stream: Plan | None = None
    cpu: Plan | None = None
    errors: dict[str, BudgetError] = {}
    try:
        stream = _stream_plan(device=device, available_device_bytes=available_device_bytes, **common)
    except BudgetError as exc:
        errors["stream"] = exc
    if stream is not None and not stream.streams:  # it all fits: nothing to offload
        return dataclasses.replace(stream, offload_requested=offload, figures=figures,
                                   reason="everything fits on the device")
    if offload != "stream" or (figures is not None and figures.comparable):  # (streaming: for the prediction)
        try:
            cpu = _cpu_plan(figures=figures, **common)
        except BudgetError as exc:
            errors["cpu"] = exc
    predicted = {}
    if figures is not None and figures.comparable:
        for mode, plan in (("stream", stream), ("cpu", cpu)):
            if plan is not None:
                predicted[mode] = predict_decode_tok_s(plan, config, figures, batch)
    if offload != "auto":
        if offload in errors:
            raise errors[offload]
        chosen, reason = (stream if offload == "stream" else cpu), f"asked for --offload {offload}"
    elif stream is None and cpu is None:
        raise BudgetError(f"{errors['stream']}; computing the rest on the CPU (offload cpu) does not fit either: "
                          f"{errors['cpu']}")
    else:
        chosen, reason = _auto_choice(stream, cpu, predicted, figures, batch)
    return dataclasses.replace(chosen, offload_requested=offload, figures=figures, predicted_tok_s=predicted,
                               reason=reason)


def _stream_plan(
    config: MossConfig,
    *,
    device: str,
    device_memory: int | None,
    host_memory: int | None,
    available_device_bytes: int | None,
    available_host_bytes: int | None,
    max_seq_len: int,
    batch: int,
    prefetch_depth: int,
    kv_dtype: str,
    weight_itemsize: int,
    prefill_chunk: int,
) -> Plan:
    """The streaming plan (the policy in plan_placement's docstring, arguments checked there)."""
    notes: list[str] = []
    sizes = {g: group_nbytes(config, g, weight_itemsize) for g in all_groups(config)}
    kv = kv_cache_bytes(config, max_seq_len, batch, DTYPE_ITEMSIZE[kv_dtype])
    work = work_buffer_bytes(config, device=device, max_seq_len=max_seq_len, batch=batch, prefill_chunk=prefill_chunk)
    reserve = RUNTIME_RESERVE[device]
    fixed = kv + sum(work.values()) + reserve
    fixed_desc = (
        f"KV cache {format_size(kv)} ({kv_dtype}, max_seq_len {max_seq_len}, batch {batch}) + working buffers "
        f"{format_size(sum(work.values()))} (prefill chunk {prefill_chunk}) + runtime reserve {format_size(reserve)}"
    )

    candidates = _candidates(config, sizes, device)
    all_resident = next(c for c in candidates if c.head_resident and c.n_resident_layers == config.n_layer)
    cheapest = min(candidates, key=lambda c: (_device_total(c, fixed, 1), -c.resident_bytes))
    minimum = _device_total(cheapest, fixed, 1)
    minimum_full_depth = min(_device_total(c, fixed, prefetch_depth) for c in candidates)

    if device_memory is None:
        need = _device_total(all_resident, fixed, 0)
        if available_device_bytes is not None and need > available_device_bytes:
            suggestion = max(minimum, (available_device_bytes * 2 // GiB) * GiB // 2)
            raise BudgetError(
                f"keeping the whole model resident on {device} needs {format_size(need)} (weights "
                f"{format_size(all_resident.resident_bytes)} + {fixed_desc}) but only "
                f"{format_size(available_device_bytes)} is available; pass a device memory budget "
                f"(e.g. --device-memory {_fmt_arg(suggestion)}, device_memory=\"{_fmt_arg(suggestion)}\" in Python) "
                f"to stream the rest, the minimum is {format_size(minimum)}"
            )
        if available_device_bytes is None:
            notes.append("device_memory=None and no measured free memory: everything resident, not checked")
        budget = available_device_bytes
        chosen, depth = all_resident, 0
    else:
        if available_device_bytes is not None and device_memory > available_device_bytes:
            raise BudgetError(
                f"device_memory {format_size(device_memory)} is more than the {format_size(available_device_bytes)} "
                f"free on {device}; pass at most {_fmt_arg(available_device_bytes)}"
            )
        budget = device_memory
        if device_memory < minimum:
            raise BudgetError(
                f"device_memory {format_size(device_memory)} is below the minimum of {format_size(minimum)} "
                f"({minimum / GiB:.2f} GiB) for this model on {device}: {fixed_desc}"
                + (f" + resident weights {format_size(cheapest.resident_bytes)}" if cheapest.resident_bytes else "")
                + f" + one staging slot of {format_size(cheapest.slot_bytes)} (the buffers of the largest "
                f"streamed group(s)); {format_size(minimum_full_depth)} lets copies overlap compute. Raise "
                f"--device-memory (device_memory=), or shrink the KV cache: a shorter context with -c/--ctx-size "
                f"(max_seq_len=) or fewer sequences with --max-batch (batch=)"
            )
        chosen, depth = _choose(candidates, fixed, device_memory, prefetch_depth)
        if chosen.slot_bytes == 0:
            depth = 0
        elif depth < prefetch_depth:
            notes.append(
                f"only {depth} staging slot fits (prefetch_depth={prefetch_depth} needs "
                f"{format_size(minimum_full_depth)}): copies will not overlap the compute of streamed layers"
            )

    resident_groups = set(range(chosen.n_resident_layers)) | ({HEAD} if chosen.head_resident else set())
    streamed = [g for g in all_groups(config) if g != EMBED and g not in resident_groups]
    where: dict[Group, Tier] = {g: "device" for g in resident_groups}
    host_staging = 0

    if device == "cpu":
        if host_memory is not None:
            notes.append(
                "host_memory is not used on cpu: weights that are not resident are read from the store on disk"
            )
        for g in streamed:
            where[g] = "disk"
        if not streamed and weight_itemsize == 2:
            notes.append(
                "resident weights are the store's own pages, mapped read-only (jmoss.engine.resident): billed here in "
                "full, held in the page cache (the process's RssFile, not RssAnon) and shared with any other process "
                "on this store, so a second start reads nothing from disk; where they fit in RAM twice over, a thread "
                "then copies them into 2 MiB pages of the process (RssAnon) for decode (JMOSS_WEIGHT_PAGES=mapped: never)"
            )
    else:
        host_staging = _assign_host(
            streamed, sizes, where, host_memory, available_host_bytes, depth, chosen.largest, notes
        )

    placements = tuple(
        Placement(g, "host" if g == EMBED else where[g], sizes[g]) for g in all_groups(config)
    )
    return Plan(
        device=device,
        device_memory=device_memory,
        host_memory=host_memory,
        budget_bytes=budget,
        placements=placements,
        embed_location="host",
        embed_row_bytes=embed_row_bytes(config, weight_itemsize),
        kv_bytes=kv,
        kv_dtype=kv_dtype,
        max_seq_len=max_seq_len,
        batch=batch,
        prefill_chunk=prefill_chunk,
        work_bytes=sum(work.values()),
        work_breakdown=work,
        reserve_bytes=reserve,
        prefetch_depth=depth,
        staging_slot_bytes=chosen.largest if depth else 0,
        host_staging_bytes=host_staging,
        minimum_device_bytes=minimum,
        notes=tuple(notes),
        slot_layouts=dict(chosen.slot_layouts) if depth else {},
    )


def _choose(candidates: list[_Candidate], fixed: int, budget: int, prefetch_depth: int) -> tuple[_Candidate, int]:
    """Most resident bytes that fit; full prefetch depth before a degraded single slot."""
    for depth in dict.fromkeys((prefetch_depth, 1)):
        fitting = [c for c in candidates if _device_total(c, fixed, depth) <= budget]
        if fitting:
            best = max(fitting, key=lambda c: (c.resident_bytes, c.head_resident, c.n_resident_layers))
            return best, depth
    raise AssertionError("the minimum check guarantees a single-slot plan fits")  # pragma: no cover


def matmul_params(config: MossConfig, group: Group) -> int:
    """Weights one row of activations is multiplied by in ``group`` (its FLOPs per row, halved)."""
    if group == EMBED:
        return 0
    if group == HEAD:
        return config.vocab_size * config.n_embd
    return sum(n * k for n, k in linear_shapes(config).values())


@dataclasses.dataclass(frozen=True)
class _Costs:
    """The timing model offload choices are made with: seconds for groups at ``rows`` rows.

    Each side is bounded by reading the weights or by computing with them, whichever is slower
    (a roofline from Figures); overlap of copies with compute is assumed perfect.
    """

    sizes: dict
    params: dict
    figures: Figures
    n_embd: int

    def cpu(self, groups: list[Group], rows: int) -> float:
        """The CPU kernels computing ``groups`` from RAM."""
        f = self.figures
        total = 0.0
        for g in groups:
            t = self.sizes[g] / (f.cpu_gbps * 1e9)
            if f.cpu_gflops:
                t = max(t, 2 * rows * self.params[g] / (f.cpu_gflops * 1e9))
            total += t
        return total

    def _on_device(self, groups: list[Group], rows: int, gbps: float) -> float:
        f = self.figures
        t = sum(self.sizes[g] for g in groups) / (gbps * 1e9)
        if f.device_tflops:
            t = max(t, 2 * rows * sum(self.params[g] for g in groups) / (f.device_tflops * 1e12))
        return t

    def link(self, groups: list[Group], rows: int) -> float:
        """``groups`` copied over the link and computed on the device."""
        return self._on_device(groups, rows, self.figures.link_gbps)

    def device(self, groups: list[Group], rows: int) -> float:
        """``groups`` resident on the device, read at its memory bandwidth."""
        return self._on_device(groups, rows, self.figures.device_gbps)

    def disk(self, groups: list[Group]) -> float:
        return sum(self.sizes[g] for g in groups) / (self.figures.disk_gbps * 1e9) if self.figures.disk_gbps else 0.0

    def handoffs(self, crossings: int, nbytes: int) -> float:
        """``crossings`` hand-offs between backends moving ``nbytes`` in all."""
        return crossings * HANDOFF_LATENCY_S + nbytes / (self.figures.link_gbps * 1e9)


def _costs(config: MossConfig, sizes: dict, figures: Figures) -> _Costs:
    return _Costs(sizes=sizes, params={g: matmul_params(config, g) for g in sizes}, figures=figures,
                  n_embd=config.n_embd)


def _tier_groups(plan: Plan, *tiers: str) -> list[Group]:
    return [p.group for p in plan.placements if p.where in tiers and p.group != EMBED]


def predict_decode_tok_s(plan: Plan, config: MossConfig, figures: Figures, batch: int | None = None) -> float:
    """Decode tok/s of ``plan`` (made for ``config``) at ``batch`` sequences (default the plan's).

    Streaming: the slowest of the link, the disk and the device reading every layer (copies
    overlap compute). Offload cpu below the row threshold: the device's resident layers, then the
    CPU's (pages-tier groups at the slower of the CPU and the disk), then the head, one after the
    other, plus the hand-offs of the hidden state; at or above it, the streaming figure for those
    groups plus the hand-offs of each streamed layer's attention (its KV cache is in host RAM).
    """
    if not figures.comparable:
        raise BudgetError("predicting decode speed needs figures with link_gbps, cpu_gbps and device_gbps")
    batch = batch or plan.batch
    costs = _costs(config, {p.group: p.nbytes for p in plan.placements}, figures)
    d = config.n_embd
    resident = _tier_groups(plan, "device")
    if not plan.hybrid:
        streamed = _tier_groups(plan, "host", "disk")
        t = max(costs.link(streamed, batch), costs.disk(_tier_groups(plan, "disk")),
                costs.device(resident + streamed, batch))
        return batch / t
    on_cpu, pages = _tier_groups(plan, "cpu"), _tier_groups(plan, "pages")
    n_cpu_layers = len(plan.cpu_layers)
    if plan.cpu_min_rows is None or batch < plan.cpu_min_rows:
        crossings = 2 if HEAD in resident else 1
        t = (costs.device(resident, batch) + costs.cpu(on_cpu, batch) + max(costs.cpu(pages, batch), costs.disk(pages))
             + costs.handoffs(crossings, crossings * batch * d * 4))
    else:
        streamed = on_cpu + pages
        t = (max(costs.link(streamed, batch), costs.disk(pages), costs.device(resident + streamed, batch))
             + costs.handoffs(2 * n_cpu_layers, n_cpu_layers * batch * d * 10))
    return batch / t


def _min_rows(costs: _Costs | None, groups: list[Group], n_layers: int, max_rows: int, notes: list[str]) -> int | None:
    """The smallest forward (rows = batch x tokens, at least 2: a batch-1 decode step always runs on
    the CPU) at which streaming ``groups`` to the device, their attention handed to the CPU, beats
    computing them on the CPU; None when the CPU wins up to ``max_rows``."""
    if not groups:
        return None
    f = costs.figures if costs is not None else None
    if f is None or not (f.link_gbps and f.cpu_gbps and f.cpu_gflops):
        if DEFAULT_CPU_MIN_ROWS > max_rows:
            return None
        notes.append(f"no measured CPU GEMM and link speeds: prompt chunks of {DEFAULT_CPU_MIN_ROWS}+ rows stream "
                     f"(llama.cpp's threshold)")
        return DEFAULT_CPU_MIN_ROWS
    rows = np.arange(2, max_rows + 1, dtype=np.float64)
    cpu = np.zeros_like(rows)
    for g in groups:
        cpu += np.maximum(costs.sizes[g] / (f.cpu_gbps * 1e9), 2 * rows * costs.params[g] / (f.cpu_gflops * 1e9))
    stream = np.full_like(rows, sum(costs.sizes[g] for g in groups) / (f.link_gbps * 1e9))
    if f.device_tflops:
        stream = np.maximum(stream, 2 * rows * sum(costs.params[g] for g in groups) / (f.device_tflops * 1e12))
    stream += 2 * n_layers * HANDOFF_LATENCY_S + n_layers * rows * costs.n_embd * 10 / (f.link_gbps * 1e9)
    wins = np.flatnonzero(stream < cpu)
    return int(rows[wins[0]]) if wins.size else None


def _cpu_plan(
    config: MossConfig,
    *,
    device_memory: int | None,
    host_memory: int | None,
    available_host_bytes: int | None,
    max_seq_len: int,
    batch: int,
    prefetch_depth: int,
    kv_dtype: str,
    weight_itemsize: int,
    prefill_chunk: int,
    figures: Figures | None,
    split: tuple[int, bool] | None = None,
) -> Plan:
    """Offload cpu on cuda: the first layers (and the head, if it fits) on the device, the rest
    computed by the CPU from pinned RAM (or, past the host budget, the store's pages).

    Per resident set (as in streaming: head in or out, first L layers) the device pays for its
    resident weights, the KV cache of its L layers, the working buffers, the hand-off buffer and,
    when some chunk size makes streaming the CPU's groups faster than computing them
    (``_min_rows``), ``prefetch_depth`` slots for those chunks. Preference, as in streaming: the
    most resident bytes with every slot wanted, then with one slot, then with none (the CPU then
    computes every chunk too, and a note says so). ``split`` keeps only that resident set, and with
    ``device_memory=None`` takes it unchecked.
    """
    notes: list[str] = []
    sizes = {g: group_nbytes(config, g, weight_itemsize) for g in all_groups(config)}
    kv_layer = kv_cache_bytes(config, max_seq_len, batch, DTYPE_ITEMSIZE[kv_dtype]) // config.n_layer
    kv_layer_host = kv_cache_bytes(config, max_seq_len, batch, 4) // config.n_layer
    work = work_buffer_bytes(config, device="cuda", max_seq_len=max_seq_len, batch=batch, prefill_chunk=prefill_chunk)
    host_work = sum(work_buffer_bytes(config, device="cpu", max_seq_len=max_seq_len, batch=batch,
                                      prefill_chunk=prefill_chunk).values())
    reserve = RUNTIME_RESERVE["cuda"]
    rows_max = batch * prefill_chunk
    d = config.n_embd
    act = DTYPE_ITEMSIZE[ACTIVATION_DTYPE["cuda"]]
    costs = _costs(config, sizes, figures) if figures is not None and figures.link_gbps and figures.cpu_gbps else None

    options = []  # (rank, candidate, depth, rows, device total)
    threshold_notes: list[str] = []
    for c in _candidates(config, sizes, "cuda"):
        resident = set(range(c.n_resident_layers)) | ({HEAD} if c.head_resident else set())
        on_cpu = [g for g in all_groups(config) if g != EMBED and g not in resident]
        if not on_cpu or (split is not None and (c.n_resident_layers, c.head_resident) != split):
            continue  # everything resident (the streaming plan covers it), or not the split asked for
        base = c.resident_bytes + kv_layer * c.n_resident_layers + sum(work.values()) + reserve + rows_max * d * 4
        n_cpu_layers = config.n_layer - c.n_resident_layers
        rows = _min_rows(costs, on_cpu, n_cpu_layers, rows_max, threshold_notes)
        options.append((0 if rows is None else 2, c, 0, None, base))
        if rows is not None:
            for rank, depth in ((0, prefetch_depth), (1, 1)):
                options.append((rank, c, depth, rows, base + depth * c.slot_bytes))
    minimum = min(total for _, _, _, _, total in options)
    fitting = [o for o in options if device_memory is None or o[4] <= device_memory]
    if not fitting:
        raise BudgetError(
            f"device_memory {format_size(device_memory)} is below the minimum of {format_size(minimum)} "
            f"({minimum / GiB:.2f} GiB) for offload cpu on cuda (working buffers, the hand-off buffer and the "
            f"runtime reserve, with every layer on the CPU); raise device_memory"
        )
    rank, chosen, depth, rows, _ = min(fitting, key=lambda o: (o[0], -o[1].resident_bytes, not o[1].head_resident,
                                                                 -o[1].n_resident_layers))
    notes.extend(dict.fromkeys(threshold_notes))
    if rank == 2:
        notes.append("no room on the device for a staging slot: the CPU computes prompt chunks too (slow for long "
                     "prompts); a larger device_memory lets chunks stream")
    elif rank == 1 and prefetch_depth > 1:
        notes.append(f"only 1 staging slot fits (prefetch_depth={prefetch_depth}): streamed chunks will not overlap "
                     "copies with compute")
    resident = set(range(chosen.n_resident_layers)) | ({HEAD} if chosen.head_resident else set())
    on_cpu = [g for g in all_groups(config) if g != EMBED and g not in resident]
    n_cpu_layers = config.n_layer - chosen.n_resident_layers
    handoff_host = rows_max * d * (max(4, 3 * act) if rows is not None else 4)
    host_kv = kv_layer_host * n_cpu_layers
    host_fixed = host_kv + host_work + handoff_host
    where: dict[Group, Tier] = {g: "device" for g in resident}
    host_staging = 0
    if host_memory is not None and available_host_bytes is not None and host_memory > available_host_bytes:
        raise BudgetError(
            f"host_memory {format_size(host_memory)} is more than the {format_size(available_host_bytes)} "
            f"of free host RAM; pass at most {_fmt_arg(available_host_bytes)}"
        )
    cap = host_memory if host_memory is not None else available_host_bytes
    total = sum(sizes[g] for g in on_cpu)
    if cap is None:
        notes.append("host_memory=None and no measured free RAM: the CPU's groups planned in pinned RAM, not checked")
        where.update({g: "cpu" for g in on_cpu})
    elif host_fixed + total <= cap:
        where.update({g: "cpu" for g in on_cpu})
    else:
        host_staging = depth * chosen.largest
        room = cap - host_fixed - host_staging
        if room < 0:
            raise BudgetError(
                f"host memory {format_size(cap)} cannot hold what the CPU side needs besides weights: the KV "
                f"cache of {n_cpu_layers} layers {format_size(host_kv)} (float32) + working buffers "
                f"{format_size(host_work)} + hand-off {format_size(handoff_host)}"
                + (f" + disk staging {format_size(host_staging)}" if host_staging else "")
                + f"; give at least host_memory=\"{_fmt_arg(host_fixed + host_staging + 1)}\", or "
                f"{format_size(host_fixed + total)} to hold every group the CPU computes, or shorten max_seq_len"
            )
        for g in on_cpu:  # execution order: the first ones held in RAM, the rest read from the store's pages
            if sizes[g] <= room:
                where[g], room = "cpu", room - sizes[g]
            else:
                where[g] = "pages"
        n_pages = sum(1 for g in on_cpu if where[g] == "pages")
        notes.append(f"{_count(n_pages, 'group')} computed from the store's mapped pages (host memory is short): "
                     f"decode reads them through the OS page cache, from disk where it does not hold them; give "
                     f"host_memory {format_size(host_fixed + total)} to pin them all")
    placements = tuple(Placement(g, "host" if g == EMBED else where[g], sizes[g]) for g in all_groups(config))
    return Plan(
        device="cuda",
        device_memory=device_memory,
        host_memory=host_memory,
        budget_bytes=device_memory,
        placements=placements,
        embed_location="host",
        embed_row_bytes=embed_row_bytes(config, weight_itemsize),
        kv_bytes=kv_layer * chosen.n_resident_layers,
        kv_dtype=kv_dtype,
        max_seq_len=max_seq_len,
        batch=batch,
        prefill_chunk=prefill_chunk,
        work_bytes=sum(work.values()),
        work_breakdown=work,
        reserve_bytes=reserve,
        prefetch_depth=depth,
        staging_slot_bytes=chosen.largest if depth else 0,
        host_staging_bytes=host_staging,
        minimum_device_bytes=minimum,
        notes=tuple(notes),
        slot_layouts=dict(chosen.slot_layouts) if depth else {},
        offload="cpu",
        cpu_min_rows=rows if depth else None,
        host_kv_bytes=host_kv,
        host_work_bytes=host_work,
        handoff_host_bytes=handoff_host,
        handoff_device_bytes=rows_max * d * 4,
    )


def _auto_choice(stream: Plan | None, cpu: Plan | None, predicted: dict[str, float], figures: Figures | None,
                 batch: int) -> tuple[Plan, str]:
    """offload auto: the mode that fits, or of the two the faster at decode (ties: streaming); why."""
    if stream is None:
        return cpu, (f"the budget is below streaming's minimum; the CPU computes the {_count(len(cpu.cpu_layers), 'layer')} "
                     "the card cannot hold")
    if cpu is None:
        return stream, "offload cpu does not fit these budgets"
    if len(predicted) < 2:
        return stream, ("no speeds to compare the modes with (load measures them on cuda; `jmoss info` takes "
                        "--link-gbps, --cpu-gbps and --device-gbps): streaming, the default")
    n = _count(len(cpu.cpu_layers), "layer")
    inputs = (f"the CPU kernels read at {figures.cpu_gbps:.3g} GB/s, the link copies at {figures.link_gbps:.3g} GB/s, "
              f"{n} off the card")
    if predicted["cpu"] > predicted["stream"]:
        return cpu, (f"computing them on the CPU predicts {predicted['cpu']:.2f} decode tok/s at batch {batch} "
                     f"against {predicted['stream']:.2f} streaming ({inputs})")
    return stream, (f"streaming predicts {predicted['stream']:.2f} decode tok/s at batch {batch} against "
                    f"{predicted['cpu']:.2f} with the CPU computing them ({inputs})")


def _assign_host(
    streamed: list[Group],
    sizes: dict[Group, int],
    where: dict[Group, Tier],
    host_memory: int | None,
    available_host_bytes: int | None,
    depth: int,
    slot_bytes: int,
    notes: list[str],
) -> int:
    """Put streamed groups in pinned host memory while it lasts, the rest on disk (cuda).

    Fills ``where`` and returns the pinned bytes of disk staging. Disk reads land in
    ``depth`` pinned staging buffers of one slot each, paid from the host budget.
    """
    if host_memory is not None and available_host_bytes is not None and host_memory > available_host_bytes:
        raise BudgetError(
            f"host_memory {format_size(host_memory)} is more than the {format_size(available_host_bytes)} "
            f"of free host RAM; pass at most {_fmt_arg(available_host_bytes)}"
        )
    cap = host_memory if host_memory is not None else available_host_bytes
    if cap is None:
        if streamed:
            notes.append(
                "host_memory=None and no measured free RAM: all streamed groups planned in pinned host memory, "
                "not checked"
            )
        for g in streamed:
            where[g] = "host"
        return 0
    total = sum(sizes[g] for g in streamed)
    if total <= cap:
        for g in streamed:
            where[g] = "host"
        return 0
    host_staging = depth * slot_bytes
    if host_staging > cap:
        raise BudgetError(
            f"host memory {format_size(cap)} cannot hold the pinned staging buffers that reading layers "
            f"from disk needs ({depth} x {format_size(slot_bytes)} = {format_size(host_staging)}); give at "
            f"least host_memory=\"{_fmt_arg(host_staging)}\", or {format_size(total)} to hold every streamed layer"
        )
    room = cap - host_staging
    for g in streamed:  # execution order: the earliest streamed layers are held in RAM
        if sizes[g] <= room:
            where[g] = "host"
            room -= sizes[g]
        else:
            where[g] = "disk"
    n_disk = sum(1 for g in streamed if where[g] == "disk")
    notes.append(
        f"{n_disk} group(s) are read from disk every token: give host_memory "
        f"{format_size(total)} to hold every streamed group in RAM"
    )
    return host_staging


def _fmt_arg(n: int) -> str:
    """A size as a parse_size string that rounds down (so a suggestion never exceeds a limit)."""
    if n >= GiB:
        return f"{math.floor(n / GiB * 10) / 10:.1f}GiB"
    return f"{n // MiB}MiB"
