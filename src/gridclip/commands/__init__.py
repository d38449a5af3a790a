"""The commands of ``gridclip <command>``: argparse, file I/O and exit codes, one module per command,
each exposing ``main(argv: list[str]) -> int``; ``gridclip.cli`` maps the names to them."""
