"""How much a running render has written to a file-sink output.

The file sink writes a hidden partial file beside the target and renames it on
success (``plugins/sinks/_outfile.py``), so a test that waits for a render to
be under way looks at the partial file as well as the target.
"""

from __future__ import annotations

from pathlib import Path


def bytes_written(out: Path) -> int:
    """Bytes in ``out`` or in its partial file(s), whichever exist."""
    paths = [out, *out.parent.glob(f".{out.name}*partial*")]
    total = 0
    for p in paths:
        try:
            total += p.stat().st_size
        except FileNotFoundError:  # renamed or removed between the listing and the stat
            pass
    return total
