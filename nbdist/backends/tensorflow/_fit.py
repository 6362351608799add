"""`model.fit` in a `%%distributed` cell feeds the dashboard without being asked (engines only)."""

from __future__ import annotations

from typing import Any


def attach_reporter_to_fit(tf: Any) -> None:
    """Make `model.fit` inside a `%%distributed` cell feed the dashboard without being asked:
    a `nbdist.keras.Reporter` is added unless the call already has one."""
    model_class = tf.keras.Model
    if getattr(model_class.fit, "_nbdist", False):
        return
    original = model_class.fit

    def fit(self: Any, *args: Any, callbacks: Any = None, **kwargs: Any) -> Any:
        from nbdist import engine as metrics
        from nbdist.keras import Reporter

        callbacks = list(callbacks or [])
        if metrics.active() is not None and not any(isinstance(c, Reporter) for c in callbacks):
            data = args[0] if args else kwargs.get("x")
            callbacks.append(Reporter(samples_per_step=_batch_size(data, kwargs.get("batch_size"))))
        return original(self, *args, callbacks=callbacks, **kwargs)

    fit._nbdist = True  # type: ignore[attr-defined]
    fit.__doc__ = original.__doc__
    model_class.fit = fit


def _batch_size(data: Any, batch_size: Any) -> int | None:
    """Samples this process trains per step, where that can be told from fit's arguments."""
    if isinstance(batch_size, int):
        return batch_size
    size, dataset = None, data
    for _ in range(16):  # a batched tf.data.Dataset, maybe behind options/prefetch/map stages
        size = getattr(dataset, "_batch_size", None)
        dataset = getattr(dataset, "_input_dataset", None)
        if size is not None or dataset is None:
            break
    try:
        return int(size) if size is not None else 32 if hasattr(data, "shape") else None
    except (TypeError, ValueError):
        return None
