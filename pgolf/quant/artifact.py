"""The quantized artifact (`model.pgq`): a small binary container, no pickle. docs/artifact-format.md has the
byte layout; in short: magic, version, a CRC-checked JSON tensor table, then compressed sections.

Tensors are grouped into sections by how they are stored: "q<bits>" (the integer values of all matrices of
that width, either as int8 bytes or bit-packed), "scales" (all fp16 row scales), "fp16" (passthrough floats)
and "raw" (non-float tensors as they are). Each section is compressed on its own with the method
(codec + filter) that gives the fewest bytes, and carries a CRC32 of its compressed bytes.
"""

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pgolf.errors import UserError
from pgolf.fileio import atomic_write_bytes
from pgolf.quant.codecs import AUTO_CODECS, Compressor, check_round_trip, codec_candidates, decompress_with
from pgolf.quant.formats import dequantize_rows
from pgolf.quant.grouping import ORDER_PROBE, orders_for, perm_bytes, reorder, restore
from pgolf.quant.lqer import lqer_correction
from pgolf.quant.pack import pack_bits, unpack_bits
from pgolf.tensorfile import TENSORFILE_DTYPES, tensor_from_bytes, tensor_to_bytes

ARTIFACT_MAGIC = b"PGQUANT\x00"
ARTIFACT_VERSION = 3  # 2: sections over 4 MiB are stored in length-framed chunks; 3: LQER factors, role sections
READABLE_VERSIONS = (2, 3)  # a version-2 file is a version-3 file without those
ARTIFACT_PREFIX = struct.Struct("<8sIII")  # magic, version, header length, header CRC32
# Filters tried per section layout (each with every codec of the candidate list). Bit-packed b-bit values
# repeat every b bytes, hence shuf<b>; on int6 GPTQ-like values bitplane measured worse than none.
SECTION_FILTERS = {"int8": ("none",), "fp16": ("none", "shuf2"), "raw": ("none",),
                   **{f"packed{b}": (f"shuf{b}",) for b in range(5, 9)}}
# Sections larger than this rank their methods on a sample and compress only the best (two if close) in full.
SAMPLE_ABOVE_BYTES = 4_000_000
SAMPLE_BYTES = 1_000_000
SAMPLE_CLOSE = 1.01


@dataclass
class QuantTensor:
    """One state-dict entry as stored: integer values + fp16 row scales, or a passthrough tensor."""

    kind: str  # matrix | embed | gate | passthrough
    shape: tuple
    dtype: str  # the original dtype name ("float32", ...), restored on read
    bits: int = 0
    q: torch.Tensor | None = None  # int8 (R, C) for matrix / embed
    scale: torch.Tensor | None = None  # fp16 (R,)
    data: torch.Tensor | None = None  # passthrough: fp16 for floats, else the tensor itself
    info: dict = field(default_factory=dict)
    lqer: dict | None = None  # LQER factors (pgolf.quant.lqer): qa, sa, qb, sb, a_bits, b_bits
    group: str = ""  # compression group (the policy's), used when sections are grouped by role

    def dequantize(self) -> torch.Tensor:
        dtype = TENSORFILE_DTYPES[self.dtype]
        if self.kind == "passthrough":
            return self.data.to(dtype).reshape(self.shape)
        w = dequantize_rows(self.q.cpu(), self.scale.cpu())
        if self.lqer is not None:
            w = w + lqer_correction(self.lqer)
        return w.to(dtype).reshape(self.shape)


@dataclass
class QuantizedModel:
    tensors: dict[str, QuantTensor]
    meta: dict = field(default_factory=dict)

    def dequantized_state(self) -> dict[str, torch.Tensor]:
        return {name: t.dequantize() for name, t in self.tensors.items()}


def int_section(t: QuantTensor, group_by: str) -> str:
    """The section of a tensor's integer values: "q<bits>", or "q<bits>.<group>" when grouped by role."""
    return f"q{t.bits}.{t.group}" if group_by == "role" and t.group else f"q{t.bits}"


def section_bits(section: str) -> int:
    return int(section.split(".")[0][1:])


def section_streams(qm: QuantizedModel):
    """Build the uncompressed section payloads and the tensor table (offsets into the payloads)."""
    parts: dict[str, list[bytes]] = {}
    sizes: dict[str, int] = {}
    table = []
    group_by = qm.meta.get("group_by", "bits")

    def put(section: str, blob: bytes) -> list[int]:
        parts.setdefault(section, []).append(blob)
        start = sizes.get(section, 0)
        sizes[section] = start + len(blob)
        return [start, len(blob)]

    def put_int8(section: str, t: torch.Tensor) -> list:
        return [section, *put(section, t.detach().cpu().contiguous().numpy().tobytes())]

    for name, t in qm.tensors.items():
        entry = {"name": name, "kind": t.kind, "shape": list(t.shape), "dtype": t.dtype, "bits": t.bits}
        if t.kind == "passthrough":
            stored = t.data.detach().cpu().contiguous()
            section = "fp16" if stored.dtype == torch.float16 else "raw"
            entry["stored"] = str(stored.dtype).removeprefix("torch.")
            entry["data"] = [section, *put(section, tensor_to_bytes(stored))]
        else:
            entry["q"] = put_int8(int_section(t, group_by), t.q)
            entry["scale"] = ["scales", *put("scales", tensor_to_bytes(t.scale.to(torch.float16)))]
        if t.lqer is not None:
            lq = t.lqer
            entry["lqer"] = {"a_bits": lq["a_bits"], "b_bits": lq["b_bits"], "a_shape": list(lq["qa"].shape),
                             "b_shape": list(lq["qb"].shape), "qa": put_int8("lqer", lq["qa"]),
                             "qb": put_int8("lqer", lq["qb"]),
                             "sa": ["scales", *put("scales", tensor_to_bytes(lq["sa"].to(torch.float16)))],
                             "sb": ["scales", *put("scales", tensor_to_bytes(lq["sb"].to(torch.float16)))]}
        table.append(entry)
    return {s: b"".join(p) for s, p in parts.items()}, table


def section_layouts(section: str, raw: bytes, shapes=None, orders=("",), reordered=None) -> dict[str, bytes]:
    """The byte layouts a section may be stored in: integer sections raw int8 or bit-packed, each in every
    byte order of `orders` (pgolf.quant.grouping; layout "packed6.ST" = similar rows first, column-major,
    packed). `shapes` ((rows, cols) per tensor, in stream order) is needed for any order but "";
    `reordered` ({order: reorder(raw, shapes, order)}) saves computing an order again."""
    if not section.startswith("q"):
        return {"fp16" if section in ("fp16", "scales") else "raw": raw}
    bits = section_bits(section)
    out = {}
    for order in orders:
        data = reordered[order] if reordered and order in reordered else reorder(raw, shapes, order)
        head = perm_bytes(shapes, order) if order else 0
        suffix = f".{order}" if order else ""
        out[f"int8{suffix}"] = data
        if bits < 8:  # 8-bit packing is the int8 layout itself
            out[f"packed{bits}{suffix}"] = data[:head] + pack_bits(np.frombuffer(data[head:], dtype=np.int8), bits)
    return out


def layout_order(layout: str) -> str:
    return layout.partition(".")[2]


def section_shapes(table: list[dict]) -> dict[str, list[tuple[int, int]]]:
    """{role section: (rows, cols) of each tensor's values, in stream order}, from the tensor table."""
    out: dict[str, list] = {}
    for e in sorted((e for e in table if "q" in e and "." in e["q"][0]), key=lambda e: e["q"][1]):
        rows = e["shape"][0]
        out.setdefault(e["q"][0], []).append((rows, e["q"][2] // max(rows, 1)))
    return out


def best_orders(items: list[tuple], compressor: Compressor) -> list[tuple[str, bytes]]:
    """(order, the section's bytes in it) for each (name, raw, shapes) item: the byte order with the fewest
    bytes under the cheap probe codec, on a sample of each (the first on a tie); "" without shapes."""
    candidates = [{o: reorder(raw, shapes, o) for o in orders_for(shapes)} for _, raw, shapes in items]
    probes = [(i, o) for i, c in enumerate(candidates) if len(c) > 1 for o in c]
    blobs = compressor.compress([(ORDER_PROBE, probe_data(candidates[i][o])) for i, o in probes])
    sizes = {key: len(b) for key, b in zip(probes, blobs, strict=True)}
    chosen = [min(c, key=lambda o, i=i: sizes.get((i, o), 0)) for i, c in enumerate(candidates)]
    return [(o, candidates[i][o]) for i, o in enumerate(chosen)]


def probe_data(data: bytes) -> bytes:
    return sample_of(data) if len(data) > SAMPLE_ABOVE_BYTES else data


def sample_of(data: bytes) -> bytes:
    """Four spread slices of a large stream, SAMPLE_BYTES in all."""
    piece, n = SAMPLE_BYTES // 4, len(data)
    return b"".join(data[i * (n - piece) // 3: i * (n - piece) // 3 + piece] for i in range(4))


def section_options(name: str, raw: bytes, shapes, order: tuple[str, bytes], codecs, fixed=None) -> list[tuple]:
    """(layout, data, method) for each choice of a section: every layout in the order by every codec and
    filter, or the one (layout, method) of `fixed`."""
    if fixed:
        layout, method = fixed
        return [(layout, section_layouts(name, raw, shapes, (layout_order(layout),))[layout], method)]
    layouts = section_layouts(name, raw, shapes, (order[0],), {order[0]: order[1]})
    return [(layout, data, f"{c}+{f}") for layout, data in layouts.items() for c in codecs
            for f in SECTION_FILTERS[layout.partition(".")[0]]]


def choose_sections(items: list[tuple], codecs, compressor: Compressor | None = None,
                    plan: dict | None = None) -> list[dict]:
    """For each (name, raw, shapes) item, the layout and method with the fewest compressed bytes: the
    section record with its blob. `plan` ({name: (layout, method)}) fixes a section's choice.

    A role section (shapes given) first picks its byte order by a cheap probe. A section over
    SAMPLE_ABOVE_BYTES ranks its options on a sample and compresses the best (two if within SAMPLE_CLOSE) in
    full; a smaller one compresses every option. Each of these stages runs as one batch over every section
    (Compressor.compress), so the choice is that of a section-by-section search."""
    comp = compressor or Compressor()
    runnable, skipped = codec_candidates([f"{c}+none" for c in codecs])
    codecs, plan = [m.split("+")[0] for m in runnable], plan or {}
    search = [i for i, (name, _, _) in enumerate(items) if name not in plan]
    if search and not codecs:
        raise UserError(f"no compression method can run here: {skipped}")
    orders = dict(zip(search, best_orders([items[i] for i in search], comp), strict=True))
    options = [section_options(*item, orders.get(i), codecs, plan.get(item[0])) for i, item in enumerate(items)]
    sampled = {i for i, (_, raw, _) in enumerate(items) if len(raw) > SAMPLE_ABOVE_BYTES and len(options[i]) > 1}
    jobs = {(i, j): (m, d) for i, opts in enumerate(options) for j, (_, d, m) in enumerate(opts)}
    # the samples first (the full searches they rank wait for them), the small sections in full meanwhile
    samples = keyed_start(comp, {k: (m, sample_of(d)) for k, (m, d) in jobs.items() if k[0] in sampled}, True)
    small = keyed_start(comp, {k: job for k, job in jobs.items() if k[0] not in sampled})
    ranks, tried = samples(), {}
    for i in sampled:
        sizes = [len(ranks[(i, j)]) for j in range(len(options[i]))]
        ranked = sorted(range(len(sizes)), key=sizes.__getitem__)
        close = sizes[ranked[1]] <= SAMPLE_CLOSE * sizes[ranked[0]]  # a runner-up within 1% is tried in full
        tried.update({(i, j): jobs[(i, j)] for j in ranked[:2 if close else 1]})
    full = keyed_start(comp, tried)
    blobs = {**small(), **full()}
    return [best_record(raw, options[i], [(key[1], b) for key, b in blobs.items() if key[0] == i])
            for i, (_, raw, _) in enumerate(items)]


def keyed_start(comp: Compressor, jobs: dict, urgent: bool = False):
    """Queue {key: (method, data)} as one batch; returns a function that waits and gives {key: blob}."""
    wait = comp.start(list(jobs.values()), urgent)
    return lambda: dict(zip(jobs, wait(), strict=True))


def best_record(raw: bytes, options: list[tuple], blobs: list[tuple[int, bytes]]) -> dict:
    """The record of the smallest of `blobs` ((option index, blob), the first on a tie), checked to decode."""
    j, blob = min(blobs, key=lambda b: len(b[1]))
    layout, data, method = options[j]
    check_round_trip(method, blob, data)
    return {"layout": layout, "method": method, "raw_len": len(data), "blob": blob, "values": len(raw)}


def choose_section(section: str, raw: bytes, codecs, shapes=None, compressor: Compressor | None = None) -> dict:
    """Pick the layout and method with the fewest compressed bytes for one section (see choose_sections)."""
    return choose_sections([(section, raw, shapes)], codecs, compressor)[0]


def encode_artifact(qm: QuantizedModel, codecs=AUTO_CODECS, plan: dict | None = None,
                    compressor: Compressor | None = None) -> tuple[bytes, list[dict]]:
    """Serialize qm to bytes. `plan` ({section: (layout, method)}) fixes the choices instead of searching;
    `compressor` (one per export) runs the compressions and keeps their results.

    Returns (file bytes, section records without blobs).
    """
    streams, table = section_streams(qm)
    shapes = section_shapes(table)
    items = [(name, raw, shapes.get(name)) for name, raw in streams.items()]
    sections, offset = [], 0
    for (name, _, _), rec in zip(items, choose_sections(items, codecs, compressor, plan), strict=True):
        rec.update(name=name, offset=offset, length=len(rec["blob"]), crc32=zlib.crc32(rec["blob"]))
        offset += rec["length"]
        sections.append(rec)
    header = json.dumps({"meta": qm.meta, "sections": [{k: v for k, v in s.items() if k != "blob"} for s in sections],
                         "tensors": table}, separators=(",", ":")).encode()
    prefix = ARTIFACT_PREFIX.pack(ARTIFACT_MAGIC, ARTIFACT_VERSION, len(header), zlib.crc32(header))
    blob = prefix + header + b"".join(s["blob"] for s in sections)
    return blob, [{k: v for k, v in s.items() if k != "blob"} for s in sections]


def write_artifact(quantized: QuantizedModel, path, codecs=AUTO_CODECS, plan: dict | None = None) -> int:
    """Write the artifact atomically; returns the bytes written."""
    blob, _ = encode_artifact(quantized, codecs, plan)
    atomic_write_bytes(path, blob)
    return len(blob)


def parse_artifact(path) -> tuple[dict, dict[str, bytes]]:
    """Check and decode the container: (header, {section: uncompressed stream}); damage raises UserError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return decode_container(data)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    except Exception as e:  # any decoder error on a damaged file becomes one line naming the file
        raise UserError(f"{path}: damaged artifact ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") \
            from None


def decode_container(data: bytes) -> tuple[dict, dict[str, bytes]]:
    if len(data) < ARTIFACT_PREFIX.size:
        raise UserError("truncated: shorter than the artifact prefix")
    magic, version, header_len, header_crc = ARTIFACT_PREFIX.unpack_from(data)
    if magic != ARTIFACT_MAGIC:
        raise UserError("not a pgolf quantized artifact (bad magic)")
    if version not in READABLE_VERSIONS:
        raise UserError(f"artifact version {version} is not supported (this reader knows "
                        f"{', '.join(map(str, READABLE_VERSIONS))}): re-quantize the run with this pgolf")
    start = ARTIFACT_PREFIX.size
    header_bytes = data[start:start + header_len]
    if len(header_bytes) != header_len:
        raise UserError("truncated inside the tensor table")
    if zlib.crc32(header_bytes) != header_crc:
        raise UserError("tensor table checksum mismatch (corrupted)")
    header = json.loads(header_bytes.decode())
    base = start + header_len
    expected = base + sum(s["length"] for s in header["sections"])
    if len(data) != expected:
        raise UserError(f"size {len(data)} bytes, expected {expected} (truncated or extended)")
    streams, shapes = {}, section_shapes(header["tensors"])
    for s in header["sections"]:
        blob = data[base + s["offset"]: base + s["offset"] + s["length"]]
        if zlib.crc32(blob) != s["crc32"]:
            raise UserError(f"section {s['name']!r} checksum mismatch (corrupted)")
        raw = decompress_with(s["method"], blob, s["raw_len"])
        order = layout_order(s["layout"])
        head = perm_bytes(shapes.get(s["name"], []), order) if order else 0
        if s["layout"].startswith("packed"):
            raw = raw[:head] + unpack_bits(raw[head:], section_bits(s["name"]), s["values"]).tobytes()
        if order:
            raw = restore(raw, shapes[s["name"]], order)
        if len(raw) != s["values"]:
            raise UserError(f"section {s['name']!r} decodes to {len(raw)} bytes, expected {s['values']}")
        streams[s["name"]] = raw
    return header, streams


def int8_from_ref(ref: list, streams: dict[str, bytes], shape) -> torch.Tensor:
    section, off, n = ref
    return torch.from_numpy(np.frombuffer(streams[section][off:off + n], dtype=np.int8).copy()).reshape(shape)


def fp16_from_ref(ref: list, streams: dict[str, bytes], count: int) -> torch.Tensor:
    section, off, n = ref
    return tensor_from_bytes(streams[section][off:off + n], "float16", [count])


def lqer_from_entry(e: dict, streams: dict[str, bytes]) -> dict:
    qa, qb = int8_from_ref(e["qa"], streams, e["a_shape"]), int8_from_ref(e["qb"], streams, e["b_shape"])
    return {"qa": qa, "qb": qb, "sa": fp16_from_ref(e["sa"], streams, e["sa"][2] // 2),
            "sb": fp16_from_ref(e["sb"], streams, e["sb"][2] // 2), "a_bits": e["a_bits"], "b_bits": e["b_bits"]}


def tensor_from_entry(entry: dict, streams: dict[str, bytes]) -> QuantTensor:
    t = QuantTensor(kind=entry["kind"], shape=tuple(entry["shape"]), dtype=entry["dtype"], bits=entry["bits"])
    if t.kind == "passthrough":
        section, off, n = entry["data"]
        t.data = tensor_from_bytes(streams[section][off:off + n], entry["stored"], entry["shape"])
        return t
    rows = entry["shape"][0]
    t.q = int8_from_ref(entry["q"], streams, (rows, -1))
    t.scale = fp16_from_ref(entry["scale"], streams, rows)
    if "lqer" in entry:
        t.lqer = lqer_from_entry(entry["lqer"], streams)
    return t


def read_quantized(path) -> QuantizedModel:
    """The stored integer values and scales, as a QuantizedModel."""
    header, streams = parse_artifact(path)
    try:
        tensors = {e["name"]: tensor_from_entry(e, streams) for e in header["tensors"]}
    except Exception as e:
        raise UserError(f"{path}: damaged tensor table ({type(e).__name__})") from None
    return QuantizedModel(tensors=tensors, meta=header.get("meta", {}))


def read_artifact(path) -> dict[str, torch.Tensor]:
    """The dequantized float state dict (original dtypes and shapes), ready for load_state_dict."""
    return read_quantized(path).dequantized_state()


def inspect_artifact(path) -> list[dict]:
    """One row per tensor: name, shape, kind, bits, stored bytes, codec (see header_rows)."""
    return header_rows(parse_artifact(path)[0])


def header_rows(header: dict) -> list[dict]:
    """One row per tensor of a decoded header: name, shape, kind, bits, stored bytes, codec.

    A tensor's stored bytes are its share of its sections' compressed bytes, in proportion to its
    uncompressed bytes there (sections are compressed as a whole); LQER factors count to their tensor.
    """
    sections = {s["name"]: s for s in header["sections"]}

    def share(ref) -> float:
        s = sections[ref[0]]
        return s["length"] * ref[2] / max(s["values"], 1)

    rows = []
    for e in header["tensors"]:
        refs = [e["data"]] if e["kind"] == "passthrough" else [e["q"], e["scale"]]
        if "lqer" in e:
            refs += [e["lqer"][k] for k in ("qa", "qb", "sa", "sb")]
        methods = sorted({f"{sections[r[0]]['layout']}/{sections[r[0]]['method']}" for r in refs})
        rows.append({"name": e["name"], "shape": e["shape"], "kind": e["kind"], "bits": e["bits"],
                     "bytes": round(sum(share(r) for r in refs)), "codec": ", ".join(methods)})
    return rows
