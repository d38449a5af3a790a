"""Command-line commands: argparse, file I/O and exit codes; one module per command, ``main(argv) -> int``."""
