"""The sampling panel: the open conversation's sampling settings, saved in the daemon's store.

Defaults are the configuration's ``[sampling]`` section (whose defaults are those of the engine's sampling
settings, ``SamplerArgs``: the reference ``PIPELINE_ARGS``, temperature 1.0, top_p 0.85, top_k 0, presence and
frequency penalties 0.2, penalty decay 0.996, and max_tokens 256); a conversation's own settings override them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from textual import on
from textual.app import ComposeResult
from textual.containers import Grid, Horizontal, VerticalScroll
from textual.message import Message
from textual.widgets import Button, Input, Label, Static

from ..texts import MAX_INT, POSITIVE, between, in_range

# (key, label, type, low, high); None = unbounded, POSITIVE = more than 0. Ranges as SamplerArgs checks them.
FIELDS = [
    ("temperature", "Temperature", float, 0.0, None),
    ("top_p", "Top p", float, 0.0, 1.0),
    ("top_k", "Top k (0 = off)", int, 0, MAX_INT),
    ("alpha_presence", "Presence penalty", float, 0.0, None),
    ("alpha_frequency", "Frequency penalty", float, 0.0, None),
    ("alpha_decay", "Penalty decay", float, 0.0, 1.0),
    ("repetition_penalty", "Repetition penalty", float, POSITIVE, None),
    ("max_tokens", "Max tokens", int, 1, MAX_INT),
    ("seed", "Seed", int, 0, MAX_INT),
]


def parse_field(key: str, text: str):
    """The value of ``text`` for field ``key`` (None for an empty seed). Raises ValueError naming the field."""
    _, label, kind, lo, hi = next(f for f in FIELDS if f[0] == key)
    text = text.strip()
    if key == "seed" and not text:
        return None
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{label}: {text!r} is not {'a whole number' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise ValueError(f"{label}: must be a finite number")
    if not in_range(value, lo, hi):
        raise ValueError(f"{label} {between(lo, hi)}")
    return value


class SamplingPanel(VerticalScroll, can_focus=False):
    """Inputs for every sampling setting and an Apply button (posts :class:`SamplingPanel.Applied`)."""

    @dataclass
    class Applied(Message):
        values: dict          # key -> value; seed may be None (random)

    def __init__(self, defaults: dict, **kw) -> None:
        super().__init__(**kw)
        self.defaults = dict(defaults)

    def compose(self) -> ComposeResult:
        # the fields first: Tab from the message input reaches them directly; the buttons follow them
        yield Static("Sampling (F4 closes)", classes="title")
        yield Static("", id="sampling-error")
        with Grid(id="sampling-fields"):
            for key, label, *_ in FIELDS:
                yield Label(label, classes="field-label")
                yield Input(id=f"s-{key}", compact=True, select_on_focus=False,
                            placeholder="random" if key == "seed" else "")      # an empty seed: random
        with Horizontal(classes="buttons"):
            yield Button("Apply", id="sampling-apply", variant="primary", compact=True)
            yield Button("Defaults", id="sampling-reset", compact=True)

    def show(self, sampling: dict) -> None:
        """Fill the inputs with the defaults overridden by ``sampling`` (a conversation's settings)."""
        values = {**self.defaults, **{k: v for k, v in sampling.items() if v is not None}}
        for key, *_ in FIELDS:
            v = values.get(key)
            self.query_one(f"#s-{key}", Input).value = "" if v is None else str(v)
        self.query_one("#sampling-error", Static).update("")

    def values(self) -> dict:
        """The parsed inputs. Raises ValueError (the message names the field)."""
        return {key: parse_field(key, self.query_one(f"#s-{key}", Input).value) for key, *_ in FIELDS}

    @on(Button.Pressed, "#sampling-apply")
    @on(Input.Submitted)
    def _apply(self, event) -> None:
        event.stop()
        try:
            values = self.values()
        except ValueError as e:
            self.query_one("#sampling-error", Static).update(str(e))
            return
        self.query_one("#sampling-error", Static).update("")
        self.post_message(self.Applied(values))

    @on(Button.Pressed, "#sampling-reset")
    def _reset(self, event: Button.Pressed) -> None:
        event.stop()
        self.show({})
