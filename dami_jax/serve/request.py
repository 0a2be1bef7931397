"""A generation request as the engine sees it: its fields, its λ, how its events are handed over."""

from __future__ import annotations

import asyncio
import dataclasses


class QueueFull(RuntimeError):
    """The waiting queue is at its limit: the client should retry later."""


@dataclasses.dataclass(eq=False)
class GenRequest:
    """One prompt and its n choices; the engine thread pushes events to `events` on `loop`."""

    prompt: list[int]
    max_tokens: int
    n: int = 1
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    row_base: int = 0  # row id (sampling key) of choice 0; choice j uses row_base + j
    lam: float | None = None  # explicit λ, else the policy's
    policy: object = None
    thinking_budget: int | None = None  # the policy's budget (budget:<n>): thinking cut after n tokens
    stop_ids: tuple[int, ...] = ()
    pixel_inputs: dict | None = None  # the prompt's Qwen3-VL images: transformers' keywords, NumPy arrays
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    cancelled: bool = False
    lam_used: float | None = None
    t_submit: float = 0.0
    t_first: float | None = None
    done_choices: set = dataclasses.field(default_factory=set)  # choices ended by the client side

    def cancel(self, index: int | None = None) -> None:
        """Stop every choice (client gone, timeout) or the one at response `index` (a stop string)."""
        if index is None:
            self.cancelled = True
        else:
            self.done_choices.add(index - self.row_base)

    def push(self, events: list) -> None:
        if self.loop is None or self.events is None:
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, events)
        except RuntimeError:  # the client's loop is gone
            self.cancelled = True


def push_all(batches: list[tuple[GenRequest, list]]) -> None:
    """Hand each request its events: one wake-up per event loop, not one per request."""
    by_loop: dict[int, tuple] = {}
    for req, events in batches:
        if req.loop is not None and req.events is not None:
            by_loop.setdefault(id(req.loop), (req.loop, []))[1].append((req, events))
    for loop, items in by_loop.values():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the loop is closed: its clients are gone
            for req, _ in items:
                req.cancelled = True


def _put_all(items) -> None:
    for req, events in items:
        req.events.put_nowait(events)

