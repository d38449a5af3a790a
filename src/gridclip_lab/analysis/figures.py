"""Writing the analyses' matplotlib figures."""
from __future__ import annotations

import os

from gridclip.utils.atomic import atomic_open


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | os.PathLike, dpi: int) -> None:
    """Write ``fig`` as a PNG atomically (a crash never leaves half a file), then close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png", dpi=dpi)
    finally:
        plt.close(fig)
