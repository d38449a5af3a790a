"""The command layer: one module per ``gridclip`` command, each with ``main(argv) -> int``.

Commands own argparse, file I/O and exit codes; the library functions they call take and return
objects. ``gridclip.cli`` dispatches to them; bad input raised as ``ValueError`` / ``OSError`` becomes
one line on stderr and exit code 2 there.
"""
