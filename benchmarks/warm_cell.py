"""Where an empty `%%distributed` cell's time goes, beside ipyparallel's own round trips.

    python benchmarks/warm_cell.py [repeats]

Prints medians, in one run: the whole cell (`Pool.run("")`), the part spent in nbdist's code on
the engine (`run_cell`, measured there), and `apply_sync` of a no-op on one engine and on both.
What the cell costs beyond `apply_sync` on both engines is the kernel's own work (dispatch, the
poll loop, output and metrics collection)."""

from __future__ import annotations

import sys

from run import median_ms as _median_ms  # beside this file: `python benchmarks/warm_cell.py`

import nbdist


def _engine_side_ms(repeats: int) -> float:
    """Runs on an engine: nbdist's per-cell work alone, without the round trip."""
    import time

    from nbdist.engine import _cell

    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        _cell.run_cell("", "warm", "torch", "ddp", True)
        times.append(time.perf_counter() - started)
    times.sort()
    return times[len(times) // 2] * 1000


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    with nbdist.Pool(2) as pool:
        pool.run("import torch")
        for _ in range(20):
            pool.run("")
        one = pool.views[0]
        both = one.client[[engine.engine_id for engine in pool.engines]]
        rows = [
            ("empty cell, Pool.run('')", _median_ms(lambda: pool.run(""), repeats)),
            ("  of which nbdist on the engine (run_cell)", float(one.apply_sync(_engine_side_ms, repeats))),
            ("apply_sync(no-op), both engines", _median_ms(lambda: both.apply_sync(lambda: None), repeats)),
            ("apply_sync(no-op), one engine", _median_ms(lambda: one.apply_sync(lambda: None), repeats)),
        ]
    for name, ms in rows:
        print(f"{name:<45} {ms:7.2f} ms")
    cell, _, raw_both, raw_one = (ms for _, ms in rows)
    print(f"cell / both engines {cell / raw_both:.2f}x, cell / one engine {cell / raw_one:.2f}x (goal <= 1.5x)")


if __name__ == "__main__":
    main()
