"""Engines' printed text and displays, kept per request as the pieces they arrived in.

ipyparallel keeps a request's stdout as one growing string and, when a piece holds a carriage
return, rewrites the whole string with a regular expression. Two things broke on that: a
reader that remembered how much it had shown sliced the rewritten string at an old length
(progress bars came out garbled), and on a long line of progress output (a Rich bar's cursor
codes, 155 KB) the expression backtracks over the whole line for every piece, so the kernel
spent minutes in it and every later cell's output waited. Here each piece is appended to a
list and never rewritten; the carriage returns are left for whoever shows the text.

ipyparallel also drops `update_display_data` from engines; it is kept here with the displays.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Any

import ipyparallel as ipp

KEEP_REQUESTS = 512
"""Requests whose pieces are kept; the cell runner forgets its own when the cell ends."""


class Outputs:
    """What one request's engine has printed and displayed so far, in arrival order."""

    __slots__ = ("stdout", "stderr", "displays")

    def __init__(self) -> None:
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.displays: list[tuple[str, dict[str, Any]]] = []
        """(message type, content): `display_data` or `update_display_data`."""

    def stream(self, name: str) -> list[str]:
        return self.stdout if name == "stdout" else self.stderr


class StreamTap:
    def __init__(self, client: ipp.Client) -> None:
        self._requests: OrderedDict[str, Outputs] = OrderedDict()
        self._lock = threading.Lock()  # pieces arrive on the client's thread, readers ask on theirs
        dispatch = type(client)._dispatch_iopub.__wrapped__  # the handler below its unpacking decorator
        session = client.session

        def on_recv(parts: list[Any]) -> None:
            _, frames = session.feed_identities(parts, copy=False)
            try:
                msg = session.deserialize(frames, content=True, copy=False)
            except Exception:  # noqa: BLE001 - ipyparallel logs and drops these too
                client.log.error("Invalid message", exc_info=True)
                return
            kind = msg["header"]["msg_type"]
            parent = msg["parent_header"]
            if kind in ("stream", "display_data", "update_display_data") and parent \
                    and parent.get("session") == session.session:
                self._keep(parent["msg_id"], kind, msg["content"])
                if kind == "stream":
                    md = client.metadata[parent["msg_id"]]
                    name = msg["content"]["name"]
                    md[name] = (md[name] or "") + msg["content"]["text"]  # plain, without the rewrite
                    return
            dispatch(client, msg)

        client._iopub_stream.on_recv(on_recv, copy=False)

    def _keep(self, msg_id: str, kind: str, content: dict[str, Any]) -> None:
        outputs = self.outputs(msg_id)
        if kind == "stream":
            outputs.stream(content["name"]).append(content["text"])
        else:
            outputs.displays.append((kind, content))

    def outputs(self, msg_id: str) -> Outputs:
        with self._lock:
            outputs = self._requests.get(msg_id)
            if outputs is None:
                outputs = self._requests[msg_id] = Outputs()
                while len(self._requests) > KEEP_REQUESTS:
                    self._requests.popitem(last=False)
            return outputs

    def forget(self, msg_id: str) -> None:
        with self._lock:
            self._requests.pop(msg_id, None)


_TAPS: weakref.WeakKeyDictionary[ipp.Client, StreamTap] = weakref.WeakKeyDictionary()


def tap(client: ipp.Client) -> StreamTap:
    """The client's tap, put in front of its message handler the first time it is asked for."""
    found = _TAPS.get(client)
    if found is None:
        found = _TAPS[client] = StreamTap(client)
    return found


def outputs_of(ar: Any) -> Outputs:
    """What the request behind the AsyncResult `ar` has printed and displayed so far (nothing,
    for a result that no ipyparallel client sent)."""
    client = getattr(ar, "_client", None)
    return Outputs() if client is None else tap(client).outputs(ar.msg_ids[0])


def forget_outputs(ar: Any) -> None:
    client = getattr(ar, "_client", None)
    if client is not None:
        tap(client).forget(ar.msg_ids[0])


def published(ar: Any) -> dict[str, Any]:
    """What the request behind `ar` has published with `publish_data` so far. Read from the
    client's raw metadata: `ar.metadata` parses four date strings with dateutil first, which was
    a tenth of an empty cell's time, polled several times a cell."""
    raw = getattr(ar, "_metadata", None)
    if raw is None or len(raw) != 1:  # not a single ipyparallel request: the public way
        return dict(ar.metadata.get("data") or {})
    return raw[0].get("data") or {}
