"""A scheduler job's state, asked of the scheduler itself, so that a job that ended (or was
never started) ends `start` within seconds, with its state and the tail of its output,
instead of the whole start timeout passing in silence.

ipyparallel's batch launchers submit the job script and return; they never look at the job
again (their `poll()` answers nothing). Slurm keeps a finished job in `scontrol show job` for
a few minutes (`MinJobAge`), which is all that is needed here; Grid Engine forgets it at once,
so a job `qstat` no longer knows has ended.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import Any

SLURM_LIVE = ("PENDING", "CONFIGURING", "RUNNING", "RESIZING", "SUSPENDED", "REQUEUED")
ASK_EVERY = 1.0  # seconds between two questions to the scheduler


@dataclass(frozen=True)
class JobState:
    job_id: str
    state: str
    """The scheduler's word (`PENDING`, `RUNNING`, `FAILED`, ...); `ENDED` when it no longer knows the job."""
    reason: str = ""

    @property
    def live(self) -> bool:
        return self.state in SLURM_LIVE or self.state in ("qw", "hqw", "r", "t", "Rr", "Rt")

    def describe(self) -> str:
        why = f", reason {self.reason}" if self.reason and self.reason != "None" else ""
        return f"job {self.job_id} is {self.state}{why}"


def _run(args: list[str]) -> tuple[int, str]:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 1, str(exc)
    return done.returncode, done.stdout + done.stderr


def slurm_state(job_id: str) -> JobState:
    code, out = _run(["scontrol", "show", "job", "-o", job_id])
    if code != 0:
        return JobState(job_id, "ENDED")
    fields = dict(part.split("=", 1) for part in out.split() if "=" in part)
    exit_code = fields.get("ExitCode", "")
    reason = fields.get("Reason", "")
    if exit_code and exit_code != "0:0":
        reason = f"{reason}, exit code {exit_code}" if reason and reason != "None" else f"exit code {exit_code}"
    return JobState(job_id, fields.get("JobState", "UNKNOWN"), reason)


def sge_state(job_id: str) -> JobState:
    code, out = _run(["qstat"])
    if code != 0:
        return JobState(job_id, "UNKNOWN", out.strip()[-200:])
    for line in out.splitlines():
        words = line.split()
        if words and words[0] == job_id and len(words) > 4:
            return JobState(job_id, words[4])
    return JobState(job_id, "ENDED")


STATE_OF = {"slurm": slurm_state, "sge": sge_state}
COMMANDS = {"slurm": ("sbatch", "scontrol", "scancel"), "sge": ("qsub", "qstat", "qdel"),
            "pbs": ("qsub", "qstat", "qdel")}


def missing_commands(launcher: str) -> list[str]:
    return [name for name in COMMANDS.get(launcher, ()) if shutil.which(name) is None]


def unknown_partition(launcher: str, partition: str | None) -> str | None:
    """Why the scheduler would refuse `partition` (it names the ones it has); None if it is known.
    The scheduler's own refusal goes to a terminal the notebook never shows."""
    if not partition or launcher not in ("slurm", "sge"):
        return None
    if launcher == "slurm":
        code, out = _run(["sinfo", "-h", "-o", "%P"])
        known = [p.rstrip("*") for p in out.split()] if code == 0 else []
    else:
        code, out = _run(["qconf", "-sql"])
        known = out.split() if code == 0 else []
    if code != 0 or partition in known:
        return None
    return (f"--partition {partition} is not a {launcher} {'partition' if launcher == 'slurm' else 'queue'} "
            f"here: choose one of {', '.join(known) or '(none listed)'}.")


class JobWatch:
    """Asks the scheduler about the engines' job, at most once a second."""

    def __init__(self, launcher: str) -> None:
        self.launcher = launcher
        self._asked = 0.0
        self.last: JobState | None = None

    def ended(self, engine_set: Any) -> str | None:
        """What to tell the user when the engines' job has ended; None while it lives."""
        ask = STATE_OF.get(self.launcher)
        job_id = str(getattr(engine_set, "job_id", "") or "")
        if ask is None or not job_id or time.monotonic() - self._asked < ASK_EVERY:
            return None
        self._asked = time.monotonic()
        self.last = ask(job_id)
        if self.last.live or self.last.state == "UNKNOWN":
            return None
        return f"{self.last.describe()}. {output_tail(engine_set)}"


def output_tail(engine_set: Any, lines: int = 15) -> str:
    path = str(getattr(engine_set, "output_file", "") or "")
    if not path or not os.path.exists(path):
        return (f"It wrote no output file ({path or 'none was set'}): the job may never have started on a node, "
                "or the node cannot write there (a file system the nodes do not share).")
    with open(path, errors="replace") as handle:
        tail = handle.read().strip().splitlines()[-lines:]
    return f"Its output ({path}) ends with:\n" + ("\n".join(tail) or "(empty)")
