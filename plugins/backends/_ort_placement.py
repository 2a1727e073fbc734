"""Which execution provider ONNX Runtime gave each node: seen, not guessed.

ONNX Runtime silently runs a node on the CPU when the CUDA provider has no
kernel for it; it says so only in its own log (a WARNING, and the per-node
list at VERBOSE), which our sessions keep at ERROR so its chatter does not
reach the terminal. ONNX Runtime has no Python API for node placement, and a
session's log level is fixed for its lifetime, so ``onnx-cuda`` creates a
probe session at VERBOSE while capturing what the native library writes to
stderr (file descriptor 2), parses the "Node placements" block
(``VerifyEachNodeIsAssignedToAnEp``) and drops the probe. Lines that the ERROR
level would have shown, and anything that is not ONNX Runtime's, are written
back to stderr.

Nodes that only compute shapes (``Shape``, ``Gather`` of dims, ``Concat`` of
dims, ...) are placed on the CPU by ONNX Runtime on purpose; any other node on
the CPU costs a device round trip per run and is what the user must hear of.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from contextlib import contextmanager
from typing import Iterator

#: ops ONNX Runtime deliberately keeps on the CPU when they compute shapes (int64 tensors)
SHAPE_OPS = frozenset(
    {"Shape", "Size", "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Cast", "Reshape", "ConstantOfShape",
     "Range", "Expand", "Identity", "Add", "Sub", "Mul", "Div", "Equal", "Where", "ReduceProd"}
)  # fmt: skip

_ORT_LINE = re.compile(r"^\S+ \S+ \[([VIWEF]):onnxruntime:")
_PLACED = re.compile(r"(?:All nodes|Node\(s\)) placed on \[(\w+)\]\. Number of nodes: (\d+)")
_NODE = re.compile(r"^  (\S+) \(")


class Captured:
    """What native code wrote to stderr during a :func:`capture_stderr` block."""

    text = ""


@contextmanager
def capture_stderr() -> Iterator[Captured]:
    """Redirect file descriptor 2 into a temporary file for the block; echo what should stay visible."""
    out = Captured()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.text = tmp.read().decode("utf-8", "replace")
            kept = visible(out.text)
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


def visible(text: str) -> str:
    """The lines a session at ERROR level would have shown, plus everything not from ONNX Runtime."""
    keep, level = [], None
    for line in text.splitlines(keepends=True):
        m = _ORT_LINE.match(line)
        if m:
            level = m.group(1)
        elif line.strip() and not line.startswith("  "):
            level = None  # not a continuation of an ONNX Runtime message (those are indented or blank)
        if level is None or level in "EF":
            keep.append(line)
    return "".join(keep)


def node_placements(text: str) -> dict[str, tuple[int, list[str]]]:
    """``{provider: (node count, op types listed)}`` from a VERBOSE session log.

    When every node is on one provider ONNX Runtime gives only the count, so
    the op list is empty.
    """
    out: dict[str, tuple[int, list[str]]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        m = _PLACED.search(line)
        if m:
            current = []
            out[m.group(1)] = (int(m.group(2)), current)
            continue
        n = _NODE.match(line)
        if n and current is not None:
            current.append(n.group(1))
        elif _ORT_LINE.match(line):
            current = None
    return out


def cpu_fallbacks(placements: dict[str, tuple[int, list[str]]], provider: str) -> tuple[int, list[str]] | None:
    """Nodes on the CPU that are not shape computations: ``(count, op types)``, or ``None``.

    An empty op list with a count means "all nodes", listed by count only.
    """
    if provider == "CPUExecutionProvider" or "CPUExecutionProvider" not in placements:
        return None
    count, ops = placements["CPUExecutionProvider"]
    if provider not in placements:
        return count, []  # everything fell back
    heavy = [op for op in ops if op not in SHAPE_OPS]
    return (len(heavy), heavy) if heavy else None


def describe(count: int, ops: list[str], total: int) -> str:
    """"3 of 19 nodes (Conv x2, Resize)" for a message."""
    if not ops:
        return f"all {count} nodes"
    counts: dict[str, int] = {}
    for op in ops:
        counts[op] = counts.get(op, 0) + 1
    listing = ", ".join(f"{op} x{n}" if n > 1 else op for op, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"{count} of {total} nodes ({listing})"
