"""The TensorFlow row of run.py, repeated: is nbdist at parity in every run, not on average?

    python benchmarks/tf_parity.py [runs] [rounds]

Each run is what run.py does for that row: `rounds` alternating pairs of two plain processes
with a hand-written TF_CONFIG and a `%%distributed` cell on a 2-engine pool, medians compared.
Prints every round's rates, so a bimodal side would show."""

from __future__ import annotations

import statistics
import sys

from run import pair, tf_nbdist_rate, tf_plain_rate  # beside this file

import nbdist


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    steps = 400
    ratios = []
    with nbdist.Pool(2) as pool:
        tf_nbdist_rate(pool, 20)  # the pool switches to TensorFlow (a restart) and warms up
        for run in range(runs):
            ours: list[float] = []
            theirs: list[float] = []
            for i in range(rounds):
                pair(i, lambda: theirs.append(tf_plain_rate(steps)),  # noqa: B023
                     lambda: ours.append(tf_nbdist_rate(pool, steps)))  # noqa: B023
            ratio = statistics.median(ours) / statistics.median(theirs)
            ratios.append(ratio)
            print(f"run {run + 1}: nbdist {' '.join(f'{r:.1f}' for r in ours)} | plain "
                  f"{' '.join(f'{r:.1f}' for r in theirs)} | ratio of medians {ratio:.3f}x", flush=True)
    met = sum(r >= 0.98 for r in ratios)
    print(f"{met} of {runs} runs at >= 0.98x (min {min(ratios):.3f}x, max {max(ratios):.3f}x)")


if __name__ == "__main__":
    main()
