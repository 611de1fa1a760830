"""scale.adapters.trl: the rules inside TRL's GRPOTrainer (tiny random Llama, CPU, seconds per test).

* with no rule the subclass's loss (scale.loss.grpo_loss) equals TRL's own ``_compute_loss`` on the same
  model and inputs, value and gradients, for every supported loss type, off-policy ratios and the k3 term;
* the rule runs once per generation batch, over the whole batch (not per micro-batch): the sum of the
  micro-batch losses is the token mean over the global batch's kept tokens;
* group ids survive TRL's shuffle; unsupported TRL options are refused;
* two training steps through TRL's loop (the ``main`` launcher) log the rule's metrics and the entropy
  diagnostics through TRL's metrics;
* (slow) two processes (torchrun, gloo): every process sees the same global rule output; the statistics
  pass on the model sharded as accelerate's FSDP2 shards it equals the unsharded pass.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="trl is not installed: pip install 'trl>=1.8,<2' (the project's dev extra)")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from scale.adapters.trl import FIELD, EntropyRuleGRPOTrainer, main  # noqa: E402
from scale.loss import LossConfig, grpo_loss  # noqa: E402
from scale.models import load_model  # noqa: E402
from theory.rules import RuleOutput, TokenBatch, make_rule  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [f"What is {a}+{b}? " for a in range(10) for b in range(4)]


def _dataset():
    return Dataset.from_dict({"prompt": PROMPTS, "answer": [p.split()[2][:-1] for p in PROMPTS]})


def _length_reward(completions, **_):
    return [-len(c) / 10 for c in completions]


def _trainer(tmp_path, rule=None, **overrides):
    model, tok = load_model("tiny", seed=0)
    kw = dict(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, per_device_train_batch_size=8,
              num_generations=4, max_completion_length=8, gradient_checkpointing=False, learning_rate=1e-3,
              max_steps=2, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=0)
    kw.update(overrides)
    return EntropyRuleGRPOTrainer(model=model, processing_class=tok, reward_funcs=[_length_reward],
                                  args=GRPOConfig(**kw), train_dataset=_dataset(), rule=rule)


def _generation_batch(trainer):
    """Run TRL's ``_prepare_inputs`` for micro-step 0: generation, buffering, the rule; the micro-batches."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps  # set by train()
    batch = next(iter(trainer.get_train_dataloader()))
    trainer._prepare_inputs(batch)
    return batch, trainer._buffered_inputs


def _loss_and_grads(fn, trainer, inputs):
    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss = fn(model, inputs)
    loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
    return loss.detach(), grads


def _perturb(trainer, inputs, seed):
    """Random advantages, off-policy old log-probs (ratios far from 1: both clips act), ref log-probs."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        logp, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, att, ids.shape[1] -
                                                                 inputs["prompt_ids"].shape[1])
    B, T = logp.shape
    out = dict(inputs)
    out["advantages"] = torch.randn(B, generator=g)
    out["old_per_token_logps"] = logp + 0.3 * torch.randn(B, T, generator=g)
    out["ref_per_token_logps"] = logp + 0.3 * torch.randn(B, T, generator=g)
    return out


@pytest.mark.parametrize("loss_type", ["dapo", "bnpo", "grpo", "dr_grpo"])
def test_no_rule_loss_equals_trl_loss(tmp_path, loss_type):
    trainer = _trainer(tmp_path, loss_type=loss_type, gradient_accumulation_steps=2,
                       use_bias_correction_kl=False)
    _, micro = _generation_batch(trainer)
    # beta > 0 at construction would make TRL load a reference model from the hub; set it afterwards and
    # inject the reference log-probs (both losses read ``beta`` and ``ref_per_token_logps`` at call time)
    trainer.beta = 0.05
    for i, inputs in enumerate(micro):
        for perturbed in (False, True):
            inp = _perturb(trainer, inputs, seed=i) if perturbed else inputs
            if not perturbed:
                inp = dict(inp, ref_per_token_logps=_perturb(trainer, inputs, seed=9)["ref_per_token_logps"])
            ours, g_ours = _loss_and_grads(trainer._compute_loss, trainer, inp)
            trl, g_trl = _loss_and_grads(lambda m, x: GRPOTrainer._compute_loss(trainer, m, x), trainer, inp)
            assert torch.isfinite(ours)
            torch.testing.assert_close(ours, trl, rtol=1e-6, atol=1e-7)
            assert len(g_ours) == len(g_trl) > 0
            for a, b in zip(g_ours, g_trl, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_statistics_pass_matches_trl_scoring(tmp_path):
    trainer = _trainer(tmp_path)
    _, micro = _generation_batch(trainer)
    inputs = micro[0]
    stats = trainer._score(inputs)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        logp, ent, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, att,
                                                                   inputs["completion_ids"].shape[1],
                                                                   compute_entropy=True)
    mask = inputs["completion_mask"].bool()
    torch.testing.assert_close(stats["logp"][mask], logp[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats["entropy"][mask], ent[mask], rtol=1e-5, atol=1e-5)
    assert (stats["baseline"][mask] >= -1e-7).all()  # E_p[S] is a covariance, >= 0 (E7)


def test_rule_runs_once_on_the_global_generation_batch(tmp_path):
    rule = make_rule("clip_b:mu=0.3")
    trainer = _trainer(tmp_path, rule=rule, gradient_accumulation_steps=2)
    batch, micro = _generation_batch(trainer)
    assert len(micro) == 2 and trainer.rule_calls == 1
    trainer._step = 1  # the second micro-step of the same optimizer step: no new rule call
    assert trainer._prepare_inputs(batch) is micro[1] and trainer.rule_calls == 1

    # the rule on the concatenated batch, computed here from scratch, is what the micro-batches carry
    full = {k: torch.cat([m[k] for m in micro]) for k in ("prompt_ids", "prompt_mask", "completion_ids",
                                                          "completion_mask", "advantages")}
    st = trainer._score(full)
    valid = full["completion_mask"].bool()
    T = valid.shape[1]
    tb = TokenBatch(logp=st["logp"], adv=full["advantages"][:, None].expand(-1, T).float(), valid=valid,
                    entropy=st["entropy"], baseline=st["baseline"])
    ref = rule(tb)
    keep = torch.cat([m[FIELD + "keep"] for m in micro])
    assert torch.equal(keep, ref.keep & valid)
    assert 0 < int(keep.sum()) < int(valid.sum())  # the rule drops some tokens, not all
    n_kept = micro[0][FIELD + "n_kept"]
    assert float(n_kept) == float(keep.sum())

    # sum of the micro-batch losses (what gradient accumulation adds) = token mean over the global kept set
    total = sum(trainer._compute_loss(trainer.model, m) for m in micro)
    ids = torch.cat([full["prompt_ids"], full["completion_ids"]], 1)
    att = torch.cat([full["prompt_mask"], full["completion_mask"]], 1)
    logp, ent, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, att, T,
                                                               compute_entropy=True)
    out = RuleOutput(keep=ref.keep & valid, adv=ref.adv)
    cfg = LossConfig(clip_low=0.2, clip_high=0.2, dual_clip=None)
    whole, _ = grpo_loss(logp, None, tb.adv, valid, config=cfg, entropy=ent, rule_output=out)
    torch.testing.assert_close(total, whole, rtol=1e-6, atol=1e-7)
    # a micro-batch normaliser would differ: the global one is what makes the sum right
    assert all(float(m[FIELD + "n_kept"]) == float(keep.sum()) for m in micro)


def test_group_ids_survive_the_shuffle(tmp_path):
    trainer = _trainer(tmp_path, rule="ppl_shaping", gradient_accumulation_steps=2)
    _, micro = _generation_batch(trainer)
    group = torch.cat([m[FIELD + "group"] for m in micro])
    prompts = torch.cat([m["prompt_ids"] for m in micro])
    ids, counts = torch.unique(group, return_counts=True)
    assert (counts == trainer.num_generations).all() and len(ids) == 16 // trainer.num_generations
    for gid in ids:
        rows = prompts[group == gid]
        assert (rows == rows[0]).all()  # the G completions of one group share their prompt


@pytest.mark.parametrize(("overrides", "words"), [
    (dict(loss_type="cispo"), "loss_type"),
    (dict(top_entropy_quantile=0.2), "high_entropy_mask"),
    (dict(entropy_coef=0.01), "entropy_bonus"),
])
def test_unsupported_trl_options_are_refused(tmp_path, overrides, words):
    with pytest.raises(ValueError, match=words):
        _trainer(tmp_path, rule="clip_b", **overrides)


def test_diagnostics_empty_set_is_zero_and_lr_is_the_optimizers(tmp_path):
    """No sample with A < 0: ``entropy/neg`` is the documented 0 (theory.diagnostics), not NaN; the (E5)
    step sizes behind ``theory/dH_tabular`` use the optimizer's current rate once there is an optimizer."""
    trainer = _trainer(tmp_path)
    g = torch.Generator().manual_seed(0)
    valid = torch.tensor([[True, True, False], [True, True, True]])
    adv = torch.tensor([[1.0] * 3, [0.0] * 3])  # one sample with A > 0, one with A = 0, none with A < 0
    batch = TokenBatch(logp=-torch.rand(2, 3, generator=g), adv=adv, valid=valid,
                       entropy=torch.rand(2, 3, generator=g), baseline=torch.rand(2, 3, generator=g) * 0.1)
    s_star = torch.rand(2, 3, generator=g) * 0.1
    n_kept, micro = valid.sum().float(), torch.zeros(2, dtype=torch.long)
    trainer._log_rule_window("train", batch, s_star, None, valid, n_kept, micro)
    m = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert m["entropy/neg"] == 0.0 and m["adv/neg_frac"] == 0.0 and m["adv/pos_frac"] == pytest.approx(2 / 5)
    assert all(torch.isfinite(torch.tensor(v)) for v in m.values()), m
    alpha = trainer._token_alpha(batch, None, valid, n_kept, micro, "train")  # no optimizer: args' lr
    trainer.create_optimizer()
    for group in trainer.optimizer.param_groups:
        group["lr"] = 0.25 * trainer.args.learning_rate  # what a scheduler would set
    torch.testing.assert_close(trainer._token_alpha(batch, None, valid, n_kept, micro, "train"), 0.25 * alpha)


def test_two_steps_through_trl_log_rule_metrics(tmp_path):
    t0 = time.perf_counter()
    trainer = main(["--rule", "clip_b:mu=0.5+high_entropy_mask:rho=0.5", "--length_penalty", "0.01",
                    "--output_dir", str(tmp_path / "run"), "--max_steps", "2",
                    "--per_device_train_batch_size", "8", "--num_generations", "4",
                    "--max_completion_length", "8", "--gradient_accumulation_steps", "2", "--use_cpu",
                    "--report_to", "none", "--logging_steps", "1", "--save_strategy", "no",
                    "--learning_rate", "1e-3", "--disable_tqdm", "true", "--gradient_checkpointing", "false"])
    wall = time.perf_counter() - t0
    assert trainer.state.global_step == 2 and trainer.rule_calls == 2  # once per optimizer step
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logs) == 2
    for rec in logs:
        for key in ("rule/clip_b/clip_frac", "rule/high_entropy_mask/entropy_threshold", "entropy/neg",
                    "s_star/mean", "deviation/mean", "theory/dH_tabular", "quad/neg_low_frac",
                    "loss/kept_frac", "entropy", "reward"):
            assert key in rec, key
        assert 0.0 <= rec["loss/kept_frac"] <= 1.0
    assert wall < 60


_DIST_SCRIPT = """
import json, os, sys, torch
from scale.adapters.trl import FIELD, end_process_group, main
out_dir = sys.argv[1]
trainer = main(["--rule", "clip_b:mu=0.5", "--length_penalty", "0.01", "--output_dir", out_dir,
                "--max_steps", "1", "--per_device_train_batch_size", "8", "--num_generations", "4",
                "--max_completion_length", "8", "--use_cpu", "--report_to", "none", "--save_strategy", "no",
                "--disable_tqdm", "true", "--gradient_checkpointing", "false"])
b = trainer._buffered_inputs[0]
rank = trainer.accelerator.process_index
rec = {"rank": rank, "n_kept": float(b[FIELD + "n_kept"]), "local_kept": int(b[FIELD + "keep"].sum()),
       "group": b[FIELD + "group"].tolist(), "metrics": trainer.state.log_history[0]}
# the statistics pass on the same model sharded as accelerate's FSDP2 shards it (fully_shard on every
# decoder layer, then the root; reshard after forward everywhere) equals the unsharded pass
import copy
from torch.distributed.fsdp import fully_shard
ref = trainer._score(b)
sharded = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.model))
for layer in sharded.model.layers:
    fully_shard(layer)
fully_shard(sharded, reshard_after_forward=True)
trainer.model = sharded
got = trainer._score(b)
rec["fsdp_max_diff"] = max(float((got[k] - ref[k]).abs().max()) for k in ref)
rec["fsdp_dtensor_after"] = all(type(p).__name__ == "DTensor" for p in sharded.parameters())
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump(rec, f)
end_process_group()
"""


@pytest.mark.slow
def test_two_processes_share_one_global_rule_output(tmp_path):
    script = tmp_path / "dist.py"
    script.write_text(textwrap.dedent(_DIST_SCRIPT))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(port), str(script), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # the rule ran on both processes' rows: one global kept count, the sum of the local ones
    assert recs[0]["n_kept"] == recs[1]["n_kept"] == recs[0]["local_kept"] + recs[1]["local_kept"]
    # GRPO groups are numbered over the global batch (rank 1 holds the later groups)
    assert set(recs[0]["group"]).isdisjoint(recs[1]["group"])
    # FSDP2: the statistics pass gathers every weight (scale.distributed.gathered), then reshards
    for rec in recs:
        assert rec["fsdp_max_diff"] < 1e-5 and rec["fsdp_dtensor_after"], rec


def test_adapter_keys_are_the_trainers_and_reach_report_to_finite(tmp_path, monkeypatch):
    """One metric vocabulary: the keys the adapter adds (not TRL's own) are keys ``entdyn train`` writes
    with the same rule and diagnostics on, all in the "Logged metrics" table; through TRL's
    ``report_to=tensorboard`` every logged value is a finite number (never None)."""
    import collections
    import math

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from scale.metrics_log import read_metrics
    from scale.train import train
    from tests.test_scale_train import _documented_patterns, make_cfg, text_reward

    ours: set[str] = set()
    window = EntropyRuleGRPOTrainer._log_rule_window

    def spy(self, mode, *args):  # the keys of the adapter's own window, kept apart from TRL's
        real, self._metrics[mode] = self._metrics[mode], collections.defaultdict(list)
        try:
            window(self, mode, *args)
        finally:
            ours.update(self._metrics[mode])
            for k, v in self._metrics[mode].items():
                real[k].extend(v)
            self._metrics[mode] = real

    monkeypatch.setattr(EntropyRuleGRPOTrainer, "_log_rule_window", spy)
    out = tmp_path / "trl"
    trainer = main(["--rule", "clip_b:mu=0.5", "--length_penalty", "0.01", "--output_dir", str(out),
                    "--max_steps", "2", "--per_device_train_batch_size", "8", "--num_generations", "4",
                    "--max_completion_length", "8", "--use_cpu", "--report_to", "tensorboard",
                    "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "true",
                    "--gradient_checkpointing", "false"])
    cfg = make_cfg(tmp_path, rule={"spec": "clip_b:mu=0.5"}, diag={"diag_every": 1}, run={"steps": 1})
    train(cfg, reward_fn=text_reward)
    theirs = set().union(*(r.keys() for r in read_metrics(cfg.run.out))) - {"step"}
    assert {"theory/dH_tabular", "theory/dH_tabular/neg_low", "rule/clip_frac", "s_star/mean"} <= ours
    assert ours <= theirs, sorted(ours - theirs)
    patterns = _documented_patterns()
    undocumented = sorted(k for k in ours | theirs if not any(p.match(k) for p in patterns))
    assert not undocumented, f"not in the Logged metrics table: {undocumented}"
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logs) == 2 and all(ours <= set(r) for r in logs)
    assert not [(k, r["step"]) for r in logs for k, v in r.items() if v is None]
    events = sorted({p.parent for p in (out / "runs").rglob("events.out.tfevents.*")})
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {f"train/{k}" for k in ours} <= set(tags)
    values = [(t, e.value) for t in tags for e in acc.Scalars(t)]
    assert values and all(isinstance(v, float) and math.isfinite(v) for _, v in values)
