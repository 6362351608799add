"""The options of `%nbdist` and `%%distributed`: argparse, reporting mistakes as one-line
UsageErrors instead of exiting the kernel."""

from __future__ import annotations

import argparse
import shlex
from typing import Any, NoReturn

from IPython.core.error import UsageError

from nbdist._errors import NbdistError
from nbdist.backends import BACKENDS
from nbdist.cluster import parse_gpus


class _HelpShown(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that reports mistakes as one-line UsageErrors instead of exiting the kernel."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message.rstrip('.')}. See `{self.prog} -h`.")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            raise UsageError(f"{self.prog}: {message.strip()}")
        raise _HelpShown()


def _whole_number(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{text!r} must be {'at least 1' if least == 1 else '0 or more'}")
    return value


def _positive_int(text: str) -> int:
    return _whole_number(text, 1)


def _non_negative_int(text: str) -> int:
    return _whole_number(text, 0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of seconds")
    return value


def _gpus(text: str) -> Any:
    try:
        return parse_gpus(text)
    except NbdistError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _start_options(parser: _Parser) -> None:
    """What `%nbdist start` takes; `%nbdist doctor` takes the same, to check them first."""
    parser.add_argument("-n", type=_positive_int, default=None, help="number of engines")
    parser.add_argument("--gpus", type=_gpus, default=None, help="all | none | 0,1")
    parser.add_argument("--gpus-per-engine", type=_positive_int, default=1,
                       help="GPUs each engine owns (e.g. 2 for TensorFlow's MirroredStrategy)")
    parser.add_argument("--timeout", type=_positive_float, default=60.0, help="start timeout (s)")
    parser.add_argument("--preload", choices=["torch", "none"], default=None,
                       help="framework the engines import while starting (default torch; none for TF-only pools)")
    remote = parser.add_argument_group("engines on other hosts (ipyparallel's launchers)")
    remote.add_argument("--hosts", default=None, help="h1:2,h2:2 - engines per host, started over SSH")
    remote.add_argument("--hosts-file", default=None, help="a file of `host[:N]` or `host slots=N` lines")
    remote.add_argument("--launcher", default=None, help="local | ssh | mpi | slurm | sge | pbs")
    remote.add_argument("--python", default=None, help="the Python on the remote hosts")
    remote.add_argument("--ssh-args", default=None, help='extra ssh options, e.g. "-i ~/.ssh/key -p 2222"')
    remote.add_argument("--interface", default=None,
                        help="address or interface the controller listens on for remote engines")
    remote.add_argument("--partition", default=None, help="Slurm partition / Grid Engine or PBS queue")
    remote.add_argument("--account", default=None, help="Slurm account")
    remote.add_argument("--time", default=None, help="Slurm time limit, e.g. 01:00:00")
    remote.add_argument("--mpi-args", default=None, help='extra mpiexec arguments, e.g. "--oversubscribe"')
    remote.add_argument("--connect", default=None, metavar="PROFILE_OR_FILE",
                        help="join a running ipyparallel cluster (profile name or ipcontroller-client.json)")


def nbdist_parser() -> _Parser:
    parser = _Parser(prog="%nbdist", add_help=True, description="Manage the nbdist engine pool.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    _start_options(sub.add_parser("start", help="start a pool of engines"))
    _start_options(sub.add_parser("doctor", help="check what a start with these options needs, before starting"))
    auto = sub.add_parser("auto", help="run every following cell as %%%%distributed (on | off)")
    auto.add_argument("state", nargs="?", choices=["on", "off"], help="no state: show whether auto mode is on")
    auto.add_argument("options", nargs=argparse.REMAINDER, help="%%%%distributed options for every cell")
    debug = sub.add_parser("debug", help="pdb on the last failed cell's traceback, on one rank")
    debug.add_argument("--rank", type=_non_negative_int, default=None,
                       help="the rank to debug (default: the first rank that raised)")
    sub.add_parser("status", help="show every engine")
    sub.add_parser("stop", help="stop the pool")
    sub.add_parser("restart", help="fresh engines (engine state is lost)")
    push = sub.add_parser("push", help="copy notebook variables to every engine")
    push.add_argument("names", nargs="+")
    pull = sub.add_parser("pull", help="copy engine variables into the notebook")
    pull.add_argument("names", nargs="+", metavar="NAME")
    where = pull.add_mutually_exclusive_group()
    where.add_argument("--rank", type=_non_negative_int, default=0, help="the rank to copy from (default 0)")
    where.add_argument("--all", action="store_true", help="a list with every rank's value, in rank order")
    return parser


def distributed_parser(script: bool = False) -> _Parser:
    """`%%distributed`'s options; with `script`, the line form's: the options, then a script
    file and its own command line (`%distributed train.py --epochs 3`)."""
    parser = _Parser(prog="%distributed" if script else "%%distributed",
                     description="Run a script file on every engine, as torchrun does." if script
                     else "Run the cell on every engine.")
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="torch")
    parser.add_argument("--strategy", default=None)
    parser.add_argument("--output", choices=["rank0", "all", "grouped"], default="rank0",
                        help="rank 0's output, every rank's prefixed [rank k], or lines all ranks printed once")
    parser.add_argument("--timeout", type=_positive_float, default=None)
    parser.add_argument("--auto", action="store_true", help=argparse.SUPPRESS)  # set by auto mode
    parser.add_argument("--ranks", default=None, metavar="SPEC",
                        help="run on these ranks only: 0, 0,2, 1-3 or all (collectives are refused there)")
    parser.add_argument("--no-dashboard", action="store_true", help="no live dashboard")
    parser.add_argument("--retries", type=_non_negative_int, default=0, metavar="N",
                        help="run the cell again, up to N times, after an engine dies (the pool recovers first; "
                             "restore a checkpoint in the cell to resume)")
    parser.add_argument("--retries-on", choices=["engine", "error"], default="engine",
                        help="what is retried: an engine's death (default), or also a rank that raised")
    parser.add_argument("--tensorboard", default=None, metavar="DIR",
                        help="also write the cell's metrics as TensorBoard scalars under DIR (one run per cell)")
    parser.add_argument("--ps", type=_positive_int, default=1,
                        help="parameter servers for --backend tensorflow --strategy ps (default 1)")
    parser.add_argument("--restart", action="store_true",
                        help="give the pool fresh engines first if they serve another backend or strategy")
    if script:
        parser.add_argument("script", help="the Python file to run as __main__ on every rank")
        parser.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments (its sys.argv[1:])")
    return parser


def parse(parser: _Parser, line: str) -> argparse.Namespace | None:
    try:
        words = shlex.split(line, comments=True)  # a trailing `# note` is a comment, as in Python
    except ValueError as exc:
        raise UsageError(f"{parser.prog}: cannot read the options ({exc}).") from None
    try:
        return parser.parse_args(words)
    except _HelpShown:
        return None
