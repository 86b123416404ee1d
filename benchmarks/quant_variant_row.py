"""One JSON line of benchmarks/quant_variants_device.sh: a re-quantization's overrides, bytes, fitted k,
seconds and round-trip bpb against its run's pre-quant bpb (missing files give nulls, so a failed variant still
has its row).

usage: python benchmarks/quant_variant_row.py VARIANT RUN/record.json QUANT.json EVAL.json
"""

import json
import sys
from pathlib import Path


def read_json(path: str) -> dict:
    p = Path(path)
    try:
        return json.loads(p.read_text()) if p.exists() else {}
    except json.JSONDecodeError:
        return {}


def variant_row(variant: str, record: dict, quant: dict, ev: dict) -> dict:
    prequant = (record.get("metrics") or {}).get("prequant_bpb")
    plain = (ev.get("results") or {}).get("plain") or {}
    bpb = plain.get("val_bpb")
    timings = quant.get("timings") or {}
    return {"variant": variant, "prequant_bpb": prequant, "roundtrip_bpb": bpb,
            "quant_delta": bpb - prequant if bpb is not None and prequant is not None else None,
            "bytes_total": (quant.get("bytes") or {}).get("total"), "fits": (quant.get("bytes") or {}).get("fits"),
            "fit_k": (quant.get("fit_k") or {}).get("k"), "quantize_s": timings.get("quantize_s"),
            "fit_k_s": timings.get("fit_k_s"), "serialize_s": timings.get("serialize_s"),
            "eval_tokens": plain.get("tokens"), "eval_s": plain.get("seconds")}


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    variant, record, quant, ev = argv
    print(json.dumps(variant_row(variant, read_json(record), read_json(quant), read_json(ev))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
