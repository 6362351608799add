"""`%nbdist` and `%%distributed`: parse options, call the `Pool`, display what comes back."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable
from typing import Any, NoReturn

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

from nbdist.backends import BACKENDS
from nbdist.config import parse_gpus, resolve_config
from nbdist.dashboard import Dashboard
from nbdist.errors import DistributedCellError, NbdistError
from nbdist.launch import make_plan
from nbdist.pool import Pool


class _HelpShown(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that reports mistakes as one-line UsageErrors instead of exiting the kernel."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}. See `{self.prog} -h`.")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            raise UsageError(f"{self.prog}: {message.strip()}")
        raise _HelpShown()


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more")
    return value


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


def _nbdist_parser() -> _Parser:
    parser = _Parser(prog="%nbdist", add_help=True, description="Manage the nbdist engine pool.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    start = sub.add_parser("start", help="start a pool of engines")
    start.add_argument("-n", type=_positive_int, default=None, help="number of engines")
    start.add_argument("--gpus", type=_gpus, default=None, help="all | none | 0,1")
    start.add_argument("--gpus-per-engine", type=_positive_int, default=1,
                       help="GPUs each engine owns (e.g. 2 for TensorFlow's MirroredStrategy)")
    start.add_argument("--timeout", type=_positive_float, default=60.0, help="start timeout (s)")
    start.add_argument("--preload", choices=["torch", "none"], default=None,
                       help="framework the engines import while starting (default torch; none for TF-only pools)")
    remote = start.add_argument_group("engines on other hosts (ipyparallel's launchers)")
    remote.add_argument("--hosts", default=None, help="h1:2,h2:2 - engines per host, started over SSH")
    remote.add_argument("--hosts-file", default=None, help="a file of `host[:N]` or `host slots=N` lines")
    remote.add_argument("--launcher", default=None, help="local | ssh | mpi | slurm | pbs")
    remote.add_argument("--python", default=None, help="the Python on the remote hosts")
    remote.add_argument("--ssh-args", default=None, help='extra ssh options, e.g. "-i ~/.ssh/key -p 2222"')
    remote.add_argument("--interface", default=None,
                        help="address or interface the controller listens on for remote engines")
    remote.add_argument("--partition", default=None, help="Slurm partition / PBS queue")
    remote.add_argument("--account", default=None, help="Slurm account")
    remote.add_argument("--time", default=None, help="Slurm time limit, e.g. 01:00:00")
    remote.add_argument("--mpi-args", default=None, help='extra mpiexec arguments, e.g. "--oversubscribe"')
    remote.add_argument("--connect", default=None, metavar="PROFILE_OR_FILE",
                        help="join a running ipyparallel cluster (profile name or ipcontroller-client.json)")
    sub.add_parser("status", help="show every engine")
    sub.add_parser("stop", help="stop the pool")
    sub.add_parser("restart", help="fresh engines (engine state is lost)")
    push = sub.add_parser("push", help="copy notebook variables to every engine")
    push.add_argument("names", nargs="+")
    pull = sub.add_parser("pull", help="copy an engine variable into the notebook")
    pull.add_argument("name")
    pull.add_argument("--rank", type=_non_negative_int, default=0)
    return parser


def _distributed_parser() -> _Parser:
    parser = _Parser(prog="%%distributed", description="Run the cell on every engine.")
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="torch")
    parser.add_argument("--strategy", default=None)
    parser.add_argument("--output", choices=["rank0", "all"], default="rank0")
    parser.add_argument("--timeout", type=_positive_float, default=None)
    parser.add_argument("--no-dashboard", action="store_true", help="no live dashboard")
    parser.add_argument("--ps", type=_positive_int, default=1,
                        help="parameter servers for --backend tensorflow --strategy ps (default 1)")
    parser.add_argument("--restart", action="store_true",
                        help="give the pool fresh engines first if they serve another backend or strategy")
    return parser


def _parse(parser: _Parser, line: str) -> argparse.Namespace | None:
    try:
        words = shlex.split(line, comments=True)  # a trailing `# note` is a comment, as in Python
    except ValueError as exc:
        raise UsageError(f"{parser.prog}: cannot read the options ({exc}).") from None
    try:
        return parser.parse_args(words)
    except _HelpShown:
        return None


def notebook_pool() -> Pool:
    """The pool that `%nbdist start` made in this IPython session."""
    from IPython import get_ipython

    shell = get_ipython()
    magics = shell.magics_manager.registry.get("NbdistMagics") if shell is not None else None
    if magics is None or magics.pool is None:
        raise NbdistError("no notebook pool: run `%load_ext nbdist` and `%nbdist start`, or pass pool=.")
    pool: Pool = magics.pool
    return pool


def notebook_binding() -> tuple[Pool | None, Callable[[Pool | None], None] | None]:
    """The `%nbdist` pool and a setter for it, when the extension is loaded in this shell."""
    from IPython import get_ipython

    shell = get_ipython()
    magics = shell.magics_manager.registry.get("NbdistMagics") if shell is not None else None
    if not isinstance(magics, NbdistMagics):
        return None, None

    def bind(pool: Pool | None) -> None:
        magics.pool = pool

    return magics.pool, bind


@magics_class
class NbdistMagics(Magics):
    """The magics hold the notebook's pool; all the work is the pool's."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.pool: Pool | None = None
        self.dashboard = Dashboard()  # one for every cell: each new figure cost its engines ~0.1 s

    @property
    def _ns(self) -> dict[str, Any]:
        assert self.shell is not None
        ns: dict[str, Any] = self.shell.user_ns
        return ns

    def _require_pool(self) -> Pool:
        if self.pool is None or not self.pool.is_running:
            raise UsageError("no pool is running: start one with `%nbdist start -n 2`.")
        return self.pool

    @line_magic("nbdist")  # type: ignore[arg-type]
    def nbdist(self, line: str) -> Any:
        """Manage the engine pool: `%nbdist start|status|stop|restart|push|pull` (see -h)."""
        args = _parse(_nbdist_parser(), line)
        if args is None:
            return None
        if args.command is None:
            from nbdist.widget import PoolWidget

            return PoolWidget(self.pool, on_pool=self._adopt)
        try:
            return getattr(self, f"_{args.command}")(args)
        except NbdistError as exc:
            raise UsageError(str(exc)) from None

    def _adopt(self, pool: Pool | None) -> None:
        self.pool = pool

    def _start(self, args: argparse.Namespace) -> None:
        if self.pool is not None and self.pool.is_running:
            raise UsageError(
                "a pool is already running: use `%nbdist restart` for fresh engines, or "
                "`%nbdist stop` first."
            )
        plan = make_plan(
            args.launcher, hosts=args.hosts, hosts_file=args.hosts_file, python=args.python,
            ssh_args=args.ssh_args, interface=args.interface, partition=args.partition, account=args.account,
            time=args.time, mpi_args=args.mpi_args, connect=args.connect,
        )
        config = resolve_config(args.n, args.gpus, start_timeout=args.timeout, gpus_per_engine=args.gpus_per_engine,
                                launch=plan, preload=args.preload)
        self.pool = Pool(config=config).start()
        print(f"nbdist: {self.pool.summary()}")

    def _status(self, args: argparse.Namespace | None = None) -> Any:
        import pandas as pd

        pool = self._require_pool()
        rows = pool.status()
        memory = pool.memory() if pool.backend is not None else [{} for _ in rows]
        # Fixed column order: serialisation from the engines does not keep dict order.
        mem_cols = [c for c in ("param_mb", "grad_mb", "optim_mb") if any(c in m for m in memory)]
        return pd.DataFrame(
            [{"rank": r.rank, "engine": r.engine_id, "host": r.host, "pid": r.pid,
              "device": r.device, "state": r.state, **{k: round(m[k], 3) if k in m else None for k in mem_cols}}
             for r, m in zip(rows, memory, strict=True)]
        ).set_index("rank")

    def _stop(self, args: argparse.Namespace) -> None:
        self._require_pool().stop()
        print("nbdist: pool stopped.")

    def _restart(self, args: argparse.Namespace) -> None:
        pool = self._require_pool()
        pool.restart()
        print(f"nbdist: {len(pool.engines)} fresh engines ready (engine state was cleared).")

    def _push(self, args: argparse.Namespace) -> None:
        pool = self._require_pool()
        missing = [name for name in args.names if name not in self._ns]
        if missing:
            raise UsageError(f"%nbdist push: {', '.join(missing)} not defined in the notebook.")
        pool.push({name: self._ns[name] for name in args.names})

    def _pull(self, args: argparse.Namespace) -> Any:
        pool = self._require_pool()
        try:
            value = pool.pull(args.name, rank=args.rank)
        except NbdistError:
            raise  # a bad --rank: reported by nbdist()'s handler
        except Exception as exc:  # a RemoteError: the name is missing on that engine
            raise UsageError(
                f"%nbdist pull: could not get {args.name!r} from rank {args.rank}: "
                f"{getattr(exc, 'evalue', exc)}"
            ) from None
        self._ns[args.name] = value
        return value

    @cell_magic("distributed")  # type: ignore[arg-type]
    def distributed(self, line: str, cell: str) -> Any:
        """Run the cell on every engine, with the process group formed."""
        args = _parse(_distributed_parser(), line)
        if args is None:
            return None
        pool = self._require_pool()
        try:
            result = pool.run(
                cell, backend=args.backend, strategy=args.strategy, ps=args.ps, restart=args.restart,
                output=args.output, timeout=args.timeout, line_offset=1,
                observers=[] if args.no_dashboard else [self.dashboard],
            )
        except DistributedCellError:
            raise
        except NbdistError as exc:
            raise UsageError(str(exc)) from None
        return result.value

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.stop()
            self.pool = None
