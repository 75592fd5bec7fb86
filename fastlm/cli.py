"""The ``fastlm`` command: ``fastlm info`` and ``fastlm finetune``."""
from __future__ import annotations

import argparse
import sys

USAGE = """usage: fastlm <command> [options]

commands:
  finetune   fine-tune a Hugging Face model with fastlm patched (no arguments: an offline demo)
  info       versions, device, and what every backend can do here

`fastlm <command> --help` for a command's options."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "info":
        parser = argparse.ArgumentParser(prog="fastlm info", description="Versions, device and backends.")
        parser.add_argument("--json", action="store_true", help="machine-readable output")
        args = parser.parse_args(rest)
        from fastlm.info import info

        print(info(as_json=args.json))
        return 0
    if command == "finetune":
        from fastlm.finetune import main as finetune_main

        return finetune_main(rest)
    print(f"fastlm: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
