"""`pgolf data ...`: verify shards, download FineWeb, build shards from JSONL, train a tokenizer, stdlib corpus."""

from pathlib import Path

from pgolf.errors import UserError


def add_data_commands(subparsers) -> None:
    data = subparsers.add_parser("data", help="datasets: verify, download, build shards, train tokenizers")
    sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)

    p = sub.add_parser("verify", help="check shard files (header, size, token ids, the sha256 a folder's "
                                      "manifest.json records) and print their sha256")
    p.add_argument("paths", nargs="+", metavar="FILE|DIR", help="shard files or folders of *.bin shards")
    p.add_argument("--vocab-size", type=int, default=None, help="fail if a token id is >= this")
    p.add_argument("--docs", nargs="+", default=None,
                   help="the JSONL sources a folder was built from: each val document's byte-sidecar sum must "
                        "equal its text's UTF-8 length")
    p.set_defaults(func=cmd_data_verify)

    p = sub.add_parser("fineweb", help="download the challenge's FineWeb shards + tokenizer from the HF hub",
                       epilog="No CaseOps variant here (the hub manifest names none that pgolf knows): build CaseOps "
                              "FineWeb shards (and the val byte sidecar) from the FineWeb documents as JSONL with "
                              "`pgolf data build --caseops "
                              "--tokenizer fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model --val-docs 50000 "
                              "--docs DOCS.jsonl --out DIR`.")
    p.add_argument("--variant", choices=["sp1024", "sp8192"], default="sp1024")
    p.add_argument("--train-shards", type=int, default=1, help="number of training shards (100M tokens each)")
    p.add_argument("--out", default="data/fineweb", help="output folder (datasets/ and tokenizers/ inside)")
    p.set_defaults(func=cmd_data_fineweb)

    p = sub.add_parser("build", help="tokenize JSONL documents into val/train shards")
    p.add_argument("--docs", nargs="+", required=True, help="JSONL files (.jsonl, .xz, .gz, .zst), in order")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model")
    p.add_argument("--val-docs", type=int, required=True, help="the first N documents are the validation split")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: CPU count)")
    p.add_argument("--caseops", action="store_true",
                   help="apply the lossless_caps_caseops_v1 transform before tokenizing (a CaseOps tokenizer) and "
                        "write the val byte sidecar fineweb_val_bytes_*.bin")
    p.set_defaults(func=cmd_data_build)

    p = sub.add_parser("tokenizer", help="train a SentencePiece BPE tokenizer (challenge settings)")
    p.add_argument("--docs", nargs="+", required=True, help="JSONL files (.jsonl, .xz, .gz, .zst)")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--max-docs", type=int, default=None, help="use only the first N documents")
    p.add_argument("--out", required=True, help="output .model path")
    p.set_defaults(func=cmd_data_tokenizer)

    p = sub.add_parser("stdlib-corpus", help="write a JSONL corpus of the Python standard library's docs")
    p.add_argument("--out", required=True, help="output .jsonl path")
    p.add_argument("--max-bytes", type=int, default=None)
    p.set_defaults(func=cmd_data_stdlib_corpus)


def _verify_targets(paths) -> list[Path]:
    from pgolf.data.shards import is_byte_sidecar

    files = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.glob("*.bin") if not is_byte_sidecar(p))
            if not found:
                raise UserError(f"{path}: no *.bin shard in this folder")
            files += found
        else:
            files.append(path)
    return files


def cmd_data_verify(args) -> int:
    from pgolf.data.build import shard_file_sha256
    from pgolf.data.manifest import DataManifestError, manifest_shard_hashes
    from pgolf.data.shards import read_shard
    from pgolf.data.sidecar_verify import verify_val_sidecar

    total, manifests = 0, {}
    for path in _verify_targets(args.paths):
        tokens = read_shard(path, args.vocab_size)
        total += tokens.size
        digest = shard_file_sha256(path)
        print(f"{path.name}  {tokens.size:>12,} tokens  sha256 {digest}")
        if path.parent not in manifests:
            manifests[path.parent] = manifest_shard_hashes(path.parent)
        recorded = manifests[path.parent].get(path.name)
        if recorded is not None and recorded != digest:
            raise DataManifestError(f"{path}: sha256 {digest}, but {path.parent / 'manifest.json'} records "
                                    f"{recorded}")
    for folder in [Path(p) for p in args.paths if Path(p).is_dir()]:
        report = verify_val_sidecar(folder, args.docs)
        if report is not None:
            docs = f", {report['docs_checked']:,} against their source text" if report["docs_checked"] else ""
            print(f"{folder}: byte sidecar ok ({report['text_transform']}): {report['tokens']:,} val tokens, "
                  f"{report['docs']:,} documents starting with BOS{docs}, {report['bytes']:,} bytes")
    print(f"ok: {total:,} tokens")
    return 0


def cmd_data_fineweb(args) -> int:
    from pgolf.data.fineweb import download_fineweb

    paths = download_fineweb(args.variant, args.train_shards, args.out)
    print(f"ok: {len(paths)} files under {args.out}")
    return 0


def cmd_data_build(args) -> int:
    from pgolf.data.build import build_split_shards

    manifest = build_split_shards(args.docs, args.tokenizer, args.val_docs, args.out, workers=args.workers,
                                  caseops=args.caseops)
    for f in manifest["files"] + manifest.get("byte_sidecar", {}).get("files", []):
        print(f"{f['name']}  {f['tokens']:>12,} tokens  sha256 {f['sha256']}")
    return 0


def cmd_data_tokenizer(args) -> int:
    from pgolf.data.tokenizer import train_tokenizer_from_docs

    out = train_tokenizer_from_docs(args.docs, args.vocab_size, args.out, max_docs=args.max_docs)
    print(f"wrote {out}")
    return 0


def cmd_data_stdlib_corpus(args) -> int:
    from pgolf.data.stdlib_corpus import write_stdlib_corpus

    docs, size = write_stdlib_corpus(args.out, args.max_bytes)
    print(f"wrote {args.out}: {docs} documents, {size:,} bytes of text")
    return 0
