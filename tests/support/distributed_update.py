"""One HDPO update on given rollouts, in one process or under torchrun (each rank on its share of the prompts),
once per variant: what `test_train_distributed.py` compares. One launch runs every variant, each from the same
starting weights, because starting the processes costs more than the updates.

Usage: python distributed_update.py MODEL ROLLOUTS.pkl OUT VARIANT [VARIANT ...]

ROLLOUTS.pkl holds a list of prompt groups, each a list of G rollouts. A VARIANT is `micro_batch_tokens` (0: each
rank's rollouts in one pass), with `:reduce` for gradients reduced after every micro-batch. Each variant writes
OUT/VARIANT/checkpoint-000001 and, from rank 0, OUT/VARIANT/update.json (the update's losses, clip fractions and
gradient norm, reduced over the ranks)."""

from __future__ import annotations

import json
import pickle
import sys
from dataclasses import asdict
from pathlib import Path

from curate.train.checkpoint import save_checkpoint, start_or_resume
from curate.train.distributed import process_group
from curate.train.hdpo import HDPOConfig, advantages, score, update
from curate.verify import AnswerVerifier


def main(model: str, rollouts_file: str, out: str, *variants: str) -> None:
    groups = pickle.loads(Path(rollouts_file).read_bytes())
    with process_group("cpu") as (ranks, device):
        for variant in variants:
            micro_batch_tokens, _, reduce = variant.partition(":")
            # A small clip, so that clipping by the whole model's gradient norm is part of what is compared.
            config = HDPOConfig(model=model, shards=[], out=Path(out) / variant, rollouts=len(groups[0]), lr=1e-3,
                                max_grad_norm=0.05, device="cpu", micro_batch_tokens=int(micro_batch_tokens),
                                reduce_every_micro_batch=reduce == "reduce")
            loaded, optimizer, _, _ = start_or_resume(config.out, model, device, config.lr, False, ranks)
            # AdamW's first step moves a weight by lr·g/(|g| + eps), about lr·sign(g) at the default eps 1e-8: an
            # element whose gradient is near zero flips sign on summation-order noise and moves by 2·lr. At eps 1e-4,
            # about an element's gradient after clipping to 0.05, a step moves at most lr/eps = 10 times a
            # gradient's noise, and a wrong gradient (a micro-batch lost or counted twice) still moves weights by far
            # more than the comparison's 1e-6.
            for group in optimizer.param_groups:
                group["eps"] = 1e-4
            mine = ranks.share(groups, "prompt groups")
            rollouts = [rollout for group in mine for rollout in group]
            losses = update(loaded, optimizer, rollouts,
                            advantages(score(rollouts, AnswerVerifier(), len(mine)), config), config, ranks)
            save_checkpoint(config.out, 1, loaded, optimizer, asdict(config), ranks)
            if ranks.main:
                (config.out / "update.json").write_text(json.dumps(losses))


if __name__ == "__main__":
    main(*sys.argv[1:])
