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

What the device budget pays for (everything jmoss allocates, nothing else)
--------------------------------------------------------------------------
resident weights + static KV cache + working buffers + ``prefetch_depth`` staging slots + a fixed
runtime reserve (``RUNTIME_RESERVE``). A slot holds what the engine allocates for it
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

from jmoss.config import MossConfig
from jmoss.errors import BudgetError, ContextLengthError, DeviceError
from jmoss.layout import EMBED, HEAD, Group, all_groups, embed_row_bytes, group_nbytes, head_bits, linear_shapes, packed_bits
from jmoss.model import dequant_transient_bytes
from jmoss.sizes import GiB, MiB, format_gb, format_size

Tier = Literal["device", "host", "disk"]

DEVICES = ("cpu", "cuda")

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
        """Weight bytes held in pinned host memory (cuda only)."""
        return self._sum("host")

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
        return self.resident_bytes + self.kv_bytes + self.work_bytes + self.staging_bytes + self.reserve_bytes

    @property
    def host_total_bytes(self) -> int:
        """Pinned host memory jmoss allocates (cuda): host-tier weights plus disk staging."""
        return self.host_bytes + self.host_staging_bytes

    @property
    def streams(self) -> bool:
        """Whether any weight group (the host-gathered embedding aside) lives off the device, so an
        engine must move it there each token."""
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
        memory bill, bytes streamed per token and, if link/disk speeds are given, the tok/s bound."""
        budget = "none (all resident)" if self.device_memory is None else format_size(self.device_memory)
        lines = [f"placement plan: device {self.device}, device budget {budget}"]
        if self.device == "cuda":
            host = "unlimited" if self.host_memory is None else format_size(self.host_memory)
            lines[0] += f", host budget {host}"
        lines.append("")
        lines.append(f"  {'group':<14}{'tier':<8}{'size':>10}")
        for label, where, nbytes in _runs(self.placements):
            extra = ""
            if label == EMBED:
                extra = f"  (mmap of the store; {format_size(self.embed_row_bytes)} row per token)"
            lines.append(f"  {label:<14}{where:<8}{format_size(nbytes):>10}{extra}")
        lines.append("")
        budget_line = "" if self.budget_bytes is None else f" of {format_size(self.budget_bytes)}"
        lines.append(f"device memory{budget_line}:")
        slots = f"{_count(self.prefetch_depth, 'slot')} x {format_size(self.device_slot_bytes)}"
        if len(self.slot_layouts) > 1:
            slots += " (" + " + ".join(f"{k} {format_size(n)}" for k, n in self.slot_layouts.items()) + ")"
        bill = [
            ("resident weights", self.resident_bytes, _count(len(self.resident_layers), "layer")
             + (" + head" if HEAD in self.groups_on("device") else "")),
            ("KV cache", self.kv_bytes, f"{self.kv_dtype}, {self.max_seq_len} positions x batch {self.batch}"),
            ("working buffers", self.work_bytes, f"prefill chunk {self.prefill_chunk}"),
            ("staging", self.staging_bytes,
             slots if self.prefetch_depth else "none"),
            ("runtime reserve", self.reserve_bytes, ""),
        ]
        for name, nbytes, why in bill:
            lines.append(f"  {name:<18}{format_size(nbytes):>10}  {why}".rstrip())
        total = f"  {'total':<18}{format_size(self.device_total_bytes):>10}"
        if self.budget_bytes is not None:
            total += f"  ({format_size(self.budget_bytes - self.device_total_bytes)} unallocated)"
        lines.append(total)
        lines.append(f"  minimum device budget for these settings: {format_size(self.minimum_device_bytes)}")
        if self.device == "cuda":
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
        bound = self.tokens_per_second_bound(link_gbps, disk_gbps)
        if bound is not None:
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
    """
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

    notes: list[str] = []
    prefill_chunk = min(prefill_chunk, max_seq_len)
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
                "on this store, so a second start reads nothing from disk"
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
