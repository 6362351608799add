"""The notebook's pool: the one `%nbdist` keeps in this IPython session, found by the magics'
registry name (so the widget and `nbdist.history()` need not import the magics)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nbdist._errors import NbdistError
from nbdist.kernel._pool import Pool

MAGICS_NAME = "NbdistMagics"


def _magics() -> Any:
    from IPython import get_ipython

    shell = get_ipython()
    return shell.magics_manager.registry.get(MAGICS_NAME) if shell is not None else None


def notebook_pool() -> Pool:
    """The pool that `%nbdist start` made in this IPython session."""
    magics = _magics()
    pool = getattr(magics, "pool", None)
    if pool is None:
        raise NbdistError("no notebook pool: run `%load_ext nbdist` and `%nbdist start`, or pass pool=.")
    assert isinstance(pool, Pool)
    return pool


def notebook_binding() -> tuple[Pool | None, Callable[[Pool | None], None] | None]:
    """The `%nbdist` pool and a setter for it, when the extension is loaded in this shell."""
    magics = _magics()
    if magics is None:
        return None, None

    def bind(pool: Pool | None) -> None:
        magics.pool = pool

    return magics.pool, bind
