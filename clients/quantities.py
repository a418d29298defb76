"""CPU and memory amounts as people write them: `2`, `0.5`, `500m` cores; `512Mi`, `4GiB`, `2G` bytes.

One parser for the CLI's `submit --cpu/--memory`, the supervisor's `--cpu/--memory` and the SDK's
capacity, so the same text means the same amount everywhere. Errors are ValueErrors whose message
is one readable line.
"""

from __future__ import annotations

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1

# Memory sizes as Kubernetes writes them (512Mi, 2G, 1048576), a trailing B allowed (4GiB, 2GB).
_MEMORY_UNITS = {
    "": 1,
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
    "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40,
}  # fmt: skip


def parse_cpu(text: str) -> int:
    """Millicores from cores (`2`, `0.5`) or millicores (`500m`); ValueError when it is neither."""
    text = text.strip()
    try:
        millis = int(text[:-1]) if text.endswith("m") else round(float(text) * 1000)
    except (ValueError, OverflowError):
        raise ValueError(f"not a CPU amount (cores: 2 or 0.5, or millicores: 500m): {text!r}") from None
    if not 0 <= millis <= UINT32_MAX:
        raise ValueError(f"CPU amount out of range: {text!r}")
    return millis


def parse_memory(text: str) -> int:
    """Bytes from `1048576`, `512Mi`, `512MiB`, `2G`, `4GiB`, ...; ValueError when it is not a size."""
    text = text.strip()
    body = text[:-1] if text[-1:] in ("B", "b") else text
    number = body.rstrip("KMGTkmgtIi")
    unit = _MEMORY_UNITS.get(body[len(number) :].lower())
    try:
        value = round(float(number) * unit) if unit is not None and number else -1
    except (ValueError, OverflowError):
        value = -1
    if not 0 <= value <= UINT64_MAX:
        raise ValueError(f"not a memory size (bytes, or with Ki, Mi, Gi, Ti, K, M, G, T, B optional): {text!r}")
    return value


__all__ = ["UINT32_MAX", "UINT64_MAX", "parse_cpu", "parse_memory"]
