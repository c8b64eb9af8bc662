"""Command line: turn text files or folders into an fp8train token dataset.

    python -m fp8train.data.prepare --input ~/texts docs/README.md --output data/mytexts \\
        [--tokenizer byte|bpe] [--vocab-size 4096] [--val-fraction 0.05] \\
        [--glob '*.py,*.txt,*.md,*.rst'] [--max-bytes N] [--overwrite] [--quiet]

Folders are walked recursively in sorted order and filtered by --glob; files named directly are
always included. Each file is one document; documents are separated by the eos token and
assigned whole to train or val. See fp8train/data/builder.py for the exact steps.
"""

from __future__ import annotations

import argparse
import sys

from fp8train.data.builder import DEFAULT_GLOB, prepare_dataset
from fp8train.data.token_file import TokenFile


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fp8train.data.prepare",
        description="Tokenize text files into train.bin / val.bin / meta.json.")
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="text files and/or folders (folders are searched recursively)")
    parser.add_argument("--output", required=True, metavar="DIR", help="dataset folder to write")
    parser.add_argument("--tokenizer", choices=("byte", "bpe"), default="byte")
    parser.add_argument("--vocab-size", type=int, default=4096,
                        help="BPE vocabulary size (ignored by the byte tokenizer, which has 257)")
    parser.add_argument("--val-fraction", type=float, default=0.05,
                        help="fraction of the bytes (whole documents) held out for validation")
    parser.add_argument("--glob", default=DEFAULT_GLOB,
                        help="comma-separated file name patterns used inside folders")
    parser.add_argument("--max-bytes", type=int, default=None,
                        help="stop after this many bytes of input text")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a different dataset already in --output")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        output_dir = prepare_dataset(
            args.input, args.output, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
            val_fraction=args.val_fraction, max_bytes=args.max_bytes, glob=args.glob,
            overwrite=args.overwrite, progress=not args.quiet)
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"error: {error}\n")
    for split in ("train", "val"):
        token_file = TokenFile(output_dir, split)
        print(f"{split}: {token_file.num_tokens:,} tokens -> {token_file.path}")
    print(f"vocab_size {token_file.vocab_size}, eos_id {token_file.eos_id}, "
          f"meta: {token_file.meta_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
