"""The RL algorithms `curate train hdpo --algo` trains: one table, one entry each (in the style of verl's registry
of advantage estimators). An entry names the loss terms it trains and, for each, how its advantages come from a
step's scores (`correct`, `format`, `tool_calls`, each [prompts, G]).

A loss term is a PPO clipped surrogate on one advantage channel (`curate.train.loss.TERM_TOKENS`): `acc` over every
policy token, weighted by `w_acc`; `tool` over the tokens of rows with a tool signal, weighted by `w_tool`. A term
an entry does not name is neither computed nor logged. The trainer reads only this table, so an entry added or
replaced here (`ALGORITHMS[name] = Algorithm(...)`) is what `--algo name` trains.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from curate.errors import UserError
from curate.registry import suggest
from curate.train.advantages import (
    accuracy_rewards,
    coupled_advantages,
    grpo_advantages,
    otc_advantages,
    tool_advantages,
    tool_rewards,
)

if TYPE_CHECKING:
    from curate.train.hdpo import HDPOConfig

Scores = dict[str, Tensor]
AdvantageFunction = Callable[[Scores, "HDPOConfig"], Tensor]


@dataclass(frozen=True)
class Algorithm:
    summary: str  # one line for `--help`
    advantages: dict[str, AdvantageFunction]  # loss term -> its advantages; the terms the algorithm trains

    @property
    def terms(self) -> tuple[str, ...]:
        return tuple(self.advantages)


def accuracy(scores: Scores, config: HDPOConfig) -> Tensor:
    """GRPO on r_acc = 0.9·correct + 0.1·format."""
    return grpo_advantages(accuracy_rewards(scores["correct"], scores["format"]))


def tool_efficiency(scores: Scores, config: HDPOConfig) -> Tensor:
    """GRPO on r_tool = 1/(T+1) among each group's correct rollouts (0 where fewer than two are correct)."""
    return tool_advantages(tool_rewards(scores["correct"], scores["tool_calls"]))


def coupled(scores: Scores, config: HDPOConfig) -> Tensor:
    """GRPO on the coupled reward r_acc - alpha·T."""
    return coupled_advantages(accuracy_rewards(scores["correct"], scores["format"]), scores["tool_calls"], config.alpha)


def otc(scores: Scores, config: HDPOConfig) -> Tensor:
    """GRPO on OTC-GRPO's tool-integrated reward r_tool·r_acc (arXiv 2504.14870)."""
    r_acc = accuracy_rewards(scores["correct"], scores["format"])
    return otc_advantages(r_acc, scores["correct"], scores["tool_calls"], config.otc_c)


ALGORITHMS: dict[str, Algorithm] = {
    "hdpo": Algorithm("two channels, accuracy and tool efficiency (w_acc, w_tool)",
                      {"acc": accuracy, "tool": tool_efficiency}),
    "grpo": Algorithm("accuracy only", {"acc": accuracy}),
    "coupled": Algorithm("one reward r_acc - alpha·T", {"acc": coupled}),
    "otc": Algorithm("OTC-GRPO's tool-integrated reward (fewest calls among the group's correct rollouts)",
                     {"acc": otc}),
}


def algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise UserError(f"unknown algorithm {name!r}{suggest(name, ALGORITHMS)}; choose one of: "
                        f"{', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]
