"""Checkpoint throughput: fnloop save/restore vs raw torch.save/torch.load, async blocking time, save memory.

Every figure is measured side by side in one run, on the same tensors and the same local
temporary folder, in ``--repeat`` rounds. Times are medians over rounds; ratios are throughput
ratios (fnloop / raw: above 1 means fnloop is faster), the median over rounds of the ratio
within each round (the contenders run back to back, so a slow phase of the machine hits both).

* save: fnloop writes, checksums and fsyncs every file and folder; it is compared with
  ``torch.save`` followed by ``os.fsync`` (the same durability) and with plain ``torch.save``.
  The three run in an order that rotates from round to round, as the reads do: a save right
  after another finds the disk still busy with the other's bytes.
* restore: ``torch.load(weights_only=True)`` and fnloop read the same tensors in the same
  cache state: ``warm`` (both files in the page cache, read once before timing) and ``cold``
  (both files dropped from the page cache with ``posix_fadvise(DONTNEED)`` before each read),
  and into the same kind of memory: before each timed read the C allocator hands its free
  memory back to the kernel (``malloc_trim(0)``, glibc), so every contender's tensors are new
  pages, as in a process that restores once when it starts. Without that, a read whose tensors
  land in memory another read freed skips the page faults of the others (about 40 ms per
  100 MiB on a virtual machine), and the ratio measures the allocator, not the reader.
* async: how long ``CheckpointManager(async_save=True).save`` of a ``TrainState`` (what the training
  loop saves) blocks, vs a synchronous save; a plain dict is copied first and shown for comparison.
* memory: the peak resident memory a synchronous save adds, measured in a fresh process
  (``VmHWM`` after the save minus ``VmRSS`` before it), vs the state's size.

    python benchmarks/checkpoint.py                  # 100 MiB, readable table
    python benchmarks/checkpoint.py --mb 100 1024    # 100 MiB and 1 GiB side by side
    python benchmarks/checkpoint.py --json           # one JSON line
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fnloop.checkpoint import CheckpointManager, restore, save  # noqa: E402

SAVES = ("torch_save", "torch_save_fsync", "fnloop_save")
LOADS = ("torch_load", "fnloop_restore", "fnloop_restore_noverify")
TARGETS = {  # ratio: (minimum or maximum, target)
    "save_ratio_vs_fsync": (">=", 1.0),
    "save_ratio": (">=", 0.8),
    "restore_ratio_warm": (">=", 0.9),
    "restore_ratio_noverify_warm": (">=", 1.0),
    "restore_ratio_cold": (">=", 0.9),
    "restore_ratio_noverify_cold": (">=", 1.0),
    "async_blocking_fraction": ("<=", 0.1),
    "save_memory_fraction": ("<=", 0.1),
}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _torch_save_fsync(state: dict, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def _files(path: str) -> list[str]:
    if os.path.isdir(path):
        return [os.path.join(path, n) for n in sorted(os.listdir(path))]
    return [path]


_SCRATCH = memoryview(bytearray(1 << 20))


try:
    _TRIM: Any = ctypes.CDLL(None).malloc_trim  # glibc
except (OSError, AttributeError):
    _TRIM = None


def _fresh_memory() -> None:
    """Hand the allocator's free memory back to the kernel: the next allocations get new pages."""
    if _TRIM is not None:
        _TRIM(0)


def _rotated(kinds: list, turn: int) -> list:
    """``kinds`` starting at ``turn``: who runs after whom changes from round to round."""
    return kinds[turn % len(kinds) :] + kinds[: turn % len(kinds)]


def _warm(path: str) -> None:
    """Read the file(s) once into the page cache, through one small reused buffer (no allocation)."""
    for name in _files(path):
        with open(name, "rb", buffering=0) as f:
            while f.readinto(_SCRATCH):
                pass


def _drop(path: str) -> None:
    for name in _files(path):
        fd = os.open(name, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def make_state(megabytes: float, tensors: int) -> dict[str, torch.Tensor]:
    """``tensors`` float32 tensors of ``megabytes`` MiB in all, filled in place (no temporary copy)."""
    numel = int(megabytes * 2**20 / 4 / tensors)
    gen = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.empty(numel).normal_(generator=gen) for i in range(tensors)}


def as_train_state(tensors: dict[str, torch.Tensor]) -> Any:
    """A ``TrainState`` holding ``tensors`` as its params (what the training loop saves)."""
    import fnloop as fl
    import fnloop.optim as flo

    module = torch.nn.Module()
    params = {}
    for i, t in enumerate(tensors.values()):
        module.register_parameter(f"p{i}", torch.nn.Parameter(torch.empty_like(t, device="meta")))
        params[f"p{i}"] = t
    return fl.TrainState(
        step=torch.zeros((), dtype=torch.int64), params=params, buffers={}, opt_state=(), rng=torch.zeros((), dtype=torch.int64),
        loop=fl.LoopState(), module=module, tx=flo.sgd(lr=0.1),
    )


def _loads(raw: str, url: str, like: dict, cache: str, turn: int) -> dict[str, float]:
    """One timing of each load; the order rotates with ``turn`` (what the allocator holds depends on
    what ran before)."""
    prepare = _warm if cache == "warm" else _drop
    kinds = [
        ("torch_load", raw, lambda: torch.load(raw, weights_only=True)),
        ("fnloop_restore", url, lambda: restore(url, like=like)),
        ("fnloop_restore_noverify", url, lambda: restore(url, like=like, verify=False)),
    ]
    out = {}
    for kind, path, fn in _rotated(kinds, turn):
        prepare(path)
        _fresh_memory()
        out[kind] = _timed(fn)
    return out


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _memory_child(megabytes: float, tensors: int, directory: str) -> dict[str, int]:
    """In a fresh process: the peak resident memory a save adds (fnloop, then torch.save + fsync).

    The peak is ``VmHWM``, reset to the current resident size before each save through
    ``/proc/self/clear_refs`` (``ru_maxrss`` is no use here: it keeps the parent's peak across exec).
    """
    state = make_state(megabytes, tensors)
    save({"warmup": torch.zeros(1)}, os.path.join(directory, "warmup"))  # imports, first thread start
    out = {}
    for kind, fn in [
        ("fnloop_save", lambda: save(state, os.path.join(directory, "mem-ckpt"))),
        ("torch_save_fsync", lambda: _torch_save_fsync(state, os.path.join(directory, "mem.pt"))),
    ]:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_bytes("VmRSS")
        fn()
        out[f"{kind}_extra_bytes"] = max(0, _status_bytes("VmHWM") - before)
    return out


def save_memory(megabytes: float, tensors: int, directory: str) -> dict[str, int]:
    work = tempfile.mkdtemp(prefix="fnloop-bench-mem-", dir=directory)
    try:
        code = (
            "import json, sys; sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + '/benchmarks');"
            "import checkpoint as b; print(json.dumps(b._memory_child(float(sys.argv[2]), int(sys.argv[3]), sys.argv[4])))"
        )
        args = [sys.executable, "-c", code, ROOT, str(megabytes), str(tensors), work]
        done = subprocess.run(args, capture_output=True, text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _saves(state: dict, raw: str, url: str, turn: int) -> dict[str, float]:
    """One timing of each save; the order rotates with ``turn``: a save that follows another
    finds the disk still busy with what that one wrote (a virtual machine's host flushes late)."""
    kinds = [
        ("torch_save", lambda: torch.save(state, raw + ".plain")),
        ("torch_save_fsync", lambda: _torch_save_fsync(state, raw)),
        ("fnloop_save", lambda: save(state, url)),
    ]
    return {kind: _timed(fn) for kind, fn in _rotated(kinds, turn)}


def _paired(times: dict[str, list[float]], reference: str, contender: str) -> float:
    """The median over rounds of ``reference``'s time over ``contender``'s in the same round: both
    timed back to back, so a slow phase of the machine hits both sides of each ratio."""
    return round(statistics.median(r / c for r, c in zip(times[reference], times[contender])), 3)


def run(megabytes: float, tensors: int, repeat: int, directory: str) -> dict:
    state = make_state(megabytes, tensors)
    like = {k: torch.empty_like(v) for k, v in state.items()}
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    work = tempfile.mkdtemp(prefix="fnloop-bench-", dir=directory)
    times: dict[str, list[float]] = {k: [] for k in (*SAVES, *(f"{k}_{c}" for k in LOADS for c in ("warm", "cold")))}
    try:
        for i in range(repeat + 1):
            raw, url = os.path.join(work, f"raw-{i}.pt"), os.path.join(work, f"ckpt-{i}")
            round_ = _saves(state, raw, url, i)
            for cache in ("warm", "cold"):
                round_.update({f"{k}_{cache}": v for k, v in _loads(raw, url, like, cache, i).items()})
            if i > 0:  # the first round warms up allocators and threads
                for k, v in round_.items():
                    times[k].append(v)
            for path in (raw, raw + ".plain"):
                os.remove(path)
            shutil.rmtree(url)

        blocking, copying, sync_times = [], [], []
        train_state = as_train_state(state)
        background = CheckpointManager(os.path.join(work, "async"), async_save=True, keep_last=1)
        foreground = CheckpointManager(os.path.join(work, "sync"), keep_last=1)
        with background, foreground:
            for step in range(1, repeat + 2):
                took = _timed(lambda: background.save(train_state, step=step))  # the training loop's case
                background.wait()
                copied = _timed(lambda: background.save(state, step=step))  # a plain dict is copied first
                background.wait()
                sync_took = _timed(lambda: foreground.save(train_state, step=step))
                if step > 1:  # the first async save allocates its copy buffers
                    blocking.append(took)
                    copying.append(copied)
                    sync_times.append(sync_took)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    memory = save_memory(megabytes, tensors, directory)

    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "bytes": nbytes,
        "repeat": repeat,
        **{f"{k}_s": round(v, 5) for k, v in med.items()},
        "save_ratio": _paired(times, "torch_save", "fnloop_save"),
        "save_ratio_vs_fsync": _paired(times, "torch_save_fsync", "fnloop_save"),
    }
    for cache in ("warm", "cold"):
        out[f"restore_ratio_{cache}"] = _paired(times, f"torch_load_{cache}", f"fnloop_restore_{cache}")
        out[f"restore_ratio_noverify_{cache}"] = _paired(times, f"torch_load_{cache}", f"fnloop_restore_noverify_{cache}")
    out["async_blocking_s"] = round(statistics.median(blocking), 5)
    out["async_dict_copy_s"] = round(statistics.median(copying), 5)
    out["sync_save_s"] = round(statistics.median(sync_times), 5)
    out["async_blocking_fraction"] = round(out["async_blocking_s"] / out["sync_save_s"], 3)
    out.update(memory)
    out["save_memory_fraction"] = round(memory["fnloop_save_extra_bytes"] / nbytes, 3)
    return out


def _report(r: dict, tensors: int) -> None:
    mb = r["bytes"] / 2**20
    print(f"state: {mb:.0f} MiB in {tensors} float32 tensors, median of {r['repeat']} rounds")
    kinds = [*SAVES, *(f"{k}_{c}" for c in ("warm", "cold") for k in LOADS)]
    for k in kinds:
        print(f"  {k:<30} {r[k + '_s'] * 1e3:8.1f} ms  {mb / r[k + '_s']:8.0f} MiB/s")
    print(
        f"  async save of a TrainState blocks {r['async_blocking_s'] * 1e3:.1f} ms (of a plain dict, copied first: "
        f"{r['async_dict_copy_s'] * 1e3:.1f} ms), a sync save takes {r['sync_save_s'] * 1e3:.1f} ms"
    )
    extra, theirs = r["fnloop_save_extra_bytes"] / 2**20, r["torch_save_fsync_extra_bytes"] / 2**20
    print(f"  save peak extra memory {extra:.1f} MiB (torch.save+fsync: {theirs:.1f} MiB)")
    for name, (op, target) in TARGETS.items():
        value = r[name]
        ok = value >= target if op == ">=" else value <= target
        print(f"  {name:<30} {value:6.3f}  (target {op} {target})  {'ok' if ok else 'MISSED'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, nargs="+", default=[100.0], help="state sizes in MiB (e.g. 100 1024)")
    parser.add_argument("--tensors", type=int, default=4, help="number of float32 tensors")
    parser.add_argument("--repeat", type=int, default=5, help="measured rounds (median)")
    parser.add_argument("--dir", default=None, help="local folder for the files (default: the temp dir)")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()
    results = {f"{mb:g}MiB": run(mb, args.tensors, args.repeat, args.dir or tempfile.gettempdir()) for mb in args.mb}
    if args.json:
        print(json.dumps(results))
        return
    for r in results.values():
        _report(r, args.tensors)


if __name__ == "__main__":
    main()
