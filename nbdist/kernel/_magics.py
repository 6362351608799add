"""`%nbdist` and `%%distributed`: parse options, call the `Pool`, display what comes back."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class

from nbdist._errors import DistributedCellError, NbdistError
from nbdist._say import say
from nbdist.kernel._dashboard import Dashboard
from nbdist.kernel._parsers import distributed_parser, nbdist_parser, parse
from nbdist.kernel._pool import Pool


@magics_class
class NbdistMagics(Magics):
    """The magics hold the notebook's pool; all the work is the pool's."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.pool: Pool | None = None
        self.dashboard = Dashboard()  # one for every cell: each new figure cost its engines ~0.1 s
        self.auto: str | None = None
        """The %%distributed options every cell runs with while auto mode is on (None: off)."""
        if shell is not None:
            shell.input_transformers_cleanup.append(self._auto_transform)
            shell.Completer.custom_matchers.append(self._complete)

    def _complete(self, text: str) -> list[str]:
        """Names and attributes of the engines' variables (see `EngineNames`)."""
        return self.pool.names.complete(text) if self.pool is not None else []

    def _auto_transform(self, lines: list[str]) -> list[str]:
        """While auto mode is on, a cell runs as `%%distributed` unless it starts with a magic
        (`%nbdist auto off`, `%%time`, ...), a shell escape or is empty."""
        if self.auto is None:
            return lines
        first = next((line.strip() for line in lines if line.strip()), "")
        if not first or first.startswith(("%", "!")):
            return lines
        return [f"%%distributed --auto {self.auto}\n", *lines]

    def _auto(self, args: argparse.Namespace) -> None:
        if args.state == "on":
            options = " ".join(args.options)
            parse(distributed_parser(), options)  # a wrong option is reported now, not on every cell
            self.auto = options
            say(f"auto mode on: every cell runs on the engines as %%distributed {options}".rstrip() +
                " (cells that start with % still run here). `%nbdist auto off` ends it.")
        elif args.state == "off":
            self.auto = None
            say("auto mode off: cells run in the notebook again.")
        elif self.auto is None:
            say("auto mode is off.")
        else:
            say(f"auto mode is on: %%distributed {self.auto}".rstrip() + ".")

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
        args = parse(nbdist_parser(), line)
        if args is None:
            return None
        if args.command is None:
            from nbdist.kernel._widget import PoolWidget

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
        self.pool = Pool(**self._start_options(args)).start()
        say(self.pool.summary())

    def _doctor(self, args: argparse.Namespace) -> Any:
        """A table of checks for a start with these options (nothing is started)."""
        import pandas as pd

        from nbdist.cluster import diagnose

        checks = diagnose(**self._start_options(args))
        problems = sum(c.result == "problem" for c in checks)
        say(f"{problems} problem{'s' if problems != 1 else ''} found." if problems else
            "no problem found: `%nbdist start` with the same options should work.")
        return pd.DataFrame([vars(c) for c in checks])

    @staticmethod
    def _start_options(args: argparse.Namespace) -> dict[str, Any]:
        return dict(
            n=args.n, gpus=args.gpus, gpus_per_engine=args.gpus_per_engine, start_timeout=args.timeout,
            preload=args.preload, launcher=args.launcher, hosts=args.hosts, hosts_file=args.hosts_file,
            python=args.python, ssh_args=args.ssh_args, interface=args.interface, partition=args.partition,
            account=args.account, time=args.time, mpi_args=args.mpi_args, connect=args.connect,
        )

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
        say("pool stopped.")

    def _restart(self, args: argparse.Namespace) -> None:
        pool = self._require_pool()
        pool.restart()
        say(f"{len(pool.engines)} fresh engines ready (engine state was cleared).")

    def _push(self, args: argparse.Namespace) -> None:
        pool = self._require_pool()
        missing = [name for name in args.names if name not in self._ns]
        if missing:
            raise UsageError(f"%nbdist push: {', '.join(missing)} not defined in the notebook.")
        pool.push({name: self._ns[name] for name in args.names})

    def _debug(self, args: argparse.Namespace) -> None:
        self._require_pool().debug(args.rank)

    def _pull(self, args: argparse.Namespace) -> Any:
        """Bind each name in the notebook; nothing is bound unless every value arrived."""
        pool = self._require_pool()
        values = {}
        for name in args.names:
            where = "every rank" if args.all else f"rank {args.rank}"
            try:
                values[name] = pool.pull_all(name) if args.all else pool.pull(name, rank=args.rank)
            except NbdistError:
                raise  # a bad --rank, a value that cannot travel: reported by nbdist()'s handler
            except Exception as exc:  # a RemoteError: the name is missing on that engine
                raise UsageError(
                    f"%nbdist pull: could not get {name!r} from {where}: {getattr(exc, 'evalue', exc)}"
                ) from None
        self._ns.update(values)
        return values[args.names[0]] if len(values) == 1 else None

    @line_cell_magic("distributed")  # type: ignore[arg-type]
    def distributed(self, line: str, cell: str | None = None) -> Any:
        """Run the cell on every engine, with the process group formed; as a line
        (`%distributed train.py --epochs 3`), run a script file there as torchrun does."""
        args = parse(distributed_parser(script=cell is None), line)
        if args is None:
            return None
        pool = self._require_pool()
        if args.auto:
            print("[nbdist auto]", file=sys.stderr, flush=True)  # the marker of a cell auto mode sent
        options: dict[str, Any] = dict(
            backend=args.backend, strategy=args.strategy, ps=args.ps, restart=args.restart, output=args.output,
            timeout=args.timeout, ranks=args.ranks, observers=[] if args.no_dashboard else [self.dashboard],
            tensorboard=args.tensorboard, retries=args.retries, retries_on=args.retries_on,
        )
        try:
            if cell is None:
                result = pool.run_script(args.script, args.args, **options)
            else:
                result = pool.run(cell, line_offset=1, **options)
        except DistributedCellError:
            raise
        except NbdistError as exc:
            raise UsageError(str(exc)) from None
        return result.value

    def shutdown(self) -> None:
        if self.shell is not None:
            for hooks, hook in ((self.shell.input_transformers_cleanup, self._auto_transform),
                                (self.shell.Completer.custom_matchers, self._complete)):
                if hook in hooks:
                    hooks.remove(hook)
        if self.pool is not None:
            self.pool.stop()
            self.pool = None
