r"""The :mod:`theory.rules` rules inside TRL's ``GRPOTrainer``: :class:`EntropyRuleGRPOTrainer`.

    trainer = EntropyRuleGRPOTrainer(model=model, processing_class=tok, reward_funcs=[...],
                                     args=GRPOConfig(...), train_dataset=ds, rule="clip_b:mu=2.0")
    trainer.train()

Everything else is TRL's: its ``GRPOConfig``, generation, rewards, advantages, ``accelerate`` launcher
(``accelerate launch -m scale.adapters.trl ...``, see :func:`main`), logging backends. Written against
TRL 1.16.0 (``trl/trainer/grpo_trainer.py``: ``_prepare_inputs``, ``_generate_and_score_completions``,
``_get_per_token_logps_and_entropies``, ``_compute_loss``); no TRL code is copied, the extension points
are overridden.

What the subclass changes
-------------------------

1. **Per-token statistics.** Once per pass over a generation batch (below), one extra no-grad forward
   of the policy over that batch gives, for every completion token, ``log p``, the entropy ``H``,
   ``S* = p_k (H + log p_k)`` (E2) and ``E_p[S]`` (E7). The backbone runs like TRL's own scoring
   forward (same ``input_ids`` / ``attention_mask``, under ``accelerator.autocast()``); the lm_head
   statistics come from :func:`scale.token_stats.token_stats`, which never materialises more than
   ``stats_chunk_size x V`` logits (TRL's fused lm_head gives ``log Σ p²`` but not ``Σ p² log p``, so
   ``E_p[S]`` cannot be read from TRL's own outputs). Logits are divided by TRL's ``temperature``, as
   TRL scores them. Models whose config scales or soft-caps the logits (``final_logit_softcapping``,
   ``logit_scale``, ...) are rejected: ``token_stats`` computes plain ``h W^T + b``.

2. **The rule runs once per generation batch, over all processes** (anchors §6 #9: never per
   micro-batch). TRL's unit of data is the *generation batch*: ``per_device_train_batch_size x
   steps_per_generation`` completions per process, generated at once, shuffled, then cut into
   ``steps_per_generation`` micro-batches that the HF ``Trainer`` feeds one per ``training_step``
   (gradient accumulation). With TRL's default ``steps_per_generation = gradient_accumulation_steps``
   one generation batch is exactly the data of one optimizer step. The subclass runs the rule when
   ``_step % steps_per_generation == 0``, i.e. before the first micro-batch of every pass over a
   generation batch (``num_iterations`` passes per generation, each with the current parameters), on
   the **whole** generation batch of **all** processes: each process scores its own rows, the
   ``(B, T)`` statistics are padded to a common ``T`` and all-gathered, every process calls the rule on
   the identical global batch (random rules get identical ``noise`` from a generator seeded with
   ``args.seed`` and the call count), and keeps its own rows. The output is stored, row-aligned, in
   each buffered micro-batch; TRL's shuffle happened before, and each row's GRPO group id is recorded
   before it (``entdyn_group``), so ``group``-based rules (``ppl_shaping``) see real groups. In eval
   the rule runs on each eval batch (all processes).

3. **The loss**, :meth:`EntropyRuleGRPOTrainer._compute_loss`: TRL's own scoring forward
   (``_get_per_token_logps_and_entropies``: the ``log p`` and ``H`` with gradient), then
   :func:`scale.loss.grpo_loss` with the rule output -- the project's single place where a
   :class:`~theory.rules.RuleOutput` meets a loss, so the semantics are exactly the torch trainer's:
   ``keep`` removes a token from the loss **and** from the normaliser; ``adv`` replaces the advantage;
   ``weight`` multiplies the token's clipped surrogate; ``kl_coef`` adds ``c |log p − log p_old|``;
   ``entropy_coef`` adds ``−c H`` (with gradient through TRL's fused-head entropy). TRL's loss types
   map to :class:`scale.loss.LossConfig` as ``dapo``/``bnpo`` → ``token_mean``, ``grpo`` →
   ``seq_mean``, ``dr_grpo`` → ``constant`` (``max_length = max_completion_length``), ``epsilon`` /
   ``epsilon_high`` → ``clip_low`` / ``clip_high``, no dual clip (TRL has none), ``beta`` → ``kl_beta``
   (TRL's k3). The normalisers are TRL's, with kept tokens in place of valid ones:

   * ``dapo``: ``N_kept / num_processes x gradient_accumulation_steps / steps_per_generation``, where
     ``N_kept`` counts the kept tokens of the whole generation batch over all processes (TRL:
     ``num_items_in_batch``, the valid tokens). After DDP's mean over processes and the sum over the
     accumulation steps the update is the token mean over the kept tokens of the global batch;
   * ``bnpo``: the micro-batch's kept tokens ``x gradient_accumulation_steps``; ``grpo``: ``B x GA``;
     ``dr_grpo``: ``B x max_completion_length x GA`` (as TRL; eval divides by 1 instead of ``GA``).

   With no rule the loss is TRL's own loss on the same inputs to float rounding (tested). vLLM's
   importance-sampling correction (``use_vllm`` with ``vllm_importance_sampling_correction``), which
   TRL multiplies into the surrogate, enters as a factor of ``weight``; MoE aux losses are added as
   TRL adds them.

   TRL options whose effect overlaps a rule, or that :func:`scale.loss.grpo_loss` does not express,
   raise ``ValueError`` at construction: ``loss_type`` ``cispo``/``sapo``/``vespo``/``luspo``,
   ``importance_sampling_level="sequence"``, ``delta``, ``off_policy_mask_threshold``,
   ``use_bias_correction_kl``, ``top_entropy_quantile < 1`` (use the rule ``high_entropy_mask:rho=...``,
   whose quantile is global instead of per micro-batch), ``entropy_coef`` / ``use_adaptive_entropy``
   (use the rule ``entropy_bonus``). Multimodal inputs are not supported by the statistics pass.

4. **Logging** through TRL's own ``_metrics`` (so ``report_to``, ``log_history`` and the console get
   them), under the key names of the project's trainer (:mod:`scale.metrics_log`), all computed over
   the global generation batch before the update by :func:`theory.diagnostics.batch_statistics` (the
   trainer's and the toy's code; a mean over no token is 0): ``entropy/pos``, ``entropy/neg`` (tokens
   of samples with ``A > 0`` / ``A < 0``), ``adv/pos_frac``, ``adv/neg_frac``, ``logp/mean``,
   ``s_star/mean``, ``s_star/std``, ``baseline/mean``,
   ``deviation/mean`` (``S* − E_p[S]``; Cor 3.4: ≈ 0 on-policy), ``theory/cor35_ratio``,
   ``quad/<q>_frac`` (sign(``A_eff``) x sign(``S* − E_p[S]``)), ``loss/kept_frac`` (kept / valid tokens),
   ``rule/<name>`` (the rule's metrics), and the tabular prediction ``theory/dH_tabular`` (with its
   quadrant parts ``theory/dH_tabular/<q>``): the token mean of the (E6) term ``−α_t (S*_t − E_p[S]_t)``
   with ``α_t = lr · w_t A_eff,t r_t / n_t`` (0 when the ratio is clipped), ``n_t`` the token's share of
   the loss normaliser above (per optimizer step) and ``lr`` the optimizer's current rate -- the
   entropy change a plain SGD step on one free logit vector per state would produce (gradient clipping
   and Adam's rescaling are not in it, so with a real network it predicts the direction and the
   relative size, not the magnitude). TRL's own keys (``entropy``, ``clip_ratio/*``, ``kl``) are logged
   from the loss forward with TRL's definitions. A non-finite value is left out of its window (TRL
   would log a key whose values are all NaN as None). Where they go is TRL's ``report_to``
   (``TrainingArguments``), whose tracker names (``tensorboard``, ``wandb``, ``mlflow``, ``none``) are
   those of the trainer's ``--report-to``.

Cost: the statistics pass is one extra no-grad forward of the policy per pass over a generation batch
(TRL itself adds one only when it needs ``old_per_token_logps``). ``diagnostics=False`` and
``rule=None`` skip it entirely (then the subclass is TRL with the project's loss).

Distributed set-ups: tested on CPU with one process and with two (``torchrun``, gloo). The statistics
pass calls the unwrapped model's backbone and reads the lm_head weight directly. With FSDP2 (accelerate's
``fully_shard``) it runs inside :class:`scale.distributed.gathered` (every weight gathered once for the
pass); a 2-process CPU test checks it on a model sharded as accelerate shards it, against the unsharded
pass. TRL's own loop under accelerate's FSDP2 could not run here: accelerate enables FSDP only on GPUs
(with ``--use_cpu`` it wraps DDP; without, it started two unconnected processes). DeepSpeed ZeRO-3 heads
are gathered with TRL's ``maybe_gather_lm_head_ctx``, untested (no GPU here). FSDP1 (the
``FullyShardedDataParallel`` wrapper) is not expected to work: its root parameters are unsharded only by
the root module's forward, which the statistics pass skips.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence

import torch
from trl import GRPOTrainer

import theory
from scale.distributed import gathered
from scale.loss import LossConfig, grpo_loss, loss_normaliser
from scale.token_stats import token_stats
from theory.diagnostics import batch_statistics, tabular_entropy_change
from theory.rules import Rule, RuleOutput, TokenBatch, make_rule

try:  # TRL helpers (reused, not copied); absent in other TRL versions -> no-op contexts
    from trl.models.utils import disable_gradient_checkpointing as _no_checkpointing
except ImportError:  # pragma: no cover - depends on the TRL version
    _no_checkpointing = None
try:
    from trl.trainer.utils import maybe_gather_lm_head_ctx as _gather_head
except ImportError:  # pragma: no cover - depends on the TRL version
    _gather_head = None

__all__ = ["LOSS_AGGREGATION", "FIELD", "EntropyRuleGRPOTrainer", "end_process_group", "main"]

#: TRL ``loss_type`` -> :class:`scale.loss.LossConfig` ``aggregation`` (the supported loss types)
LOSS_AGGREGATION = {"dapo": "token_mean", "bnpo": "token_mean", "grpo": "seq_mean", "dr_grpo": "constant"}
#: prefix of the keys this subclass adds to TRL's per-micro-batch ``inputs`` dicts
FIELD = "entdyn_"
_RULE_FIELDS = ("keep", "adv", "weight", "kl_coef", "entropy_coef")
_MULTIMODAL = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "token_type_ids",
               "mm_token_type_ids", "image_position_ids", "num_images")
_LOGIT_SCALERS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                  "logits_scaling")


def _ctx(factory, *args):
    return contextlib.nullcontext() if factory is None else factory(*args)


class EntropyRuleGRPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` with a :mod:`theory.rules` rule applied over each global generation batch.

    Args:
        *args, **kwargs: passed to ``trl.GRPOTrainer`` unchanged (``model``, ``reward_funcs``,
            ``args=GRPOConfig(...)``, ``train_dataset``, ``processing_class``, ...).
        rule: a :class:`theory.rules.Rule`, a spec string (``"clip_b:mu=2.0+position_bonus"``) or dict
            for :func:`theory.rules.make_rule`, or None (TRL's GRPO through the project's loss).
        diagnostics: log the entropy statistics and the tabular ``dH`` prediction (module docstring).
            With ``rule=None`` and ``diagnostics=False`` no statistics pass runs.
        stats_chunk_size: tokens per lm_head chunk of the statistics pass (memory ``~ chunk x V``).

    The module docstring says what "batch" means, how statistics are made global across processes and
    gradient accumulation, how the rule output enters TRL's loss, and which TRL options are refused.
    """

    def __init__(self, *args, rule: Rule | str | dict | None = None, diagnostics: bool = True,
                 stats_chunk_size: int = 1024, **kwargs):
        super().__init__(*args, **kwargs)
        self.rule = None if rule is None else make_rule(rule)
        self.diagnostics = bool(diagnostics)
        chunk = stats_chunk_size
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"stats_chunk_size must be an integer >= 1, got {chunk!r}")
        self.stats_chunk_size = chunk
        self._check_supported()
        self.rule_state = self.rule.init_state() if self.rule is not None else None
        self.rule_calls = 0  #: how many times the rule (or the statistics pass) has run

    # ------------------------------------------------------------------------------------------------
    # configuration

    def _check_supported(self) -> None:
        a = self.args
        bad = []
        if self.loss_type not in LOSS_AGGREGATION:
            bad.append(f"loss_type={self.loss_type!r} (supported: {', '.join(LOSS_AGGREGATION)})")
        if self.importance_sampling_level != "token":
            bad.append(f"importance_sampling_level={self.importance_sampling_level!r} (only 'token')")
        if getattr(a, "delta", None) is not None:
            bad.append(f"delta={a.delta!r} (two-sided ratio cap)")
        if getattr(self, "off_policy_mask_threshold", None) is not None:
            bad.append("off_policy_mask_threshold (OPSM)")
        if self.beta != 0.0 and getattr(a, "use_bias_correction_kl", False):
            bad.append("use_bias_correction_kl=True with beta != 0 (set use_bias_correction_kl=False: the k3 "
                       "term is then TRL's plain one)")
        if getattr(self, "top_entropy_quantile", 1.0) < 1.0:
            bad.append(f"top_entropy_quantile={self.top_entropy_quantile} (use the rule "
                       f"'high_entropy_mask:rho={self.top_entropy_quantile}': a global quantile)")
        if getattr(self, "_entropy_bonus_enabled", False):
            bad.append("entropy_coef / use_adaptive_entropy (use the rule 'entropy_bonus')")
        if bad:
            raise ValueError("EntropyRuleGRPOTrainer does not support: " + "; ".join(bad))

    @property
    def _stats_needed(self) -> bool:
        return self.rule is not None or self.diagnostics

    def _mode(self) -> str:
        return "train" if self.model.training else "eval"

    def _accumulation(self, mode: str) -> float:
        ga = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        return float(ga) if mode == "train" else 1.0

    # ------------------------------------------------------------------------------------------------
    # TRL hooks: group ids before TRL's shuffle, the rule once per pass over a generation batch

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        n = out["completion_ids"].shape[0]
        mode = self._mode()
        G = self.num_generations if mode == "train" else self.num_generations_eval
        # TRL computes advantages over the process-ordered gather of all rows: global row i belongs to
        # group i // G, and this process holds rows [rank * n, (rank + 1) * n)
        start = self.accelerator.process_index * n
        out[FIELD + "group"] = torch.arange(start, start + n, device=out["completion_ids"].device) // G
        return out

    def _prepare_inputs(self, generation_batch):
        inputs = super()._prepare_inputs(generation_batch)
        if not self._stats_needed:
            return inputs
        if self._mode() == "train":
            if self._step % self.args.steps_per_generation == 0 or FIELD + "n_kept" not in inputs:
                self._run_rule(self._buffered_inputs, "train")
        else:
            self._run_rule([inputs], "eval")
        return inputs

    # ------------------------------------------------------------------------------------------------
    # the statistics pass

    def _check_plain_logits(self, model) -> None:
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        for name in _LOGIT_SCALERS:
            v = getattr(cfg, name, None)
            if v is not None and v != 1:
                raise NotImplementedError(
                    f"the model config sets {name}={v!r}; the statistics pass computes plain h W^T + b "
                    "logits (scale.token_stats), so this model is not supported")

    @torch.no_grad()
    def _score(self, inputs: dict) -> dict[str, torch.Tensor]:
        """``logp``, ``entropy``, ``s_star``, ``baseline`` ``(B, C)`` of one micro-batch dict, no grad."""
        for key in _MULTIMODAL:
            if inputs.get(key) is not None:
                raise NotImplementedError(f"multimodal inputs ({key}) are not supported (statistics pass)")
        outer = self.accelerator.unwrap_model(self.model)
        model = outer
        if hasattr(model, "get_base_model"):  # PEFT: the transformers model with the adapters injected
            model = model.get_base_model()
        self._check_plain_logits(model)
        backbone = model.base_model
        head = model.get_output_embeddings()
        weight, bias = head.weight, head.bias
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        mask = self._loss_mask(inputs)
        C = completion_ids.shape[1]
        rows = self.args.per_device_train_batch_size
        out: dict[str, list] = {"logp": [], "entropy": [], "s_star": [], "baseline": []}
        # FSDP2 (accelerate's fully_shard): every weight gathered once for this no-grad pass, since the
        # backbone and the lm_head weight are used directly, not through the root module's forward
        with _ctx(_no_checkpointing, self.model, self.args.gradient_checkpointing_kwargs), gathered(outer):
            for s in range(0, input_ids.shape[0], rows):
                e = min(s + rows, input_ids.shape[0])
                with self.accelerator.autocast():
                    h = backbone(input_ids=input_ids[s:e], attention_mask=attention[s:e],
                                 use_cache=False).last_hidden_state
                h = h[:, -C - 1 : -1]  # the positions that predict the completion tokens
                W, b = weight, bias
                if hasattr(W, "full_tensor"):  # an FSDP2 DTensor that gathered() did not cover
                    W = W.full_tensor()
                    b = None if b is None else b.full_tensor()
                with _ctx(_gather_head, weight, bias):
                    st = token_stats(h, W, completion_ids[s:e], mask[s:e], bias=b,
                                     temperature=self.temperature, chunk_size=self.stats_chunk_size,
                                     entropy=True, s_star=True, baseline=True)
                for k in out:
                    out[k].append(getattr(st, k).float())
        return {k: torch.cat(v, dim=0) for k, v in out.items()}

    @staticmethod
    def _loss_mask(inputs: dict) -> torch.Tensor:
        m = inputs["completion_mask"]
        if inputs.get("tool_mask") is not None:
            m = m * inputs["tool_mask"]
        return m.bool()

    def _gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """All-gather ``(b, ...)`` rows of every process in process order (padding dims >= 1 with 0)."""
        if self.accelerator.num_processes == 1:
            return x
        dtype = x.dtype
        if dtype == torch.bool:  # not every backend gathers bool
            x = x.to(torch.uint8)
        for dim in range(1, x.ndim):
            x = self.accelerator.pad_across_processes(x, dim=dim, pad_index=0)
        x = self.accelerator.gather(x)
        return x.to(dtype)

    def _run_rule(self, batches: Sequence[dict], mode: str) -> None:
        """Score ``batches`` (this process's part of a generation batch), run the rule on the global batch,
        store each micro-batch's rows of the output in its dict, log the diagnostics."""
        stats = [self._score(b) for b in batches]
        cat = {k: torch.cat([s[k] for s in stats], dim=0) for k in stats[0]}
        valid_l = torch.cat([self._loss_mask(b) for b in batches], dim=0)
        B_l, C_l = valid_l.shape
        adv_l = torch.cat([b["advantages"] for b in batches], dim=0).float()
        if adv_l.ndim == 1:
            adv_l = adv_l[:, None].expand(B_l, C_l)
        old = [b.get("old_per_token_logps") for b in batches]
        old_l = None if any(o is None for o in old) else torch.cat(old, dim=0).float()
        has_group = FIELD + "group" in batches[0]
        group_l = torch.cat([b[FIELD + "group"] for b in batches], dim=0) if has_group else None
        # micro-batch index of each row (the bnpo / grpo / dr_grpo normalisers are per micro-batch)
        micro_l = torch.cat([torch.full((b["completion_ids"].shape[0],), i, device=valid_l.device)
                             for i, b in enumerate(batches)])

        # --- global batch: every process's rows, in process order ----------------------------------
        P, rank = self.accelerator.num_processes, self.accelerator.process_index
        sizes = self._gather_rows(torch.tensor([B_l], device=valid_l.device)).tolist()
        offsets = [sum(sizes[:r]) for r in range(P)]
        pad_rows = max(sizes)

        def glob(x):
            if P == 1 or x is None:
                return x
            dtype = x.dtype
            x = x.to(torch.uint8) if dtype == torch.bool else x
            pad = [0, 0] * (x.ndim - 1) + [0, pad_rows - x.shape[0]]
            y = self._gather_rows(torch.nn.functional.pad(x, pad) if pad_rows > x.shape[0] else x)
            return torch.cat([y[r * pad_rows : r * pad_rows + sizes[r]] for r in range(P)], dim=0).to(dtype)

        valid = glob(valid_l)
        logp, H, S, base = (glob(torch.where(valid_l, cat[k], 0.0)) for k in ("logp", "entropy", "s_star",
                                                                              "baseline"))
        adv = glob(torch.where(valid_l, adv_l, 0.0))
        old_logp = None if old_l is None else glob(torch.where(valid_l, old_l, 0.0))
        group = glob(group_l)
        micro = glob(micro_l + 0)  # per-process micro-batch index; made unique below with the rank
        rank_of_row = torch.cat([torch.full((sizes[r],), r, device=valid.device) for r in range(P)])
        micro = rank_of_row * (micro.max() + 1) + micro

        batch = TokenBatch(logp=logp, adv=adv, valid=valid, old_logp=old_logp, entropy=H, baseline=base,
                           group=group, step=int(self.state.global_step))
        out = None
        if self.rule is not None:
            gen = torch.Generator().manual_seed(int(self.args.seed) * 1_000_003 + self.rule_calls)
            noise = torch.rand(tuple(logp.shape), generator=gen, dtype=torch.float64).to(logp)
            out = self.rule(batch, noise=noise, state=self.rule_state)
            if mode == "train":
                self.rule_state = out.state
        self.rule_calls += 1
        keep = valid if out is None else out.keep & valid
        n_kept = keep.sum().to(torch.float32)

        # --- this process's rows back into the micro-batch dicts ------------------------------------
        mine = slice(offsets[rank], offsets[rank] + B_l)
        start = 0
        for b in batches:
            n = b["completion_ids"].shape[0]
            rows = slice(mine.start + start, mine.start + start + n)
            start += n
            b[FIELD + "n_kept"] = n_kept
            for name in _RULE_FIELDS:
                b.pop(FIELD + name, None)
            if out is not None:
                for name in _RULE_FIELDS:
                    v = getattr(out, name)
                    if v is not None:
                        b[FIELD + name] = v[rows, :C_l]

        if self.diagnostics or out is not None:
            self._log_rule_window(mode, batch, S, out, keep, n_kept, micro)

    # ------------------------------------------------------------------------------------------------
    # diagnostics

    def _token_alpha(self, batch: TokenBatch, out: RuleOutput | None, keep, n_kept, micro, mode: str):
        """``α_t = lr · d(-loss_step)/d log p_t`` of each token for one optimizer step (module docstring)."""
        A = batch.adv if out is None else out.adv
        w = 1.0 if out is None or out.weight is None else out.weight
        if batch.old_logp is not None:
            r = torch.exp((batch.logp - batch.old_logp).clamp(-20.0, 20.0))
            clipped = ((A > 0) & (r > 1 + self.epsilon_high)) | ((A < 0) & (r < 1 - self.epsilon_low))
        else:
            r, clipped = torch.ones_like(A), torch.zeros_like(keep)
        wa = torch.where(keep & ~clipped, w * A, 0.0)  # 0 where the ratio is clipped (no gradient)
        P = self.accelerator.num_processes
        ga = self._accumulation(mode)
        kind = self.loss_type
        if kind == "dapo":  # per micro-batch / (N_kept / P * GA / SPG); DDP mean over P; sum over GA
            spg = self.args.steps_per_generation if mode == "train" else 1
            norm = n_kept.clamp_min(1.0) * ga / spg
        else:
            micro_ids = torch.unique(micro, return_inverse=True)[1]
            n_micro = int(micro_ids.max()) + 1
            if kind == "bnpo":
                per = torch.zeros(n_micro, device=A.device).index_add_(0, micro_ids, keep.sum(-1).float())
                denom = per.clamp_min(1.0)[micro_ids][:, None]
            else:
                ones = torch.ones_like(micro_ids, dtype=torch.float32)
                rows = torch.zeros(n_micro, device=A.device).index_add_(0, micro_ids, ones)
                denom = rows[micro_ids][:, None]
                if kind == "grpo":
                    denom = denom * keep.sum(-1, keepdim=True).float().clamp_min(1.0)
                else:  # dr_grpo
                    denom = denom * float(self.max_completion_length)
            norm = denom * ga * P
        # the rate of the coming update: what the scheduler last set on the optimizer (before the first
        # step, before TRL has built one, the configured rate)
        opt = getattr(self, "optimizer", None)
        lr = float(opt.param_groups[0]["lr"]) if opt is not None else float(self.args.learning_rate)
        return theory.effective_step_size(lr, wa, ratio=r, normaliser=norm)  # (E5) per token

    @torch.no_grad()
    def _log_rule_window(self, mode, batch: TokenBatch, s_star, out: RuleOutput | None, keep, n_kept,
                         micro) -> None:
        valid = batch.valid
        S = torch.where(valid, s_star, 0.0)
        A_eff = torch.where(keep, batch.adv if out is None else out.adv, 0.0)
        m: dict[str, torch.Tensor] = {}
        if self.diagnostics:  # the batch statistics of theory.diagnostics (the trainer's, the toy's)
            m = batch_statistics(entropy=batch.entropy, logp=batch.logp, s_star=S, baseline=batch.baseline,
                                 adv=batch.adv, valid=valid, adv_eff=A_eff)  # fmt: skip
            del m["entropy"]  # TRL logs its own "entropy" (from the loss forward)
            alpha = self._token_alpha(batch, out, keep, n_kept, micro, mode)
            dev = torch.where(valid, S - batch.baseline, 0.0)
            dh, parts = tabular_entropy_change(alpha, dev, A_eff, valid)
            m["theory/dH_tabular"] = dh  # the trainer's keys (scale.metrics_log, "Logged metrics")
            m.update({f"theory/dH_tabular/{name}": v for name, v in parts.items()})
            m["loss/kept_frac"] = n_kept / valid.sum().to(torch.float32).clamp_min(1.0)
        if out is not None:
            for k, v in out.metrics.items():
                m[f"rule/{k}"] = torch.as_tensor(v, device=valid.device)
        if not m:
            return
        values = torch.stack([v.detach().to(torch.float64).reshape(()) for v in m.values()]).tolist()
        for k, v in zip(m, values, strict=True):
            if math.isfinite(v):  # TRL logs an all-NaN key as None; a missing value is simply not logged
                self._metrics[mode][k].append(v)

    # ------------------------------------------------------------------------------------------------
    # the loss

    def _rule_output(self, inputs: dict, mask: torch.Tensor, adv: torch.Tensor) -> RuleOutput | None:
        if FIELD + "keep" not in inputs:
            out = None
        else:
            f = {name: inputs.get(FIELD + name) for name in _RULE_FIELDS}
            out = RuleOutput(keep=f["keep"] & mask, adv=f["adv"], weight=f["weight"], kl_coef=f["kl_coef"],
                             entropy_coef=f["entropy_coef"])
        is_corrected = self.use_vllm and self.vllm_importance_sampling_correction
        if is_corrected and "importance_sampling_ratio" in inputs:
            is_ratio = inputs["importance_sampling_ratio"].expand(mask.shape)  # TRL multiplies the surrogate
            if out is None:
                out = RuleOutput(keep=mask, adv=adv, weight=is_ratio)
            else:
                w = is_ratio if out.weight is None else out.weight * is_ratio
                out = dataclasses.replace(out, weight=w)
        return out

    def _normaliser(self, inputs, mask, cfg: LossConfig, out: RuleOutput | None, mode: str) -> torch.Tensor:
        ga = self._accumulation(mode)
        if self.loss_type == "dapo":
            n = inputs.get(FIELD + "n_kept")
            n = inputs["num_items_in_batch"] if n is None or FIELD + "keep" not in inputs else n
            n = n.to(torch.float32).clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                n = n * self._accumulation(mode) / self.args.steps_per_generation
            return n
        return loss_normaliser(mask, cfg, out) * ga

    def _compute_loss(self, model, inputs):
        mode = self._mode()
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        logits_to_keep = completion_ids.size(1)
        # multimodal fields are forwarded only when present (TRL's keyword names; text needs none of them)
        keys = (*_MULTIMODAL, "num_tiles", "spatial_shapes")
        mm = {k: inputs[k] for k in keys if inputs.get(k) is not None}
        logp, entropy, aux_loss = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled, **mm)
        mask = self._loss_mask(inputs)
        adv = inputs["advantages"]
        adv = adv[:, None].expand(mask.shape) if adv.ndim == 1 else adv
        old = inputs.get("old_per_token_logps")
        out = self._rule_output(inputs, mask, adv)
        cfg = LossConfig(clip_low=self.epsilon_low, clip_high=self.epsilon_high, dual_clip=None,
                         aggregation=LOSS_AGGREGATION[self.loss_type],
                         max_length=self.max_completion_length if self.loss_type == "dr_grpo" else None,
                         kl_beta=float(self.beta))
        ref = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None
        loss, _ = grpo_loss(logp, old, adv, mask, config=cfg, ref_logp=ref, entropy=entropy, rule_output=out,
                            normaliser=self._normaliser(inputs, mask, cfg, out, mode))
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / self._accumulation(mode)
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        self._log_trl_metrics(mode, logp, old, adv, mask, entropy, ref)
        return loss

    @torch.no_grad()
    def _log_trl_metrics(self, mode, logp, old, adv, mask, entropy, ref) -> None:
        """TRL's standard loss metrics, same definitions (global masked means over valid tokens)."""
        m = mask.to(torch.float32)

        def global_mean(x):
            tot = self.accelerator.reduce(torch.stack([(x * m).sum(), m.sum()]), reduction="sum")
            return tot[0] / tot[1].clamp(min=1.0)

        def seq_mean(x):
            return (x * m).sum(-1) / m.sum(-1)

        vals = {"entropy": global_mean(entropy.detach().float())}
        if ref is not None:
            d = ref - logp.detach()
            vals["kl"] = global_mean(torch.exp(d) - d - 1)
        r = torch.ones_like(m) if old is None else torch.exp(logp.detach() - old)
        low = ((r < 1 - self.epsilon_low) & (adv < 0)).float()
        high = ((r > 1 + self.epsilon_high) & (adv > 0)).float()
        vals["clip_ratio/low_mean"] = global_mean(low)
        vals["clip_ratio/high_mean"] = global_mean(high)
        vals["clip_ratio/region_mean"] = global_mean(torch.maximum(low, high))
        low_seq = self.accelerator.gather(seq_mean(low))
        high_seq = self.accelerator.gather(seq_mean(high))
        vals["clip_ratio/low_min"] = torch.nan_to_num(low_seq, nan=math.inf).min()
        vals["clip_ratio/high_max"] = torch.nan_to_num(high_seq, nan=-math.inf).max()
        floats = torch.stack([v.to(torch.float64).reshape(()) for v in vals.values()]).tolist()
        for k, v in zip(vals, floats, strict=True):
            if math.isfinite(v):  # (a NaN-only key would reach report_to as None)
                self._metrics[mode][k].append(v)


# the launcher (``python -m scale.adapters.trl``) lives in trl_cli; its names are importable from here
from .trl_cli import ScriptArguments, end_process_group, main  # noqa: E402, F401

if __name__ == "__main__":  # pragma: no cover - exercised through the documented command
    main()
    end_process_group()
