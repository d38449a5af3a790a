"""Command-line front ends: one module per ``gridclip`` command, each ``main(argv) -> int``."""
