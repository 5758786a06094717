"""Stage 4b, ppo: online RL against the reward model: our own actor-critic PPO, or GRPO / RLOO through TRL.

    accelerate launch pipeline/ppo.py recipes/small.yaml [ppo.max_steps=100 ppo.kl_coef=0.05 ...]
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \\
        pipeline/ppo.py recipes/small.yaml ppo.max_steps=4          # two processes on CPU (gloo)
    python pipeline/ppo.py recipes/small.yaml ppo.algorithm=grpo    # TRL's GRPOTrainer (rloo: RLOOTrainer)

One PPO step (InstructGPT's step 3, Ziegler et al. 2019): each process takes `batch_size` prompts, samples one reply
per prompt from the policy (KV cache, left padding, stops at end-of-turn), scores the replies with the reward model
(normalised with the reward_mean/reward_std its stage stored; minus `missing_eos_penalty` for replies that ran out
of tokens), adds a per-token KL penalty against the frozen reference (the starting checkpoint, or the policy with its
LoRA adapter off), computes GAE advantages with the critic's values, and runs `ppo_epochs` epochs of clipped policy
and value updates over `num_minibatches` minibatches. The math lives in pipeline/rl.py. The critic is a value head
on a copy of the reward model (`critic_init: reward`) or of the policy (`critic_init: policy`).

Every `save_steps` steps the policy, critic, optimizers, schedulers, KL coefficient, prompt position, random states,
step counter and history go into `checkpoint-N/`; a killed run resumes from the newest one when run again with the
same inputs. Section keys: PPOConfig below, PPOKeys (pipeline/stages.py) and TRL ModelConfig's LoRA fields.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package, never shadow libraries with our modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import copy
import dataclasses
import math
import os
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Literal

import torch

from pipeline import cli, cluster, data, models, rl, runs
from pipeline.generation import heldout_comparison, heldout_rows
from pipeline.recipe import load_recipe, stage_fields
from pipeline.reward import load_reward_model
from pipeline.stages import STAGES

STAGE = "ppo"
USAGE = "usage: pipeline/ppo.py RECIPE [ppo.KEY=VALUE ...]"


@dataclass
class PPOConfig:
    """The `ppo` section's training keys (the pipeline keys are PPOKeys in pipeline/stages.py)."""

    algorithm: Literal["ppo", "grpo", "rloo"] = "ppo"   # ppo: ours below; grpo / rloo: TRL's trainers
    max_steps: int = 100                 # rollout batches (grpo/rloo: optimizer steps)
    batch_size: int = 32                 # replies per step per process (ppo: one per prompt)
    num_minibatches: int = 2             # minibatches per PPO epoch (one optimizer step each)
    ppo_epochs: int = 4                  # passes over each rollout batch
    gradient_accumulation_steps: int = 1  # micro-batches per minibatch
    learning_rate: float = 1e-5          # policy
    critic_learning_rate: float | None = None  # critic; empty: learning_rate
    lr_scheduler_type: str = "constant"  # transformers scheduler name: constant, linear, cosine, ...
    warmup_steps: int = 0                # optimizer steps of linear warmup
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0           # gradient clipping, policy and critic separately
    gamma: float = 1.0                   # discount
    lam: float = 0.95                    # GAE lambda
    cliprange: float = 0.2               # policy ratio clip (grpo/rloo: epsilon)
    cliprange_value: float = 0.2         # value clip around the rollout's values
    whiten_advantages: bool = True       # normalise advantages per batch
    kl_coef: float = 0.05                # initial KL coefficient beta (grpo/rloo: beta)
    kl_estimator: Literal["k1", "k3"] = "k1"  # per-token KL estimate in the penalty
    adaptive_kl: bool = False            # adapt beta towards target_kl (Ziegler et al.)
    target_kl: float = 6.0               # target KL per reply (nats) for adaptive_kl
    kl_horizon: int = 10000              # adaptive_kl horizon, in replies
    missing_eos_penalty: float | None = 1.0  # subtracted from the score of replies without end-of-turn
    verifier_weight: float = 0.0         # add this times the world's verifier (1 correct, 0 not) to the score
    max_new_tokens: int = 32             # reply budget
    max_prompt_length: int = 128         # longer prompts (in tokens) are skipped
    temperature: float = 1.0             # sampling temperature (log-probabilities use the same)
    top_p: float = 1.0                   # nucleus sampling
    num_generations: int = 4             # grpo/rloo: replies per prompt (the group)
    critic_init: Literal["reward", "policy"] = "reward"  # value head on a copy of the reward model or the policy
    logging_steps: int = 1               # print a line every this many steps (every step goes into metrics.json)
    save_steps: int = 20                 # checkpoint every this many steps; 0: only at the end of training
    save_total_limit: int = 1            # checkpoints kept
    seed: int = 0                        # default: run.seed
    use_cpu: bool = False                # train on CPU even if a GPU is present (automatic without one)
    trl_args: dict = field(default_factory=dict)  # grpo/rloo: more GRPOConfig/RLOOConfig fields, verbatim

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def ppo_config(recipe) -> PPOConfig:
    fields = stage_fields(STAGE)
    values = {k: v for k, v in recipe.section(STAGE).items() if fields[k][0] == "config"}
    values.setdefault("seed", recipe.run.seed)
    cfg = PPOConfig(**values)
    where = f"{recipe.path}: section '{STAGE}'"
    minibatch = cfg.batch_size // cfg.num_minibatches
    if cfg.batch_size % cfg.num_minibatches or minibatch % cfg.gradient_accumulation_steps:
        raise cli.PipelineError(f"{where}: batch_size ({cfg.batch_size}) must split into num_minibatches "
                                f"({cfg.num_minibatches}) x gradient_accumulation_steps "
                                f"({cfg.gradient_accumulation_steps}) equal parts")
    for name in ("max_steps", "batch_size", "ppo_epochs", "max_new_tokens", "temperature", "target_kl", "kl_horizon"):
        if getattr(cfg, name) <= 0:
            raise cli.PipelineError(f"{where}: {name} must be positive, got {getattr(cfg, name)}")
    if cfg.trl_args and cfg.algorithm == "ppo":
        raise cli.PipelineError(f"{where}: trl_args apply to algorithm grpo or rloo, not ppo")
    return cfg


# ---------------------------------------------------------------------------------------------- prompts


def load_prompts(spec: str, recipe):
    """The `prompt` column (with `skill`/`answer` when present) of a prompt dataset or of preference pairs in any
    format data.load_preferences reads (pairs without a prompt column: the shared beginning of chosen/rejected)."""
    rows, _, _ = data.read_rows(spec, recipe)
    if "prompt" in rows[0]:
        ds = data.load(spec, "prompts", recipe)
    else:
        ds, _ = data.load_preferences(spec, recipe)
    return ds.select_columns([c for c in ("prompt", "skill", "answer") if c in ds.column_names])


def last_user_text(prompt) -> str:
    return prompt if isinstance(prompt, str) else next(m["content"] for m in reversed(prompt) if m["role"] == "user")


def with_answers(ds, spec: str):
    """Add `skill`/`answer` for the verifier reward: the dataset's own columns, or solved from world prompts."""
    from pipeline import world

    if {"skill", "answer"} <= set(ds.column_names):
        return ds
    skills, answers = [], []
    for i, prompt in enumerate(ds["prompt"]):
        key = world.prompt_key(last_user_text(prompt))
        if key is None:
            raise cli.PipelineError(f"{spec}: row {i + 1}: verifier_weight needs `skill` and `answer` columns, and "
                                    f"this prompt is not a world problem to solve")
        skills.append(key[0])
        answers.append(world.solve(key))
    return ds.remove_columns([c for c in ("skill", "answer") if c in ds.column_names]) \
        .add_column("skill", skills).add_column("answer", answers)


class PromptSampler:
    """Shuffled passes over the prompts; each step takes `batch_size` per process. Its state is the data position."""

    def __init__(self, n: int, batch_size: int, num_processes: int, rank: int, seed: int):
        self.n, self.batch_size, self.num_processes, self.rank, self.seed = n, batch_size, num_processes, rank, seed
        self.epoch, self.position = 0, 0

    def next_batch(self) -> list[int]:
        need = self.batch_size * self.num_processes
        if self.position + need > self.n:
            self.epoch, self.position = self.epoch + 1, 0
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        chunk = order[self.position:self.position + need]
        self.position += need
        return chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].tolist()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


class Progress:
    """Step counter and per-step history, checkpointed with the rest."""

    def __init__(self):
        self.step, self.history = 0, []

    def state_dict(self) -> dict:
        return {"step": self.step, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.history = state["step"], list(state["history"])


# ---------------------------------------------------------------------------------------------- models


class RewardModel:
    """The reward model as a function of (prompt, reply text): conversations are rendered with its own tokenizer's
    chat template, as its stage trained it. `normalise` uses the mean and std its stage stored in the config."""

    def __init__(self, recipe, checkpoint, device):
        self.tokenizer = models.load_tokenizer(recipe, checkpoint)
        self.model = load_reward_model(recipe, checkpoint.path).to(device).eval().requires_grad_(False)
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.mean = float(getattr(self.model.config, "reward_mean", None) or 0.0)
        self.std = float(getattr(self.model.config, "reward_std", None) or 1.0)

    @torch.no_grad()
    def __call__(self, prompts, replies, batch_size: int = 64) -> torch.Tensor:
        """Raw scores, one per (prompt, reply)."""
        texts = []
        for prompt, reply in zip(prompts, replies):
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            texts.append(self.tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": reply}],
                                                            tokenize=False))
        scores = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, padding_side="right",
                                 add_special_tokens=False).to(self.model.device)
            scores.append(self.model(**enc).logits[:, 0].float())
        return torch.cat(scores)

    def normalise(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.mean) / self.std


class Critic(torch.nn.Module):
    """A value per token: a sequence-classification model's backbone and its one-output head, applied at every
    position (the head of a reward model already maps a hidden state to a score)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.head = next((h for h in ("score", "classifier") if hasattr(model, h)), None)
        if self.head is None:
            raise cli.PipelineError(f"{type(model).__name__}: no `score` head to use as a value head")

    def forward(self, input_ids, attention_mask, position_ids):
        backbone = getattr(self.model, self.model.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state
        return getattr(self.model, self.head)(hidden).squeeze(-1).float()


def positions(attention_mask):
    """Position ids that ignore left padding, as generate() used them."""
    return (attention_mask.cumsum(1) - 1).clamp(min=0)


def reply_logits(model, sequences, attention_mask, context_length: int, temperature: float):
    """Logits (scaled by the sampling temperature) of the distributions each reply token was drawn from."""
    out = model(input_ids=sequences, attention_mask=attention_mask, position_ids=positions(attention_mask),
                use_cache=False)
    return out.logits[:, context_length - 1:-1].float() / temperature


@torch.no_grad()
def rollout(policy, tokenizer, prompt_ids: list[list[int]], cfg: PPOConfig, device):
    """One sampled reply per prompt (KV cache, left padding). Reply tokens after the first end-of-turn become
    padding; `mask` marks the reply up to and including it."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    enc = tokenizer.pad({"input_ids": prompt_ids}, padding_side="left", return_tensors="pt").to(device)
    sequences = policy.generate(**enc, do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                                max_new_tokens=cfg.max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                                use_cache=True)
    context_length = enc["input_ids"].shape[1]
    replies = sequences[:, context_length:]
    is_eos = replies == eos
    ended = is_eos.any(1)
    last = torch.where(ended, is_eos.int().argmax(1), replies.shape[1] - 1)
    mask = (torch.arange(replies.shape[1], device=device)[None] <= last[:, None]).long()
    replies = replies.masked_fill(mask == 0, pad)
    return {"sequences": torch.cat([enc["input_ids"], replies], 1),
            "attention_mask": torch.cat([enc["attention_mask"], mask], 1),
            "replies": replies, "mask": mask.float(), "ended": ended, "context_length": context_length}


# ---------------------------------------------------------------------------------------------- PPO


# printed every logging_steps (metrics.json has every statistic of every step)
LOG_KEYS = ("step", "reward_raw", "reward", "verifier", "kl", "kl_coef", "entropy", "clipfrac", "approx_kl",
            "value_loss", "explained_variance", "reply_length", "ended")


def train_ppo(recipe, run, cfg: PPOConfig, keys, peft_values, prompts, init, reward_ckpt):
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from pipeline import world
    from pipeline.generation import render_prompt

    accelerator = Accelerator(cpu=cfg.use_cpu or not torch.cuda.is_available(), step_scheduler_with_optimizer=False)
    device, main = accelerator.device, accelerator.is_main_process
    set_seed(cfg.seed, device_specific=True)

    # models: policy (maybe LoRA), frozen reference, critic, reward model
    tokenizer = models.load_tokenizer(recipe, init)
    policy = models.load_causal_lm(recipe, init.path, peft_values=peft_values, revision=recipe.model.revision)
    models.configure_generation(policy, tokenizer)
    lora = models.peft_config(peft_values)
    if lora is not None:
        from peft import get_peft_model

        policy = get_peft_model(policy, lora)
        reference = None  # the policy with its adapter off
    else:
        reference = models.load_causal_lm(recipe, init.path, revision=recipe.model.revision)
        reference = reference.to(device).eval().requires_grad_(False)
    reward_model = RewardModel(recipe, reward_ckpt, device)
    if cfg.critic_init == "reward":
        if reward_model.tokenizer.get_vocab() != tokenizer.get_vocab():
            raise cli.PipelineError(f"{reward_ckpt.path}: critic_init: reward needs the reward model to share the "
                                    f"policy's tokenizer; use critic_init: policy")
        critic = Critic(copy.deepcopy(reward_model.model).requires_grad_(True))  # loaded once, trained copy
    else:
        critic = Critic(load_reward_model(recipe, init.path))
    critic.model.config.pad_token_id = tokenizer.pad_token_id
    if main:
        print(f"[ppo] policy {models.describe(policy)}; critic from the {cfg.critic_init} model "
              f"{models.describe(critic)}; reward mean {reward_model.mean:.3g}, std {reward_model.std:.3g}", flush=True)

    # prompts, rendered and tokenized once; answers for the verifier reward
    texts = [render_prompt(tokenizer, p) for p in prompts["prompt"]]
    prompt_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    usable = [i for i, ids in enumerate(prompt_ids) if len(ids) <= cfg.max_prompt_length]
    if len(usable) < cfg.batch_size * accelerator.num_processes:
        raise cli.PipelineError(f"{keys.prompts}: {len(usable)} prompts of at most max_prompt_length="
                                f"{cfg.max_prompt_length} tokens, fewer than one batch "
                                f"({cfg.batch_size} x {accelerator.num_processes} processes)")

    # optimizers and schedulers: one optimizer step per minibatch
    total_updates = cfg.max_steps * cfg.ppo_epochs * cfg.num_minibatches
    opt_policy = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                   weight_decay=cfg.weight_decay)
    opt_critic = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_learning_rate or cfg.learning_rate,
                                   weight_decay=cfg.weight_decay)
    sched_policy, sched_critic = (get_scheduler(cfg.lr_scheduler_type, opt, num_warmup_steps=cfg.warmup_steps,
                                                num_training_steps=total_updates)
                                  for opt in (opt_policy, opt_critic))
    policy, critic, opt_policy, opt_critic, sched_policy, sched_critic = accelerator.prepare(
        policy, critic, opt_policy, opt_critic, sched_policy, sched_critic)
    policy.eval()  # no dropout: the update must see the distributions the rollout sampled from
    critic.eval()
    unwrapped = accelerator.unwrap_model(policy)

    # everything else a resumed run needs
    kl_ctl = rl.KLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon, cfg.adaptive_kl)
    sampler = PromptSampler(len(usable), cfg.batch_size, accelerator.num_processes, accelerator.process_index,
                            cfg.seed)
    progress = Progress()
    for obj in (kl_ctl, sampler, progress):
        accelerator.register_for_checkpointing(obj)
    if main:  # a save interrupted by a kill; the checkpoint before it is intact
        for partial_save in run.out.glob("tmp-checkpoint-*"):
            shutil.rmtree(partial_save)
    resume = run.last_checkpoint()
    if resume:
        accelerator.load_state(resume)
        if main:
            print(f"[ppo] resumed from {resume} at step {progress.step}", flush=True)

    micro_size = cfg.batch_size // cfg.num_minibatches // cfg.gradient_accumulation_steps
    started = time.time() - (progress.history[-1]["elapsed_s"] if progress.history else 0.0)
    bar = tqdm(total=cfg.max_steps, initial=progress.step, desc="ppo", disable=not main)
    cluster.STOP.training = True  # from here SIGTERM/SIGUSR1 mean: checkpoint after this step and exit to requeue
    while progress.step < cfg.max_steps:
        # 1. rollout: sample replies, score them, compute log-probs, reference log-probs and values
        batch_rows = [usable[i] for i in sampler.next_batch()]
        batch = rollout(unwrapped, tokenizer, [prompt_ids[i] for i in batch_rows], cfg, device)
        seq, att, ctx = batch["sequences"], batch["attention_mask"], batch["context_length"]
        replies, mask, ended = batch["replies"], batch["mask"], batch["ended"]
        texts = [t.strip() for t in tokenizer.batch_decode(replies, skip_special_tokens=True)]
        rows = prompts.select(batch_rows)
        raw = reward_model(rows["prompt"], texts).to(device)
        normalised = reward_model.normalise(raw)
        scores = rl.score_with_eos_penalty(normalised, ended, cfg.missing_eos_penalty)
        if cfg.verifier_weight:
            correct = torch.tensor([world.verify(s, t, a) for s, t, a in zip(rows["skill"], texts, rows["answer"])],
                                   dtype=torch.float32, device=device)
            scores = scores + cfg.verifier_weight * correct
        with torch.no_grad():
            logprobs = rl.logprobs_of(reply_logits(unwrapped, seq, att, ctx, cfg.temperature), replies)
            if reference is None:
                with unwrapped.disable_adapter():
                    ref_logprobs = rl.logprobs_of(reply_logits(unwrapped, seq, att, ctx, cfg.temperature), replies)
            else:
                ref_logprobs = rl.logprobs_of(reply_logits(reference, seq, att, ctx, cfg.temperature), replies)
            values = critic(seq, att, positions(att))[:, ctx - 1:-1]

        # 2. rewards and advantages
        kl = rl.kl_penalty(logprobs, ref_logprobs, cfg.kl_estimator) * mask
        rewards = rl.penalised_rewards(scores, kl, mask, kl_ctl.value)
        advantages, returns = rl.gae(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = rl.masked_whiten(advantages, mask) * mask

        # 3. PPO epochs over minibatches; one optimizer step per minibatch
        stats = {k: [] for k in ("policy_loss", "value_loss", "clipfrac", "value_clipfrac", "approx_kl", "entropy")}
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(cfg.batch_size, device=device)
            for minibatch in order.split(cfg.batch_size // cfg.num_minibatches):
                micro_batches = minibatch.split(micro_size)
                for k, idx in enumerate(micro_batches):
                    with ExitStack() as no_sync:
                        if k < len(micro_batches) - 1:  # reduce gradients across processes once per minibatch
                            no_sync.enter_context(accelerator.no_sync(policy))
                            no_sync.enter_context(accelerator.no_sync(critic))
                        logits = reply_logits(policy, seq[idx], att[idx], ctx, cfg.temperature)
                        new_logprobs = rl.logprobs_of(logits, replies[idx])
                        new_values = critic(seq[idx], att[idx], positions(att[idx]))[:, ctx - 1:-1]
                        pg_loss, clipfrac, approx_kl = rl.policy_loss(new_logprobs, logprobs[idx], advantages[idx],
                                                                      mask[idx], cfg.cliprange)
                        vf_loss, vf_clipfrac = rl.value_loss(new_values, values[idx], returns[idx], mask[idx],
                                                             cfg.cliprange_value)
                        accelerator.backward((pg_loss + vf_loss) / cfg.gradient_accumulation_steps)
                    with torch.no_grad():
                        entropy = rl.masked_mean(rl.entropy_of(logits), mask[idx])
                    for name, value in zip(stats, (pg_loss, vf_loss, clipfrac, vf_clipfrac, approx_kl, entropy)):
                        stats[name].append(value.detach())
                accelerator.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
                accelerator.clip_grad_norm_(critic.parameters(), cfg.max_grad_norm)
                for opt, sched in ((opt_policy, sched_policy), (opt_critic, sched_critic)):
                    opt.step()
                    sched.step()
                    opt.zero_grad()

        # 4. statistics (means over processes), KL controller, log, checkpoint
        seq_kl = kl.sum(1)
        local = {
            "reward_raw": raw.mean(), "reward": normalised.mean(), "score": scores.mean(),
            "kl": seq_kl.mean(), "non_score_reward": (rewards.sum(1) - scores).mean(),
            **{k: torch.stack(v).mean() for k, v in stats.items()},
            "explained_variance": torch.tensor(rl.explained_variance(values, returns, mask), device=device),
            "reply_length": mask.sum(1).mean(), "ended": ended.float().mean(),
        }
        if cfg.verifier_weight:
            local["verifier"] = correct.mean()
        names = list(local)
        reduced = accelerator.reduce(torch.stack([local[k].float() for k in names]), reduction="mean").tolist()
        step_stats = dict(zip(names, reduced))
        step_stats["kl_coef"] = kl_ctl.value
        kl_ctl.update(step_stats["kl"], cfg.batch_size * accelerator.num_processes)
        progress.step += 1
        step_stats = {"step": progress.step, **step_stats, "lr": sched_policy.get_last_lr()[0],
                      "elapsed_s": round(time.time() - started, 2)}
        progress.history.append(step_stats)
        bar.update(1)
        if main and (progress.step % cfg.logging_steps == 0 or progress.step == cfg.max_steps):
            bar.write("[ppo] " + " ".join(f"{k} {v:.4g}" for k, v in step_stats.items() if k in LOG_KEYS))
        saved = progress.step == cfg.max_steps or (cfg.save_steps and progress.step % cfg.save_steps == 0)
        if saved:
            save_checkpoint(accelerator, run.out, progress.step, cfg.save_total_limit)
        if progress.step < cfg.max_steps and cluster.stop_requested(device):  # every process, same step
            if not saved:
                save_checkpoint(accelerator, run.out, progress.step, cfg.save_total_limit)
            bar.close()
            cluster.exit_preempted(run.out / f"checkpoint-{progress.step}", main)
    cluster.STOP.training = False
    bar.close()

    # the trained policy (full model, or adapter [+ merged/]), like every other stage
    if main:
        unwrapped.save_pretrained(str(run.out), safe_serialization=True)
        tokenizer.save_pretrained(str(run.out))
        if keys.merge_adapter and lora is not None:
            merged = unwrapped.merge_and_unload()
            models.configure_generation(merged, tokenizer)
            merged.save_pretrained(str(run.out / "merged"), safe_serialization=True)
            tokenizer.save_pretrained(str(run.out / "merged"))
    accelerator.wait_for_everyone()
    return progress.history


def save_checkpoint(accelerator, out: Path, step: int, keep: int) -> None:
    """All state into tmp-checkpoint-N, then renamed to checkpoint-N: a kill never leaves a half checkpoint."""
    tmp = out / f"tmp-checkpoint-{step}"
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.replace(tmp, out / f"checkpoint-{step}")
        old = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))[:-max(keep, 1)]
        for path in old:
            shutil.rmtree(path)
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------------- GRPO / RLOO


# TRL's logged names -> ours ("reward" is TRL's weighted sum of the reward functions: our `score`; TRL's "kl" is a
# mean per token, ours a mean per reply)
TRL_NAMES = {"reward": "score", "reward_raw": "reward_raw", "reward_normalised": "reward", "ended": "ended",
             "rewards/verifier/mean": "verifier", "kl": "kl_per_token", "entropy": "entropy",
             "completions/mean_length": "reply_length", "clip_ratio/region_mean": "clipfrac", "loss": "policy_loss",
             "learning_rate": "lr"}


def train_trl(recipe, run, cfg: PPOConfig, keys, peft_values, prompts, init, reward_ckpt):
    """TRL's GRPOTrainer or RLOOTrainer on the same prompts, with the same reward (the normalised reward model,
    the missing-eos penalty, optionally the verifier). Returns the per-step history in ppo's names.

    Mapped keys: max_steps, batch_size (per_device_train_batch_size: replies per process, a multiple of
    num_generations across processes), num_generations, gradient_accumulation_steps, learning_rate,
    lr_scheduler_type, warmup_steps, weight_decay, max_grad_norm, kl_coef (beta), cliprange (epsilon),
    max_new_tokens (max_completion_length), temperature, top_p, logging_steps, save_steps, save_total_limit, seed.
    Anything else of GRPOConfig / RLOOConfig goes in `trl_args` (e.g. {num_iterations: 2, scale_rewards: batch}).
    """
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from pipeline import world

    config_cls, trainer_cls = (GRPOConfig, GRPOTrainer) if cfg.algorithm == "grpo" else (RLOOConfig, RLOOTrainer)
    mapped = dict(
        output_dir=str(run.out), max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
        num_generations=cfg.num_generations, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler_type, warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, beta=cfg.kl_coef, epsilon=cfg.cliprange,
        max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
        logging_steps=cfg.logging_steps, save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500, save_total_limit=cfg.save_total_limit, seed=cfg.seed,
        use_cpu=cfg.use_cpu or not torch.cuda.is_available(), use_vllm=False, report_to="none", bf16=False,
        gradient_checkpointing=False,
    )
    funcs, weights = ["reward_model"], [1.0]
    if cfg.verifier_weight:
        funcs, weights = funcs + ["verifier"], weights + [cfg.verifier_weight]
    try:
        args = config_cls(**{**mapped, "reward_weights": weights, **cfg.trl_args})
    except (ValueError, TypeError) as err:
        raise cli.PipelineError(f"{recipe.path}: section '{STAGE}' ({config_cls.__name__}): "
                                f"{str(err).splitlines()[0]}") from None

    tokenizer = models.load_tokenizer(recipe, init)
    model = models.load_causal_lm(recipe, init.path, peft_values=peft_values, revision=recipe.model.revision)
    models.configure_generation(model, tokenizer)
    reward_model = RewardModel(recipe, reward_ckpt, "cpu")
    eos = tokenizer.eos_token_id

    def reply_texts(completions):
        return [c[-1]["content"] if isinstance(c, list) else c for c in completions]

    def reward_model_score(prompts, completions, completion_ids, log_metric, **_):
        raw = reward_model(prompts, reply_texts(completions)).cpu()
        normalised = reward_model.normalise(raw)
        ended = torch.tensor([len(ids) > 0 and ids[-1] == eos for ids in completion_ids])
        log_metric("reward_raw", raw.mean().item())
        log_metric("reward_normalised", normalised.mean().item())
        log_metric("ended", ended.float().mean().item())
        return rl.score_with_eos_penalty(normalised, ended, cfg.missing_eos_penalty).tolist()

    def verifier(prompts, completions, skill, answer, **_):
        return [float(world.verify(s, r, a)) for s, r, a in zip(skill, reply_texts(completions), answer)]

    columns = ["prompt"] + (["skill", "answer"] if cfg.verifier_weight else [])
    trainer = trainer_cls(model=model, args=args, train_dataset=prompts.select_columns(columns),
                          reward_funcs=[{"reward_model": reward_model_score, "verifier": verifier}[f] for f in funcs],
                          processing_class=tokenizer, peft_config=models.peft_config(peft_values))
    reward_model.model.to(trainer.accelerator.device)
    trainer.train(resume_from_checkpoint=run.last_checkpoint())
    models.save_trained(trainer, tokenizer, run.out, merge_adapter=keys.merge_adapter)

    history = []
    for entry in trainer.state.log_history:
        if "reward" in entry:  # a step that generated (with num_iterations > 1 the others reuse its replies)
            history.append({"step": entry["step"],
                            **{ours: entry[theirs] for theirs, ours in TRL_NAMES.items() if theirs in entry}})
    return history


# ---------------------------------------------------------------------------------------------- results


def summarise(history: list[dict], algorithm: str) -> dict:
    """Start/end means (over the first and last 10% of steps) of the curves a person looks at first."""
    n = max(1, len(history) // 10)

    def mean(rows, key):
        vals = [r[key] for r in rows if r.get(key) is not None and not math.isnan(r[key])]
        return sum(vals) / len(vals) if vals else None

    out = {"algorithm": algorithm, "steps": history[-1]["step"] if history else 0}
    for key in ("reward_raw", "reward", "kl", "kl_per_token", "verifier", "reply_length", "ended"):
        start, end = mean(history[:n], key), mean(history[-n:], key)
        if start is not None:
            out[f"{key}_start"], out[f"{key}_end"] = start, end
    return out


def plot_curves(history: list[dict], path: Path, algorithm: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, (ax_r, ax_k) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, label in (("reward", "reward (normalised)"), ("reward_raw", "reward (raw)"), ("verifier", "verifier")):
        if any(r.get(key) is not None for r in history):
            ax_r.plot(steps, [r.get(key) for r in history], label=label)
    ax_r.set(xlabel="step", title=f"{algorithm}: reward", ylabel="mean per reply")
    ax_r.legend()
    per = "reply" if any(r.get("kl") is not None for r in history) else "token"
    ax_k.plot(steps, [r.get("kl" if per == "reply" else "kl_per_token") for r in history], color="tab:red")
    ax_k.set(xlabel="step", title="KL to the reference", ylabel=f"nats per {per}")
    if any("kl_coef" in r for r in history):
        ax_c = ax_k.twinx()
        ax_c.plot(steps, [r.get("kl_coef") for r in history], color="tab:gray", ls="--")
        ax_c.set_ylabel("KL coefficient (dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    recipe = load_recipe(*cli.split_stage_args(argv, USAGE))
    keys, cfg, peft_values = recipe.keys(STAGE), ppo_config(recipe), recipe.peft_values(STAGE)
    if keys.reward_model in STAGES and keys.reward_model not in recipe.stages:
        raise cli.PipelineError(f"{recipe.path}: ppo.reward_model is the `{keys.reward_model}` stage, but the recipe "
                                f"has no `{keys.reward_model}` section: add one, or name a saved reward model folder")
    with runs.StageRun(recipe, STAGE) as run:
        prompts = load_prompts(keys.prompts, recipe)
        if cfg.verifier_weight:
            prompts = with_answers(prompts, keys.prompts)
        heldout = heldout_rows(recipe, keys, STAGE)
        init, reward_ckpt = run.checkpoint(), run.checkpoint("reward_model")
        if init.path is None:
            raise cli.PipelineError(f"{recipe.path}: ppo.init_from is a new model from `model.config`; "
                                    f"start PPO from a trained checkpoint (e.g. sft)")
        if peft_values.get("use_peft") and models.is_adapter(models.model_path(init.path)):
            raise cli.PipelineError(f"{init.path}: a LoRA adapter without a merged model: a new adapter needs a full "
                                    f"model under it; save that stage with merge_adapter=true")
        run.prepare()

        train = train_ppo if cfg.algorithm == "ppo" else train_trl
        history = train(recipe, run, cfg, keys, peft_values, prompts, init, reward_ckpt)

        metrics = summarise(history, cfg.algorithm)
        if heldout is not None and run.state.is_main_process:
            metrics.update(heldout_comparison(recipe, keys, heldout, ("start", init.path), (STAGE, str(run.out))))
        metrics["final"] = history[-1] if history else {}
        metrics["history"] = history
        if run.state.is_main_process and history:
            plot_curves(history, run.out / "curves.png", cfg.algorithm)
        run.finish(metrics, config=cfg, global_batch_size=cfg.batch_size * run.state.num_processes)


if __name__ == "__main__":
    cli.run_main(main)
