"""Reference-free preference losses for the dpo stage: SimPO, CPO and ORPO as more `dpo.loss_type` names.

TRL 1.16 has them only in `trl.experimental` (CPOTrainer, ORPOTrainer), on its old tokenization path, which renders
a tool pair's prompt without its tool schemas. Here the dpo stage keeps TRL's DPOTrainer for the data, the
collation, `length_split` and the logs, and replaces only the loss: it compares the policy's own log-probabilities of
the chosen and the rejected reply, so no reference model is loaded or run. LLaMA-Factory calls two of them
`pref_loss: simpo` and `orpo`. With s the summed and a the mean log-probability of a reply's tokens:

    simpo  -log σ(β (a_w − a_l) − γ)                          SimPO (Meng et al. 2024); γ is `dpo.simpo_gamma`
    cpo    -log σ(β (s_w − s_l)) + NLL                        CPO (Xu et al. 2024)
    orpo   NLL − β log σ(log odds(a_w) − log odds(a_l))       ORPO (Hong et al. 2024), odds(a) = e^a / (1 − e^a)

NLL is TRL's `sft` term: the mean negative log-probability of the chosen replies' tokens. The names combine with
each other and with `sft` (`[simpo, sft]` is CPO-SimPO), weighted by `loss_weights`, not with the losses that
compare against a reference. `[sft]` alone (SFT on the chosen replies) runs here too: it reads no reference either.
"""

from __future__ import annotations

import dataclasses

from pipeline.cli import PipelineError

LOSSES = ("simpo", "cpo", "orpo")
# DPOConfig keys about the reference or DPO's log-ratios: they would do nothing here, so a changed one is refused
IGNORED = {"precompute_ref_log_probs": False, "sync_ref_model": False, "ld_alpha": None, "use_weighting": False,
           "f_divergence_type": "reverse_kl", "label_smoothing": 0.0}
LOG_ODDS_CEILING = -1e-6  # a mean log-prob of 0 makes 1 - e^a zero: its log odds would be infinite


def names(loss_type) -> list[str]:
    """`loss_type` as DPOConfig holds it: a list of names (a single name becomes a list of one)."""
    return [loss_type] if isinstance(loss_type, str) else [str(n) for n in loss_type or []]


def is_reference_free(loss_type) -> bool:
    """No term of `loss_type` reads a reference: these losses and `sft` (the NLL of the chosen replies alone, whose
    reference TRL would load and run for nothing)."""
    given = names(loss_type)
    return bool(given) and all(n in LOSSES or n == "sft" for n in given)


def check(recipe, stage: str = "dpo") -> None:
    """Refuse, in one line before anything loads, a reference-free loss mixed with one that needs a reference, and
    the keys that only concern a reference."""
    loss_type = names(recipe.config_default(stage, "loss_type"))
    free = [n for n in loss_type if n in LOSSES]
    needs_reference = [n for n in loss_type if n not in LOSSES and n != "sft"]
    if free and needs_reference:
        raise PipelineError(f"{recipe.path}: {stage}.loss_type {loss_type}: {', '.join(free)} compare the policy's "
                            f"own log-probs and load no reference model; combine them with each other and `sft` "
                            f"only, not with {', '.join(needs_reference)}")
    if not is_reference_free(loss_type):
        return
    for key, default in IGNORED.items():
        if recipe.config_default(stage, key) != default:
            raise PipelineError(f"{recipe.path}: {stage}.{key} does nothing with the reference-free loss_type "
                                f"{loss_type} (it concerns a reference model or DPO's log-ratios); remove it")


@dataclasses.dataclass
class PairLosses:
    """One batch of pairs, chosen rows first (TRL's layout); per-pair tensors have shape (pairs,)."""

    loss: object                  # scalar: the weighted sum of the terms' batch means
    chosen_rewards: object        # β x the log-prob the first preference term compares (mean for simpo/orpo, sum cpo)
    rejected_rewards: object
    chosen_logps: object          # summed log-probs, as TRL's logps/chosen and logps/rejected
    rejected_logps: object
    nll: object                   # scalar: the chosen replies' mean negative log-prob per token
    log_odds_ratio: object = None  # (pairs,), with orpo

    def logged(self) -> dict:
        """The values the trainer logs (per pair or scalar; averaged over the batch)."""
        logged = {"rewards/chosen": self.chosen_rewards, "rewards/rejected": self.rejected_rewards,
                  "rewards/accuracies": (self.chosen_rewards > self.rejected_rewards).float(),
                  "rewards/margins": self.chosen_rewards - self.rejected_rewards,
                  "logps/chosen": self.chosen_logps, "logps/rejected": self.rejected_logps, "nll_loss": self.nll}
        if self.log_odds_ratio is not None:
            logged["log_odds_ratio"] = self.log_odds_ratio
        return {k: v.detach() for k, v in logged.items()}


def log_odds(mean_logps):
    """log(p / (1 - p)) of p = e^a, as log p - log(-expm1(a)): exact where 1 - e^a rounds badly near a = 0."""
    import torch

    a = mean_logps.clamp(max=LOG_ODDS_CEILING)
    return a - torch.log(-torch.expm1(a))


def pair_losses(loss_types, loss_weights, per_token_logps, completion_mask, beta: float, gamma: float) -> PairLosses:
    """The reference-free losses of one batch. per_token_logps, completion_mask: (2 x pairs, tokens), each reply's
    log-prob of every token and 1 on its completion tokens; the first half of the rows are the chosen replies."""
    import torch.nn.functional as F

    mask = completion_mask.to(per_token_logps.dtype)
    sums = (per_token_logps * mask).sum(dim=1)
    means = sums / mask.sum(dim=1).clamp(min=1.0)
    chosen_sum, rejected_sum = sums.chunk(2)
    chosen_mean, rejected_mean = means.chunk(2)
    chosen_mask = mask.chunk(2)[0]
    nll = -(per_token_logps.chunk(2)[0] * chosen_mask).sum() / chosen_mask.sum().clamp(min=1.0)
    loss, rewards, ratio = 0.0, None, None
    for name, weight in zip(loss_types, loss_weights, strict=True):
        if name == "simpo":
            term = -F.logsigmoid(beta * (chosen_mean - rejected_mean) - gamma)
        elif name == "cpo":
            term = -F.logsigmoid(beta * (chosen_sum - rejected_sum)) + nll
        elif name == "orpo":
            ratio = log_odds(chosen_mean) - log_odds(rejected_mean)
            term = nll - beta * F.logsigmoid(ratio)
        elif name == "sft":
            term = nll.expand(chosen_sum.shape)
        else:
            raise ValueError(f"{name} is not a reference-free loss (one of {', '.join(LOSSES)}, sft)")
        loss = loss + term.mean() * weight
        if rewards is None and name != "sft":
            rewards = (chosen_sum, rejected_sum) if name == "cpo" else (chosen_mean, rejected_mean)
    rewards = rewards or (chosen_mean, rejected_mean)
    return PairLosses(loss, beta * rewards[0], beta * rewards[1], chosen_sum, rejected_sum, nll, ratio)


def trainer_class(dpo_trainer_class, gamma: float):
    """`dpo_trainer_class` (TRL's DPOTrainer or a subclass) with the reference-free losses in place of its loss: it
    loads no reference model and scores no reference log-probs."""
    import torch

    class ReferenceFreeTrainer(dpo_trainer_class):
        def __init__(self, *args, **kwargs):
            config = kwargs["args"]
            config.precompute_ref_log_probs = True  # TRL then builds no reference model from the policy's path ...
            try:
                super().__init__(*args, **kwargs)
            finally:
                config.precompute_ref_log_probs = False
            self.precompute_ref_logps = False  # ... and evaluate() has none to score either

        def _precompute_ref_logps(self, dataset, name, batch_size):
            return dataset  # ... nor scores one with the policy in its place

        def _compute_loss(self, model, inputs, return_outputs):
            mode = "train" if self.model.training else "eval"
            completion_mask = inputs["completion_mask"]
            model_kwargs = {k: v for k, v in inputs.items() if k not in ("completion_mask", "ref_chosen_logps",
                                                                            "ref_rejected_logps")}
            model_kwargs["use_cache"] = False
            if self.aux_loss_enabled:
                model_kwargs["output_router_logits"] = True
            labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
            outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
            shift_mask = completion_mask[..., 1:]
            per_token_logps = outputs.log_probs[:, -shift_mask.size(1):]  # prompt-learning PEFT prepends tokens
            result = pair_losses(self.loss_types, self.loss_weights, per_token_logps, shift_mask, self.beta, gamma)
            loss = result.loss
            if self.aux_loss_enabled:
                loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            for key, value in result.logged().items():
                self._metrics[mode][key].append(self.accelerator.gather(value.reshape(-1)).mean().item())
            if mode == "train":
                tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
                self._total_train_tokens += tokens // self._tp_size
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            if return_outputs:  # compute_metrics wants logits, which the fused head does not build
                with torch.no_grad():
                    outputs = model(**model_kwargs)
                return loss, outputs
            return loss

    return ReferenceFreeTrainer
