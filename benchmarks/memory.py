"""Resident memory of this process on Linux: current RSS, and a peak that can be reset.

Writing ``5`` to ``/proc/self/clear_refs`` resets the kernel's high-water mark (``VmHWM``), so a
benchmark can measure the peak of one section without what came before it.
"""

from __future__ import annotations


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss() -> int:
    """Current resident set size in bytes."""
    return _status_kib("VmRSS") * 1024


def reset_peak() -> None:
    """Reset the peak RSS to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak() -> int:
    """Peak resident set size in bytes since the last :func:`reset_peak` (or process start)."""
    return _status_kib("VmHWM") * 1024


def peak_in_child(code_template: str, which: str) -> int:
    """Run ``code_template`` (formatted with ``here``, this folder, and ``which``) in a fresh
    Python process; it prints a byte count last, which is returned."""
    import os
    import subprocess
    import sys

    code = code_template.format(here=os.path.dirname(os.path.abspath(__file__)), which=which)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])
