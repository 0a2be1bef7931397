"""DeerConfig: the settings of the `deer` policy (dynamic early exit, DEER, arXiv 2504.15895).

The dataclass holds every default (those of the DEER paper's Qwen3 script); a pair config
carries one (`PairConfig.deer`, what plain `deer` and `deer:<threshold>` run with), and the
toy pair sets its own trigger and inducer there.
"""

from __future__ import annotations

import dataclasses
import math

from dami_jax.config import ConfigError
from dami_jax.engine.early_exit import CONFIDENCES
from dami_jax.thinking import THINK_END


@dataclasses.dataclass(frozen=True)
class DeerConfig:
    threshold: float = 0.95  # exit when the trial answer's confidence is at least this, in (0, 1]
    lam: float = 1.0  # the model that thinks: 1 is the Thinking model; any λ in [0, 1]
    trigger: str = "Wait"  # a chunk of thinking ends where the output ends with it (or " " + it)
    inducer: str = "\n**Final Answer**\n\\boxed"  # appended (trigger dropped) to start the trial answer
    close: str = "\n" + THINK_END + "\n\n"  # replaces the trigger on exit; the answer follows
    answer_end: str = THINK_END  # one token: a trial answer is judged only if it ends with it
    confidence: str = "avg2"  # of the trial tokens' max probabilities: avg1 mean, avg2 geometric mean, min
    probe_tokens: int = 20  # the trial answer's length at most
    think_ratio: float = 0.9  # thinking is cut (close forced) at this share of the token budget

    def __post_init__(self):
        threshold = self.threshold
        checks = [
            (isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and not math.isnan(threshold)
             and 0 < threshold <= 1, f"threshold must be a number in (0, 1], got {threshold!r}"),
            (isinstance(self.lam, (int, float)) and 0 <= self.lam <= 1, f"lam must be in [0, 1], got {self.lam!r}"),
            (self.confidence in CONFIDENCES, f"confidence must be one of {CONFIDENCES}, got {self.confidence!r}"),
            (isinstance(self.probe_tokens, int) and self.probe_tokens >= 1,
             f"probe_tokens must be an integer >= 1, got {self.probe_tokens!r}"),
            (isinstance(self.think_ratio, (int, float)) and 0 < self.think_ratio <= 1,
             f"think_ratio must be in (0, 1], got {self.think_ratio!r}"),
            (bool(self.trigger) and bool(self.inducer), "trigger and inducer must be non-empty strings"),
            (THINK_END in self.close, f"close must contain {THINK_END!r}, got {self.close!r}"),
            (bool(self.answer_end), "answer_end must be a non-empty string"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"deer: {message}")


def parse_deer_arg(args: list[str]) -> dict:
    """`deer:<threshold>` -> {threshold}."""
    if len(args) != 1:
        raise ValueError("expected deer or deer:<threshold>, e.g. deer:0.95")
    try:
        return {"threshold": float(args[0])}
    except ValueError:
        raise ValueError(f"the threshold must be a number in (0, 1], got {args[0]!r}") from None
