"""Checkpoint throughput: fnloop save/restore vs raw torch.save/torch.load, and async blocking time.

Every figure is measured side by side in one run, on the same tensors and the same local
temporary folder, as the median of ``--repeat`` rounds. Ratios are throughput ratios
(fnloop / raw: above 1 means fnloop is faster). fnloop saves fsync every file and folder
and hash the tensor file; ``torch.save`` does neither, so ``torch.save + fsync`` is printed
as well for reference.

    python benchmarks/checkpoint.py            # readable table
    python benchmarks/checkpoint.py --json     # one JSON line
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fnloop.checkpoint import CheckpointManager, restore, save  # noqa: E402


KINDS = ("torch_save", "torch_save_fsync", "fnloop_save", "torch_load", "fnloop_restore", "fnloop_restore_noverify")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _torch_save_fsync(state: dict, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def run(megabytes: float, tensors: int, repeat: int, directory: str) -> dict:
    numel = int(megabytes * 2**20 / 4 / tensors)
    gen = torch.Generator().manual_seed(0)
    state = {f"layer{i}.weight": torch.randn(numel, generator=gen) for i in range(tensors)}
    like = {k: torch.empty_like(v) for k, v in state.items()}
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    work = tempfile.mkdtemp(prefix="fnloop-bench-", dir=directory)
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    try:
        for i in range(repeat + 1):
            raw, url = os.path.join(work, f"raw-{i}.pt"), os.path.join(work, f"ckpt-{i}")
            round_ = {
                "torch_save": _timed(lambda: torch.save(state, raw)),
                "torch_save_fsync": _timed(lambda: _torch_save_fsync(state, raw + ".sync")),
                "fnloop_save": _timed(lambda: save(state, url)),
                "torch_load": _timed(lambda: torch.load(raw, weights_only=True)),
                "fnloop_restore": _timed(lambda: restore(url, like=like)),
                "fnloop_restore_noverify": _timed(lambda: restore(url, like=like, verify=False)),
            }
            if i > 0:  # the first round warms up allocators and the page cache
                for k, v in round_.items():
                    times[k].append(v)
            os.remove(raw)
            os.remove(raw + ".sync")
            shutil.rmtree(url)

        blocking, sync_times, first_blocking = [], [], None
        background = CheckpointManager(os.path.join(work, "async"), async_save=True, keep_last=1)
        foreground = CheckpointManager(os.path.join(work, "sync"), keep_last=1)
        with background, foreground:
            for step in range(1, repeat + 2):
                took = _timed(lambda: background.save(state, step=step))
                background.wait()
                sync_took = _timed(lambda: foreground.save(state, step=step))
                if step == 1:
                    first_blocking = took
                else:
                    blocking.append(took)
                    sync_times.append(sync_took)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    async_blocking = statistics.median(blocking)
    sync_save = statistics.median(sync_times)
    return {
        "bytes": nbytes,
        "repeat": repeat,
        **{f"{k}_s": round(v, 5) for k, v in med.items()},
        "save_ratio": round(med["torch_save"] / med["fnloop_save"], 3),
        "save_ratio_vs_fsync": round(med["torch_save_fsync"] / med["fnloop_save"], 3),
        "restore_ratio": round(med["torch_load"] / med["fnloop_restore"], 3),
        "restore_ratio_noverify": round(med["torch_load"] / med["fnloop_restore_noverify"], 3),
        "async_blocking_s": round(async_blocking, 5),
        "async_first_blocking_s": round(first_blocking or 0.0, 5),
        "sync_save_s": round(sync_save, 5),
        "async_blocking_fraction": round(async_blocking / sync_save, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=100.0, help="state size in MiB")
    parser.add_argument("--tensors", type=int, default=4, help="number of float32 tensors")
    parser.add_argument("--repeat", type=int, default=5, help="measured rounds (median)")
    parser.add_argument("--dir", default=None, help="local folder for the files (default: the temp dir)")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()
    r = run(args.mb, args.tensors, args.repeat, args.dir or tempfile.gettempdir())
    if args.json:
        print(json.dumps(r))
        return
    mb = r["bytes"] / 2**20
    print(f"state: {mb:.0f} MiB in {args.tensors} float32 tensors, median of {r['repeat']} rounds")
    for k in KINDS:
        print(f"  {k:<24} {r[k + '_s'] * 1e3:8.1f} ms  {mb / r[k + '_s']:8.0f} MiB/s")
    print(f"save    fnloop/torch.save throughput:        {r['save_ratio']:.2f}  (target >= 0.8)")
    print(f"save    fnloop/(torch.save+fsync) throughput: {r['save_ratio_vs_fsync']:.2f}")
    print(f"restore fnloop/torch.load throughput:         {r['restore_ratio']:.2f}  (target >= 0.8; sha256 verified)")
    print(f"restore fnloop(verify=False)/torch.load:      {r['restore_ratio_noverify']:.2f}")
    blocks, first, sync = (r[k] * 1e3 for k in ("async_blocking_s", "async_first_blocking_s", "sync_save_s"))
    print(
        f"async save blocks {blocks:.1f} ms (first save {first:.1f} ms) vs sync {sync:.1f} ms: "
        f"{r['async_blocking_fraction']:.0%} (target <= 20%)"
    )


if __name__ == "__main__":
    main()
