"""The launcher of :mod:`scale.adapters.trl`: ``python -m scale.adapters.trl`` / ``accelerate launch -m
scale.adapters.trl`` trains :class:`~scale.adapters.trl.EntropyRuleGRPOTrainer` on a :mod:`scale.tasks`
task (flags: :class:`ScriptArguments` and every ``trl.GRPOConfig`` field)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any


@dataclasses.dataclass
class ScriptArguments:
    """Options of :func:`main` besides TRL's ``GRPOConfig`` (every ``GRPOConfig`` field is a flag too)."""

    model: str = dataclasses.field(default="tiny", metadata={"help": "scale.models.load_model name or dir"})
    task: str = dataclasses.field(default="arithmetic:digits=1,ops=1,n_train=128,n_eval=16",
                                  metadata={"help": "scale.tasks.make_task spec"})
    rule: str | None = dataclasses.field(default=None, metadata={"help": "theory.rules spec, e.g. clip_b"})
    diagnostics: bool = dataclasses.field(default=True, metadata={"help": "log the entropy diagnostics"})
    model_seed: int = dataclasses.field(default=0, metadata={"help": "seed of the 'tiny' random weights"})
    length_penalty: float = dataclasses.field(
        default=0.0, metadata={"help": "reward -= length_penalty * characters (signal for untrained models)"})


def main(argv: Sequence[str] | None = None) -> Any:
    """Train with :class:`EntropyRuleGRPOTrainer` on a :mod:`scale.tasks` task; returns the trainer.

    Flags: :class:`ScriptArguments` plus every ``trl.GRPOConfig`` field (TRL's ``TrlParser``), e.g.::

        accelerate launch --num_processes 2 --cpu -m scale.adapters.trl --rule clip_b \\
            --output_dir runs/trl --max_steps 2 --per_device_train_batch_size 8 --num_generations 4 \\
            --max_completion_length 16 --use_cpu --report_to none
    """
    from datasets import Dataset
    from trl import GRPOConfig, TrlParser

    from scale.grading import CorrectnessReward
    from scale.models import load_model
    from scale.tasks import format_prompt, make_task

    script, cfg = TrlParser((ScriptArguments, GRPOConfig)).parse_args_and_config(argv)
    model, tok = load_model(script.model, seed=script.model_seed)
    task = make_task(script.task, seed=cfg.seed)
    ds = Dataset.from_dict({"prompt": [format_prompt(p, tok) for p in task.train],
                            "answer": [p.answer for p in task.train]})
    grade = CorrectnessReward()

    def reward(completions, answer, **_):
        texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
        return [grade(t, a) - script.length_penalty * len(t) for t, a in zip(texts, answer, strict=True)]

    from .trl import EntropyRuleGRPOTrainer

    trainer = EntropyRuleGRPOTrainer(model=model, processing_class=tok, reward_funcs=[reward], args=cfg,
                                     train_dataset=ds, rule=script.rule, diagnostics=script.diagnostics)
    trainer.train()
    return trainer


def end_process_group() -> None:
    """Leave the process group (if any) before the interpreter exits: a gloo group torn down at exit can
    abort a process ("terminate called without an active exception") while its peer still runs."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
