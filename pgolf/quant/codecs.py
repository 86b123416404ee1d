"""Lossless codecs for artifact sections, each optionally after a reversible byte filter.

A method is named "<codec>+<filter>", e.g. "brotli11+shuf2". Codecs: zlib9, lzma6, lzma9e (preset 9 |
extreme), zstd22 (zstandard), brotli11 (brotli), raw. Filters: none; shufN for N in 2..8 (the bytes of
fixed-width N-byte items split into N planes: all first bytes, then all second bytes, ...; a tail shorter than
N is kept as is);
bitplane (the 8 bit planes of the byte stream, each packed). zstandard and brotli are optional: where they
are missing, the methods using them are skipped and `codec_candidates` says why. Long streams are cut into
fixed 4 MiB chunks compressed in parallel threads (brotli-11 on a 26 MB section: minutes in one piece).
A `Compressor` runs an export's compressions at once over os.cpu_count() threads (zlib, lzma, zstandard and
brotli all release the GIL while they compress: on 2 cores, 2 threads compress 2 streams 1.5-2.1 times as
fast as one), each result kept for the run by content.
"""

import hashlib
import heapq
import itertools
import lzma
import os
import struct
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from pgolf.errors import UserError

CODEC_NAMES = ("zlib9", "lzma6", "lzma9e", "zstd22", "brotli11", "raw")
FILTER_NAMES = ("none", "bitplane") + tuple(f"shuf{n}" for n in range(2, 9))
# The codecs tried by quant.codec=auto (raw only as the last resort it never wins).
AUTO_CODECS = ("zlib9", "lzma9e", "zstd22", "brotli11")
# Streams longer than this are compressed in chunks of this size, in parallel (see compress_with).
CHUNK_BYTES = 1 << 22
CHUNK_LEN = struct.Struct("<I")
COUNTER = itertools.count()  # ties in the work queue go first come, first served


def lzma_filters(preset: int) -> list[dict]:
    return [{"id": lzma.FILTER_LZMA2, "preset": preset}]


def codec_compress(codec: str, data: bytes) -> bytes:
    if codec == "zlib9":
        return zlib.compress(data, 9)
    if codec in ("lzma6", "lzma9e"):
        preset = 6 if codec == "lzma6" else 9 | lzma.PRESET_EXTREME
        return lzma.compress(data, format=lzma.FORMAT_RAW, filters=lzma_filters(preset))
    if codec == "zstd22":
        import zstandard

        return zstandard.ZstdCompressor(level=22).compress(data)
    if codec == "brotli11":
        import brotli

        return brotli.compress(data, quality=11, lgwin=24)
    if codec == "raw":
        return bytes(data)
    raise UserError(f"unknown codec {codec!r}; valid: {list(CODEC_NAMES)}")


def codec_decompress(codec: str, blob: bytes) -> bytes:
    if codec == "zlib9":
        return zlib.decompress(blob)
    if codec in ("lzma6", "lzma9e"):
        preset = 6 if codec == "lzma6" else 9 | lzma.PRESET_EXTREME
        return lzma.decompress(blob, format=lzma.FORMAT_RAW, filters=lzma_filters(preset))
    if codec == "zstd22":
        import zstandard

        return zstandard.ZstdDecompressor().decompress(blob)
    if codec == "brotli11":
        import brotli

        return brotli.decompress(blob)
    if codec == "raw":
        return bytes(blob)
    raise UserError(f"unknown codec {codec!r}; valid: {list(CODEC_NAMES)}")


def filter_apply(name: str, data: bytes) -> bytes:
    arr = np.frombuffer(data, dtype=np.uint8)
    if name == "none":
        return bytes(data)
    if name.startswith("shuf"):
        width = int(name[4:])
        body = (len(arr) // width) * width
        return arr[:body].reshape(-1, width).T.tobytes() + arr[body:].tobytes()
    if name == "bitplane":
        padded = np.zeros(-(-len(arr) // 8) * 8, dtype=np.uint8)
        padded[: len(arr)] = arr
        return np.packbits(np.unpackbits(padded).reshape(-1, 8).T).tobytes()
    raise UserError(f"unknown filter {name!r}; valid: {list(FILTER_NAMES)}")


def filter_invert(name: str, data: bytes, raw_len: int) -> bytes:
    arr = np.frombuffer(data, dtype=np.uint8)
    if name == "none":
        return bytes(data)
    if name.startswith("shuf"):
        width = int(name[4:])
        body = (raw_len // width) * width
        return arr[:body].reshape(width, -1).T.tobytes() + arr[body:].tobytes()
    if name == "bitplane":
        bits = np.unpackbits(arr).reshape(8, -1).T
        return np.packbits(bits.reshape(-1)).tobytes()[:raw_len]
    raise UserError(f"unknown filter {name!r}; valid: {list(FILTER_NAMES)}")


def split_method(method: str) -> tuple[str, str]:
    codec, _, filt = method.partition("+")
    filt = filt or "none"
    if codec not in CODEC_NAMES or filt not in FILTER_NAMES:
        raise UserError(f"unknown compression method {method!r}; codecs {list(CODEC_NAMES)}, "
                        f"filters {list(FILTER_NAMES)}")
    return codec, filt


def method_missing(method: str) -> str:
    """Why a method cannot run here ("" when it can)."""
    codec, _ = split_method(method)
    module = {"zstd22": "zstandard", "brotli11": "brotli"}.get(codec)
    if module is None:
        return ""
    try:
        __import__(module)
    except ImportError:
        return f"{codec} needs the {module} package, which is not installed"
    return ""


def codec_candidates(methods) -> tuple[list[str], dict[str, str]]:
    """Split methods into those that can run here and {method: reason} for the skipped ones."""
    ok, skipped = [], {}
    for m in methods:
        reason = method_missing(m)
        if reason:
            skipped[m] = reason
        else:
            ok.append(m)
    return ok, skipped


def parallel_map(fn, items: list) -> list:
    """fn over items in threads (the codecs release the GIL while they work); order kept."""
    if len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(len(items), os.cpu_count() or 1)) as pool:
        return list(pool.map(fn, items))


def stream_pieces(method: str, data: bytes) -> tuple[str, list[bytes]]:
    """(codec, the filtered stream's pieces to compress one by one): the whole stream when it is at most
    CHUNK_BYTES long, else its CHUNK_BYTES chunks (the last shorter)."""
    codec, filt = split_method(method)
    stream = filter_apply(filt, data)
    if len(data) <= CHUNK_BYTES:
        return codec, [stream]
    return codec, [stream[i:i + CHUNK_BYTES] for i in range(0, len(stream), CHUNK_BYTES)]


def join_pieces(blobs: list[bytes], raw_len: int) -> bytes:
    """The compressed stream from its pieces' blobs: the one blob, or each framed by its u32 length."""
    if raw_len <= CHUNK_BYTES:
        return blobs[0]
    return b"".join(CHUNK_LEN.pack(len(b)) + b for b in blobs)


def compress_with(method: str, data: bytes) -> bytes:
    """Filter, then compress. Data longer than CHUNK_BYTES is compressed in independent CHUNK_BYTES pieces of
    the filtered stream, in parallel, each framed by its u32 length; the chunk size is fixed so that the
    bytes do not depend on the machine."""
    codec, pieces = stream_pieces(method, data)
    return join_pieces(parallel_map(lambda piece: codec_compress(codec, piece), pieces), len(data))


def decompress_with(method: str, blob: bytes, raw_len: int) -> bytes:
    missing = method_missing(method)
    if missing:  # an intact file this machine cannot read: say so, not "damaged"
        raise UserError(f"cannot decompress its {method} section: {missing}")
    codec, filt = split_method(method)
    if raw_len <= CHUNK_BYTES:
        return filter_invert(filt, codec_decompress(codec, blob), raw_len)
    pieces, pos = [], 0
    while pos < len(blob):
        (n,) = CHUNK_LEN.unpack_from(blob, pos)
        if pos + CHUNK_LEN.size + n > len(blob):
            raise UserError(f"chunk at byte {pos} runs past the end of the compressed stream")
        pieces.append(blob[pos + CHUNK_LEN.size: pos + CHUNK_LEN.size + n])
        pos += CHUNK_LEN.size + n
    stream = b"".join(parallel_map(lambda piece: codec_decompress(codec, piece), pieces))
    return filter_invert(filt, stream, raw_len)


def compress_best(data: bytes, candidates) -> tuple[str, bytes]:
    """Compress with every runnable candidate method and keep the smallest that decompresses to `data`."""
    runnable, skipped = codec_candidates(candidates)
    if not runnable:
        raise UserError(f"no compression method can run here: {skipped}")
    best = None
    for method in runnable:
        blob = compress_with(method, data)
        if best is None or len(blob) < len(best[1]):
            best = (method, blob)
    check_round_trip(best[0], best[1], data)
    return best


def check_round_trip(method: str, blob: bytes, data: bytes) -> None:
    """Refuse a blob that does not decompress to `data` (a codec bug must never reach an artifact)."""
    if decompress_with(method, blob, len(data)) != bytes(data):
        raise RuntimeError(f"compression method {method} did not round-trip; refusing to write it")


# Rough seconds per MB of each codec on int8 weights (this project's CPU), to start the longest pieces first.
CODEC_COST = {"brotli11": 3.5, "zstd22": 2.4, "lzma9e": 1.0, "lzma6": 0.5, "zlib9": 0.2, "raw": 0.0}


class Compressor:
    """The compressions of one export, over `workers` threads (default os.cpu_count()).

    `start(jobs)` queues a batch of (method, data) and returns a function that waits for it and gives the
    blobs (compress_with's bytes) in job order; `compress(jobs)` is both at once. Each job's chunks
    (stream_pieces) are queued pieces; the threads take urgent batches' pieces first, then the costliest,
    whatever batch they came from, so a batch queued while another runs shares the threads with it. With
    `cache` each result is kept by (method, length, BLAKE2b digest of the data): the same bytes are
    compressed once in the run. `batches` records each batch: the caller's `stage` label, jobs, cache hits,
    the batches waited for since the one before (after), its perf_counter start (begin) and seconds until
    waited for (wall_s), and per piece (job, codec, bytes, thread CPU seconds)."""

    def __init__(self, workers: int | None = None, cache: bool = True):
        self.workers = max(1, int(workers or os.cpu_count() or 1))
        self.kept: dict[tuple, tuple[int, list[Future]]] | None = {} if cache else None
        self.stage = ""
        self.batches: list[dict] = []
        self.queue: list[tuple] = []
        self.lock = threading.Lock()
        self.pool: ThreadPoolExecutor | None = None
        self.waited: list[int] = []

    def compress(self, jobs: list[tuple[str, bytes]]) -> list[bytes]:
        return self.start(jobs)()

    def start(self, jobs: list[tuple[str, bytes]], urgent: bool = False):
        if not jobs:
            return lambda: []
        begin = time.perf_counter()
        kept = self.kept if self.kept is not None else {}
        keys = [(m, len(d), hashlib.blake2b(d, digest_size=16).digest()) for m, d in jobs]
        record = {"stage": self.stage, "jobs": len(jobs), "urgent": urgent, "after": self.waited, "pieces": [],
                  "begin": begin}
        self.waited, tasks, fresh = [], [], 0
        for key, (method, data) in zip(keys, jobs, strict=True):
            if key not in kept:
                codec, pieces = stream_pieces(method, data)
                kept[key] = (len(data), [Future() for _ in pieces])
                tasks += [(fresh, codec, piece, f) for piece, f in zip(pieces, kept[key][1], strict=True)]
                fresh += 1
        record["hits"] = len(jobs) - fresh
        batch = len(self.batches)
        self.batches.append(record)
        self.enqueue(tasks, urgent, record["pieces"])

        def wait() -> list[bytes]:
            blobs = [join_pieces([f.result() for f in kept[key][1]], key[1]) for key in keys]
            if "wall_s" not in record:
                record["wall_s"] = time.perf_counter() - begin
                self.waited.append(batch)
            return blobs

        return wait

    def enqueue(self, tasks: list[tuple], urgent: bool, log: list) -> None:
        """Queue (job, codec, piece, future) tasks; with one worker they run here and now."""
        if self.workers == 1:
            for task in tasks:
                self.run(task, log)
            return
        with self.lock:
            for task in tasks:
                cost = CODEC_COST.get(task[1], 1.0) * len(task[2])
                heapq.heappush(self.queue, (not urgent, -cost, next(COUNTER), task, log))
        if self.pool is None and tasks:
            self.pool = ThreadPoolExecutor(max_workers=self.workers)
        for _ in tasks:
            self.pool.submit(self.run_next)

    def run_next(self) -> None:
        with self.lock:
            _, _, _, task, log = heapq.heappop(self.queue)
        self.run(task, log)

    @staticmethod
    def run(task: tuple, log: list) -> None:
        job, codec, piece, future = task
        t0 = time.thread_time()
        try:
            blob = codec_compress(codec, piece)
        except BaseException as e:  # the waiter raises it
            future.set_exception(e)
            return
        log.append((job, codec, len(piece), time.thread_time() - t0))
        future.set_result(blob)
