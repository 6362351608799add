"""The dashboard's cost where users pay it: `%%distributed` cells in a real Jupyter kernel.

    python benchmarks/dashboard_kernel.py [--rounds 6]

`run.py` measures the dashboard from a script, where no widget is sent. Here nbclient plays the
notebook frontend: the kernel displays the live widget, sends a frame a second over the comm
channel and leaves the final PNG, as in JupyterLab (less the browser's own drawing). Rounds
alternate which side goes first; the table gives both medians, the paired ratio and the
kernel's CPU seconds per cell.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
STEPS = 12000  # ~15 s at ~800 steps/s per rank: the 400+ steps/s with report() every step


def cell(steps: int, dashboard: bool) -> str:
    return ("%%distributed\n" if dashboard else "%%distributed --no-dashboard\n") + (
        f"import sys\nsys.path.insert(0, {str(HERE)!r})\nfrom workload import train\n"
        f"train(steps={steps}, report=True, width=64)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=6)
    rounds = parser.parse_args().rounds
    notebook = nbformat.v4.new_notebook()
    client = NotebookClient(notebook, timeout=600, kernel_name="python3")
    rates: dict[str, list[float]] = {"on": [], "off": []}
    cpu: dict[str, list[float]] = {"on": [], "off": []}

    def run(source: str) -> str:
        cell = nbformat.v4.new_code_cell(source)
        notebook.cells.append(cell)
        client.execute_cell(cell, len(notebook.cells) - 1)
        return "".join(str(out.get("text", "")) for out in cell.outputs)

    with client.setup_kernel():
        run("%load_ext nbdist\n%nbdist start -n 2\nimport resource\n"
            "def _cpu():\n    r = resource.getrusage(resource.RUSAGE_SELF)\n    return r.ru_utime + r.ru_stime")
        run(cell(50, dashboard=True))  # warm: imports, matplotlib, the figure
        for i in range(rounds):
            for side in ("off", "on") if i % 2 == 0 else ("on", "off"):
                run("_c0 = _cpu()")
                run(cell(STEPS, dashboard=side == "on"))
                rate, seconds = map(float, run("print(_, _cpu() - _c0)").split())
                rates[side].append(rate)
                cpu[side].append(seconds)
                print(f"round {i + 1} dashboard {side:3s}: {rate:7.1f} steps/s, kernel CPU {seconds:.2f} s", flush=True)
        run("%nbdist stop")

    on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
    paired = statistics.median(a / b for a, b in zip(rates["on"], rates["off"], strict=True))
    print(f"\n| measure (median of {rounds}) | dashboard on | dashboard off | ratio |")
    print("| --- | --- | --- | --- |")
    print(f"| steps/s per rank | {on:.1f} | {off:.1f} | {on / off:.3f}x (paired {paired:.3f}x; goal >= 0.98x) |")
    print(f"| kernel CPU s per cell | {statistics.median(cpu['on']):.2f} | {statistics.median(cpu['off']):.2f} | |")


if __name__ == "__main__":
    main()
