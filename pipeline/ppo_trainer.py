"""Our actor-critic PPO for language models: one step is rollout -> score -> advantages -> update -> log/checkpoint.

    trainer = PPOTrainer(recipe, run, cfg, keys, peft_values, prompts, init, reward_checkpoints)
    history = trainer.train()   # resumes from the newest checkpoint of a killed run of the same inputs
    trainer.save()

Each process takes `batch_size` / `num_generations` prompts per step and samples `num_generations` replies (1 by
default) to each from the policy (KV cache, left padding, stops at end-of-turn): a `Rollout`; prompts that offer
tools are answered in multi-turn rollouts that call the recipe's tools (pipeline/ppo_tools.py), and every phase after
the rollout reads only the tokens the policy chose (`Rollout.mask`). The reward model scores the replies (normalised
with the statistics its stage stored; minus `missing_eos_penalty` for replies that ran out of tokens; plus
`verifier_weight` times the world's verifier, which is also logged as the gold score whenever the prompts have
answers, and `image_verifier_weight` times tool_world.verify's verdict on tool tasks, logged as `image_verifier`),
the policy's, the frozen reference's and the critic's per-token values are computed, a per-token KL penalty is added
and GAE gives the advantages; without a critic (`advantage_estimator` other than gae) the return-to-go does, after a
baseline from the other replies to the same prompt for the group estimators. Then `ppo_epochs` passes of clipped
policy (and value) updates over `num_minibatches` minibatches. After each step pipeline/monitors.py's rules read the
history (over-optimisation, collapse) and warn. The math on tensors is pipeline/rl.py, the critic
pipeline/ppo_critic.py; the policy and critic train as one module (pipeline/ppo_models.py), which a DeepSpeed
launch shards. `implicit_reward` adds a DPO policy's per-token reward (reward_model.ImplicitReward). Every
`save_steps` steps all state (models, optimizers, schedulers, KL coefficient, prompt position, random states,
history) goes into `checkpoint-N/`: the accelerate state (safetensors, and torch files that load with
weights_only=True) and `loop_state.json` (KL coefficient, prompt position, step and history), no pickle.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from functools import partial
from pathlib import Path

import torch

from pipeline import (batching, cli, devices, faults, generation, judges, log, models, monitors, ppo_models,
                      preemption, reward_rounds, rl, safe_resume, threads, vllm_engine)
from pipeline.generation import render_prompt
from pipeline.ppo_config import GROUP_ESTIMATORS, prompts_that_fit
from pipeline.ppo_critic import build_critic
from pipeline.ppo_models import PolicyAndCritic
from pipeline.ppo_rollout import PromptSampler, Rollout, reply_logits, sample_replies
from pipeline.ppo_tools import ToolEnv, conversation, tool_counts
from pipeline.reward_model import ImplicitReward, lm_head_weight, load_scorer, offered_tools

# printed every logging_steps (metrics.json has every statistic of every step)
LOG_KEYS = ("step", "reward_raw", "reward", "implicit_reward", "verifier", "annotator_vs_start", "image_verifier",
            "tool_call_rate", "valid_call_rate", "kl", "kl_coef", "entropy", "distinct_2", "clipfrac", "approx_kl",
            "value_loss", "explained_variance", "reply_length", "ended")
# each minibatch's statistics, in this order (value_*: with a critic; kl_loss: with use_kl_loss)
UPDATE_STATS = ("policy_loss", "value_loss", "clipfrac", "value_clipfrac", "approx_kl", "entropy", "kl_loss")


class Progress:
    """Step counter and per-step history, checkpointed with the rest."""

    def __init__(self):
        self.step, self.history = 0, []

    def state_dict(self) -> dict:
        return {"step": self.step, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.history = state["step"], list(state["history"])


class PPOTrainer:
    """Models, optimizers and resumable state of one PPO run (see the module docstring)."""

    def __init__(self, recipe, run, cfg, keys, peft_values, prompts, init, reward_checkpoints, implicit=None,
                 tokenizer=None):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.run, self.cfg, self.keys, self.prompts = run, cfg, keys, prompts
        trackers = [t for t in ([cfg.report_to] if isinstance(cfg.report_to, str) else cfg.report_to) if t != "none"]
        self.accelerator = Accelerator(cpu=ppo_models.on_cpu(cfg),
                                       gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                                       step_scheduler_with_optimizer=False, log_with=trackers or None,
                                       project_dir=str(run.out / "runs"))
        if trackers:
            self.accelerator.init_trackers("ppo", config={k: v for k, v in cfg.to_dict().items()
                                                          if isinstance(v, (int, float, str, bool))})
        self.device, self.main = self.accelerator.device, self.accelerator.is_main_process
        set_seed(cfg.seed, device_specific=True)

        # models: policy (maybe LoRA), frozen reference, reward model, critic; all whole (pipeline/ppo_models.py)
        ppo_models.load_whole(self.accelerator)
        self.tokenizer = tokenizer = tokenizer or models.load_tokenizer(recipe, init)  # the stage's, if checked
        policy, self.lora, reference = models.load_policy(recipe, init, peft_values, tokenizer, "ppo")
        self.reference = None if reference is None else reference.to(self.device)  # None: the policy, adapter off
        if self.lora is not None:
            from peft import get_peft_model

            policy = get_peft_model(policy, self.lora)
        self.implicit = None  # ppo.implicit_reward: a DPO policy whose log-ratio to the reference is a dense reward
        if implicit is not None:
            self.implicit = ImplicitReward(recipe, implicit, tokenizer, cfg.implicit_reward_beta, self.device)
        reward_checkpoint = reward_checkpoints[0]
        self.reward_model = load_scorer(recipe, reward_checkpoints, self.device, cfg.ensemble_objective,
                                        cfg.uncertainty_penalty)  # one model, or an ensemble (reward_ensemble)
        self.reward_round, self.recipe = 1, recipe  # iterated RLHF (reward_rounds > 1): pipeline/reward_rounds.py
        self.round_lm_head = None  # GRM's frozen LM head for the rounds' fine-tuning: the starting policy's
        if cfg.reward_rounds > 1 and cfg.reward_round_lm_loss_coefficient:
            self.round_lm_head = lm_head_weight(recipe, init.path, self.reward_model.tokenizer)
            if self.round_lm_head.shape[1] != self.reward_model.model.config.hidden_size:
                raise cli.PipelineError(f"{reward_checkpoint.path}: ppo.reward_round_lm_loss_coefficient reads the "
                                        f"reward model's hidden states with the policy's LM head, but their sizes "
                                        f"differ ({self.reward_model.model.config.hidden_size} vs "
                                        f"{self.round_lm_head.shape[1]}); set it to 0")
        critic = None  # the other estimators take a baseline from the rewards (pipeline/rl.py)
        if cfg.trains_critic:
            critic = build_critic(recipe, cfg, init, self.reward_model, reward_checkpoint.path, tokenizer)
        log.info("policy %s; %s; reward mean %.3g, std %.3g", models.describe(policy),
                 f"critic from the {cfg.critic_init} model {models.describe(critic)}" if critic is not None else
                 f"no critic (advantage_estimator {cfg.advantage_estimator}, {cfg.num_generations} replies per prompt)",
                 self.reward_model.mean, self.reward_model.std)

        # the recipe's tools, when prompts offer some (loaded now: see pipeline/ppo_tools.py); prompts rendered with
        # the tools they offer and tokenized once
        num_processes = self.accelerator.num_processes
        offers = offered_tools(prompts)
        self.tools = None
        if any(offers) and recipe.tools.tools:  # (without a tools section: they are answered without, ppo.py warns)
            self.tools = ToolEnv(recipe, cfg, keys, prompts, folder=run.out, rank=self.accelerator.process_index,
                                 num_processes=num_processes)
        texts = [render_prompt(tokenizer, p, t if self.tools else None)
                 for p, t in zip(prompts["prompt"], offers)]
        self.prompt_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        budgets = [cfg.total_tokens() if self.tools and offer else cfg.max_new_tokens for offer in offers]
        self.usable, rule = prompts_that_fit([len(ids) for ids in self.prompt_ids], budgets, cfg,
                                             generation.context_length(policy, tokenizer))
        usable = set(self.usable)
        self.annotated = [i for i in reward_rounds.annotated_rows(prompts) if i in usable]  # reward rounds' prompts
        prompts_per_step = cfg.batch_size // cfg.num_generations  # each answered num_generations times
        if len(self.usable) < prompts_per_step * num_processes:
            raise cli.PipelineError(f"{keys.prompts}: {len(self.usable)} of its {len(self.prompt_ids)} prompts within "
                                    f"{rule}, fewer than one batch ({prompts_per_step} x {num_processes} processes)")
        if len(self.usable) < len(self.prompt_ids):
            log.info(f"{keys.prompts}: {len(self.prompt_ids) - len(self.usable)} of {len(self.prompt_ids)} prompts "
                     f"not within {rule}: left out")

        # ppo.length_split: the forward passes over a rollout (policy, reference, DPO policy, critic) in groups of
        # rows of similar length; generation and the reward model's scoring are not touched
        for model in (policy, critic, self.reference, self.implicit and self.implicit.model):
            if model is not None:
                batching.split_forward(model, keys.length_split)
        # the policy and the critic (when there is one) trained as one module, one optimizer step per minibatch;
        # under DeepSpeed one engine (pipeline/ppo_models.py)
        total_updates = cfg.max_steps * cfg.ppo_epochs * cfg.num_minibatches
        ppo_models.configure_deepspeed(self.accelerator, cfg)
        trained = PolicyAndCritic(policy, critic)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(
            trained, *ppo_models.optimizer_and_scheduler(self.accelerator, trained, cfg, total_updates))
        self.model.eval()  # no dropout: the update must see the distributions the rollout sampled from
        self.parts = self.accelerator.unwrap_model(self.model)  # .policy, .critic: for generation and scoring
        self.unwrapped = self.parts.policy
        self.engine = None  # generation.backend: vllm: rollouts sampled by vLLM, the policy's weights pushed each step
        if vllm_engine.uses_vllm(recipe, "ppo"):
            self.engine = vllm_engine.Engine(recipe, self.unwrapped, tokenizer, self.accelerator)

        # everything else a resumed run needs
        self.kl_ctl = rl.KLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon, cfg.adaptive_kl)
        self.sampler = PromptSampler(len(self.usable), prompts_per_step, num_processes,
                                     self.accelerator.process_index, cfg.seed)
        self.progress = Progress()
        # saved as JSON beside the accelerate state (safe_resume.LOOP_STATE), never with register_for_checkpointing:
        # accelerate pickles registered objects and unpickles them on resume, running whatever a checkpoint holds
        self.loop_state = {"kl_controller": self.kl_ctl, "sampler": self.sampler, "progress": self.progress}

    # ------------------------------------------------------------------------------------------ one step

    def rollout(self) -> Rollout:
        """Phase 1: sample `num_generations` replies (1 by default) to each of this step's prompts, a prompt's
        replies in consecutive rows (the group rl.group_baseline reads)."""
        rows = [self.usable[i] for i in self.sampler.next_batch() for _ in range(self.cfg.num_generations)]
        if self.engine is not None:
            self.engine.use(self.unwrapped)  # the weights of the last update
        if self.tools is not None:  # multi-turn: the policy calls tools (pipeline/ppo_tools.py)
            return self.tools.rollout(self.unwrapped, self.tokenizer, self.prompt_ids, rows, step=self.progress.step,
                                      keep_images=self.logged_step(), device=self.device, engine=self.engine)
        batch = sample_replies(self.unwrapped, self.tokenizer, [self.prompt_ids[i] for i in rows], rows, self.cfg,
                               self.device, engine=self.engine)
        batch.texts = [t.strip() for t in self.tokenizer.batch_decode(batch.replies, skip_special_tokens=True)]
        return batch

    @torch.no_grad()
    def score(self, batch: Rollout) -> None:
        """Phase 2: the reward of each reply, and the policy's, the reference's and the critic's view of it."""
        cfg, rows = self.cfg, self.prompts.select(batch.rows)
        batch.raw, batch.normalised, batch.scores = self.reward_model.policy_scores(
            rows["prompt"], conversation(batch), batch.ended, cfg.missing_eos_penalty, tools=batch.tools,
            clip=cfg.reward_clip, desc="ppo rewards")
        if {"skill", "answer"} <= set(rows.column_names):  # the gold score, logged to see over-optimisation
            verdicts = judges.verifier_scores(rows["skill"], rows["answer"], batch.texts)  # None: a tool task
            batch.judged = torch.tensor([v is not None for v in verdicts], device=self.device)
            batch.correct = torch.tensor([v or 0.0 for v in verdicts], dtype=torch.float32, device=self.device)
            if self.logged_step():
                batch.vs_start = self.against_start(rows, batch, [  # your own answers: no annotator to ask
                    i for i, v in enumerate(verdicts) if v is not None and judges.annotator_judges(rows[i])])
        if self.tools is not None:  # the tool tasks' gold score (tool_world.verify), logged as image_verifier
            self.tools.judge(rows, batch)
        if cfg.verifier_weight:  # only then does the gold score enter the reward
            batch.scores = batch.scores + cfg.verifier_weight * batch.correct
        if cfg.image_verifier_weight:  # the same for the tool tasks' gold score
            batch.scores = batch.scores + cfg.image_verifier_weight * batch.tool_correct
        seq, att, ctx = batch.sequences, batch.attention_mask, batch.context_length
        logits, values = self.parts(seq, att, ctx, cfg.temperature)
        batch.logprobs = rl.logprobs_of(logits, batch.replies)
        batch.ref_logprobs = rl.logprobs_of(self.reference_logits(seq, att, ctx, cfg.temperature), batch.replies)
        if self.implicit is not None:  # RTO's dense reward, read at temperature 1
            batch.implicit = self.implicit.token_rewards(batch, batch.ref_logprobs if cfg.temperature == 1.0 else
                                                         rl.logprobs_of(self.reference_logits(seq, att, ctx, 1.0),
                                                                        batch.replies))
        if values is not None:
            batch.values = values

    def reference_logits(self, seq, att, ctx, temperature):
        """The frozen reference's reply logits: the reference model, or the policy with its LoRA adapter off."""
        if self.reference is None:
            with self.unwrapped.disable_adapter():
                return reply_logits(self.unwrapped, seq, att, ctx, temperature)
        return reply_logits(self.reference, seq, att, ctx, temperature)

    def logged_step(self) -> bool:
        step = self.progress.step + 1
        return step % self.cfg.logging_steps == 0 or step == self.cfg.max_steps

    @torch.no_grad()
    def against_start(self, rows, batch: Rollout, judged: list[int]) -> tuple[float, int]:
        """A second gold score: the world's noise-free annotator compares each judged reply with a reply the starting
        policy (the reference) samples for the same prompt. Returns (wins, judged), a tie half a win. Sampled under
        its own seed with the global random state left as it was: logging never changes the run."""
        if not judged:
            return 0.0, 0
        ids = [self.prompt_ids[batch.rows[i]] for i in judged]
        seed = (self.cfg.seed * 1_000_003 + self.progress.step) * self.accelerator.num_processes \
            + self.accelerator.process_index
        with devices.fork_random_state(self.device):
            torch.manual_seed(seed)
            if self.reference is None:
                with self.unwrapped.disable_adapter():
                    start = sample_replies(self.unwrapped, self.tokenizer, ids, judged, self.cfg, self.device)
            else:
                start = sample_replies(self.reference, self.tokenizer, ids, judged, self.cfg, self.device)
        texts = [t.strip() for t in self.tokenizer.batch_decode(start.replies, skip_special_tokens=True)]
        outcomes = [judges.annotator_outcome(rows[i], batch.texts[i], text) for i, text in zip(judged, texts)]
        return sum((o + 1) / 2 for o in outcomes), len(outcomes)

    def advantages(self, batch: Rollout) -> None:
        """Phase 3: per-token rewards (the score, less a group baseline with rloo / reinforce_baseline / group_norm,
        minus the KL penalty) and advantages: GAE with the critic's values, or the return-to-go without a critic."""
        cfg = self.cfg
        batch.kl = rl.kl_penalty(batch.logprobs, batch.ref_logprobs, cfg.kl_estimator) * batch.mask
        scores = batch.scores
        if cfg.advantage_estimator in GROUP_ESTIMATORS:
            scores = rl.group_baseline(scores, cfg.num_generations, cfg.advantage_estimator)
        batch.kl_coef = 0.0 if cfg.use_kl_loss else self.kl_ctl.value  # use_kl_loss: the update's loss has it
        batch.rewards = rl.penalised_rewards(scores, batch.kl, batch.mask, batch.kl_coef, batch.implicit)
        if self.parts.critic is None:
            batch.advantages = batch.returns = rl.returns_to_go(batch.rewards, batch.mask, cfg.gamma)
        else:
            batch.advantages, batch.returns = rl.gae(batch.rewards, batch.values, batch.mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:  # over every process's replies: N processes whiten as one with the whole batch
            sum_over_processes = None if self.accelerator.num_processes == 1 else \
                partial(self.accelerator.reduce, reduction="sum")
            batch.advantages = rl.masked_whiten(batch.advantages, batch.mask, sum_over_processes=sum_over_processes) \
                * batch.mask

    def update(self, batch: Rollout) -> dict[str, list[torch.Tensor]]:
        """Phase 4: ppo_epochs passes over the batch in minibatches, one optimizer step per minibatch."""
        cfg, accelerator = self.cfg, self.accelerator
        seq, att, ctx, mask = batch.sequences, batch.attention_mask, batch.context_length, batch.mask
        micro_size = cfg.batch_size // cfg.num_minibatches // cfg.gradient_accumulation_steps
        stats = {}
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(cfg.batch_size, device=self.device)
            for minibatch in order.split(cfg.batch_size // cfg.num_minibatches):
                for idx in minibatch.split(micro_size):  # gradient_accumulation_steps micro-batches
                    with accelerator.accumulate(self.model):  # gradients reduced across processes once per minibatch
                        logits, new_values = self.model(seq[idx], att[idx], ctx, cfg.temperature)
                        new_logprobs = rl.logprobs_of(logits, batch.replies[idx])
                        pg_loss, clipfrac, approx_kl = rl.policy_loss(new_logprobs, batch.logprobs[idx],
                                                                      batch.advantages[idx], mask[idx], cfg.cliprange)
                        step, loss = {"policy_loss": pg_loss, "clipfrac": clipfrac, "approx_kl": approx_kl}, pg_loss
                        if cfg.use_kl_loss:  # GRPO's way: beta x KL to the reference in the loss, not in the reward
                            step["kl_loss"] = rl.masked_mean(rl.kl_penalty(new_logprobs, batch.ref_logprobs[idx],
                                                                           cfg.kl_estimator), mask[idx])
                            loss = loss + self.kl_ctl.value * step["kl_loss"]
                        if new_values is not None:
                            step["value_loss"], step["value_clipfrac"] = rl.value_loss(
                                new_values, batch.values[idx], batch.returns[idx], mask[idx], cfg.cliprange_value)
                            loss = loss + step["value_loss"]
                        accelerator.backward(loss)  # divided by gradient_accumulation_steps (accelerate)
                    with torch.no_grad():
                        step["entropy"] = rl.masked_mean(rl.entropy_of(logits), mask[idx])
                    for name in (n for n in UPDATE_STATS if n in step):
                        stats.setdefault(name, []).append(step[name].detach())
                # the policy and the critic clipped each to its own norm; under DeepSpeed the engine has clipped both
                # as one norm and stepped in backward (clip, step and zero_grad do nothing then; the schedule steps)
                for part in filter(None, (self.parts.policy, self.parts.critic)):
                    accelerator.clip_grad_norm_(part.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad()
        return stats

    def step_statistics(self, batch: Rollout, stats: dict, started: float) -> dict:
        """Phase 5a: this step's means over all processes; the KL controller sees the step's KL."""
        local = batch.statistics({k: torch.stack(v).mean() for k, v in stats.items()}, self.cfg.num_generations)
        names = list(local)
        reduced = self.accelerator.reduce(torch.stack([local[k].float() for k in names]), reduction="mean").tolist()
        step_stats = dict(zip(names, reduced))
        # shares over the rows they concern, summed over processes (a key without any such row this step is left out)
        ratios = tool_counts(batch.calls, batch.tools, batch.verdicts) if self.tools is not None else {}
        if batch.correct is not None:
            ratios["verifier"] = ((batch.correct * batch.judged).sum(), batch.judged.sum())
        if batch.vs_start is not None:
            ratios["annotator_vs_start"] = batch.vs_start
        if ratios:
            sums = torch.tensor([[float(n), float(d)] for n, d in ratios.values()], device=self.device)
            sums = self.accelerator.reduce(sums, reduction="sum").tolist()
            step_stats.update({k: n / d for k, (n, d) in zip(ratios, sums) if d > 0})
        step_stats["kl_coef"] = self.kl_ctl.value
        if self.cfg.reward_rounds > 1:
            step_stats["reward_round"] = self.reward_round  # the proxy's scale changes with the round
        self.kl_ctl.update(step_stats["kl"], self.cfg.batch_size * self.accelerator.num_processes)
        return {"step": self.progress.step + 1, **step_stats, "lr": self.scheduler.get_last_lr()[0],
                "elapsed_s": round(time.time() - started, 2)}

    # ------------------------------------------------------------------------------------------ the loop

    def train(self) -> list[dict]:
        from tqdm.auto import tqdm

        cfg, progress = self.cfg, self.progress
        if self.main:  # a save interrupted by a kill; the checkpoint before it is intact
            for partial_save in self.run.out.glob("tmp-checkpoint-*"):
                shutil.rmtree(partial_save)
        resume = self.run.last_checkpoint()  # complete, intact, and every file loads with weights_only=True
        if resume:
            self.accelerator.load_state(resume)
            state = json.loads((Path(resume) / safe_resume.LOOP_STATE).read_text())
            for name, obj in self.loop_state.items():
                obj.load_state_dict(state[name])
            log.info("resumed from %s at step %d", resume, progress.step)
        started = time.time() - (progress.history[-1]["elapsed_s"] if progress.history else 0.0)
        bar = tqdm(total=cfg.max_steps, initial=progress.step, desc="ppo", disable=not self.main)
        preemption.STOP.training = True  # from here SIGTERM/SIGUSR1 mean: checkpoint after this step and exit to requeue
        while progress.step < cfg.max_steps:
            threads.rebalance()
            with ppo_models.gathered(self.accelerator, self.model):  # ZeRO-3: whole weights while not training
                if cfg.reward_rounds > 1:
                    self.enter_reward_round(reward_rounds.round_at(progress.step, cfg.max_steps, cfg.reward_rounds))
                batch = self.rollout()
                self.score(batch)
            self.advantages(batch)
            stats = self.update(batch)

            step_stats = self.step_statistics(batch, stats, started)  # phase 5: log and checkpoint
            progress.step = step_stats["step"]
            progress.history.append(step_stats)
            self.accelerator.log(step_stats, step=progress.step)  # to the trackers of report_to, if any
            bar.update(1)
            faults.point("training", until=preemption.STOP.signalled)
            if progress.step % cfg.logging_steps == 0 or progress.step == cfg.max_steps:
                log.info(" ".join(f"{k} {v:.4g}" for k, v in step_stats.items() if k in LOG_KEYS))
            for warning in monitors.new_warnings(progress.history, self.keys.monitor_window):
                log.warning(warning["message"])
            saved = progress.step == cfg.max_steps or (cfg.save_steps and progress.step % cfg.save_steps == 0)
            if saved:
                self.save_checkpoint()
            if progress.step < cfg.max_steps and preemption.stop_requested(self.device):  # every process, same step
                if not saved:
                    self.save_checkpoint()
                bar.close()
                preemption.exit_preempted(self.run.out / f"checkpoint-{progress.step}", self.main)
        preemption.STOP.training = False
        bar.close()
        saved = batching.tokens_run(self.unwrapped)
        if saved:
            log.info("ppo.length_split, the policy: %s", saved)
        for tracker in self.accelerator.trackers:  # not end_training(): it also destroys the process group
            tracker.finish()
        return progress.history

    def enter_reward_round(self, r: int) -> None:
        """Score with round r's reward model from now on: the one saved in its folder, built first (by the main
        process, from round r-1's) when the folder is not whole. A resumed run loads the round it resumes in."""
        if r == self.reward_round:
            return
        folder = reward_rounds.round_dir(self.run.out, r)
        if not reward_rounds.is_whole(folder):
            if self.reward_round != r - 1:  # resumed at round r's first step: round r-1's model is the start
                self.enter_reward_round(r - 1)
            if self.main:
                reward_rounds.build_round(r, out=self.run.out, reward=self.reward_model, policy=self.unwrapped,
                                          tokenizer=self.tokenizer, prompts=self.prompts, rows=self.annotated,
                                          cfg=self.cfg, noise=self.recipe.world.label_noise, step=self.progress.step,
                                          lm_head=self.round_lm_head, device=self.device)
            self.accelerator.wait_for_everyone()
        self.reward_model = reward_rounds.load_round(self.recipe, folder, self.device)
        self.reward_round = r

    def save_checkpoint(self) -> None:
        """All state into tmp-checkpoint-N, then renamed to checkpoint-N: a kill never leaves a half checkpoint."""
        out, step, accelerator = self.run.out, self.progress.step, self.accelerator
        tmp = out / f"tmp-checkpoint-{step}"
        accelerator.save_state(str(tmp))
        faults.point("checkpoint")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / safe_resume.LOOP_STATE).write_text(json.dumps(
                {name: obj.state_dict() for name, obj in self.loop_state.items()}))
            os.replace(tmp, out / f"checkpoint-{step}")
            old = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
            for path in old[:-max(self.cfg.save_total_limit, 1)]:
                shutil.rmtree(path)
        accelerator.wait_for_everyone()

    def save(self) -> None:
        """The trained policy (full model, or adapter [+ merged/]), like every other stage."""
        out: Path = self.run.out
        weights = ppo_models.policy_state_dict(self.accelerator, self.model)  # every process: ZeRO-3 gathers them
        if self.main:
            self.unwrapped.save_pretrained(str(out), state_dict=weights, safe_serialization=True)
            faults.point("final-save")
            self.tokenizer.save_pretrained(str(out))
            if self.keys.merge_adapter and self.lora is not None:
                models.save_merged(out, self.tokenizer)
        self.accelerator.wait_for_everyone()
