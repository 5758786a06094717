"""group_by_length's sampler: batches of similar length, in random order, each row once, the same order per seed."""

import torch
from transformers.trainer_pt_utils import get_length_grouped_indices

from pipeline.batching import ShuffledLengthGroupedSampler, row_lengths


def kinds_of_groups(order, lengths, size):
    groups = [order[i:i + size] for i in range(0, len(order), size)]
    return groups, [{lengths[i] >= 200 for i in group} for group in groups]


def test_batches_stay_grouped_by_length_but_come_in_random_order():
    generator = torch.Generator().manual_seed(0)
    size, n = 16, 16 * 200 + 5  # a short last batch
    # a third long rows (tool conversations, ~300 tokens) among short ones (text, ~100), as in the small recipe
    lengths = [300 + int(x) if x < 10 else 100 + int(x) for x in torch.randint(0, 30, (n,), generator=generator)]
    torch.manual_seed(1)
    order = list(ShuffledLengthGroupedSampler(lengths, size))
    assert sorted(order) == list(range(n))  # every row once
    groups, kinds = kinds_of_groups(order, lengths, size)
    assert max(lengths) in [lengths[i] for i in groups[0]]  # the longest row first: out of memory at once
    assert len(groups[-1]) == 5  # the short batch last: every other batch is one whole step
    mixed = sum(len(k) > 1 for k in kinds)
    assert mixed <= 5, mixed  # at most one mixed batch per megabatch of 50, where long meets short

    torch.manual_seed(1)
    plain = get_length_grouped_indices(lengths, size)  # transformers' order: each megabatch longest first
    plain_groups, plain_kinds = kinds_of_groups(plain, lengths, size)
    switches = sum(a != b for a, b in zip(kinds, kinds[1:]))
    plain_switches = sum(a != b for a, b in zip(plain_kinds, plain_kinds[1:]))
    assert plain_switches <= 3 * 5  # per megabatch: long batches, a mixed one, short ones
    assert switches > 4 * plain_switches, (switches, plain_switches)
    # the batches themselves are transformers' (up to the shuffle)
    assert sorted(map(sorted, groups)) == sorted(map(sorted, plain_groups))

    torch.manual_seed(1)
    assert list(ShuffledLengthGroupedSampler(lengths, size)) == order  # a resumed run replays the order
    torch.manual_seed(2)
    assert list(ShuffledLengthGroupedSampler(lengths, size)) != order


def test_row_lengths_measure_sft_rows_reward_pairs_and_dpo_pairs():
    from datasets import Dataset

    sft = Dataset.from_dict({"input_ids": [[1, 2, 3], [4]]})
    reward = Dataset.from_dict({"chosen_ids": [[1, 2], [3]], "rejected_ids": [[1], [3, 4, 5]]})
    dpo = Dataset.from_dict({"prompt_ids": [[9, 9], [9]], "chosen_ids": [[1], [2, 3]], "rejected_ids": [[1, 2], [3]]})
    assert row_lengths(sft, "length") == [3, 1]
    assert row_lengths(reward, "length") == [2, 3]
    assert row_lengths(dpo, "length") == [4, 3]
    assert row_lengths(sft.add_column("length", [7, 8]), "length") == [7, 8]  # a column of the user's wins
    assert row_lengths(Dataset.from_dict({"text": ["a"]}), "length") is None


def test_grouped_sft_divides_every_step_by_what_random_batches_hold_on_average(tiny_run):
    """sft.train_sampling_strategy: group_by_length: a step's token loss is divided by its rows times the data's
    mean loss tokens per row, not by its own token count, so a batch of short rows does not weigh its tokens more
    than random batches would; and the stage trains with it."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from conftest import run_cli
    from pipeline import batching, data
    from pipeline.recipe import load_recipe

    work, recipe_path, _ = tiny_run
    sft = str(work / "runs/tiny/sft")
    rows = data.read_rows("world:sft", load_recipe(recipe_path))[0][:96]
    for row in rows[::4]:  # one conversation in four is long
        row["messages"][-1]["content"] = row["messages"][-1]["content"] + " ok" * 30
    args = SFTConfig(output_dir=str(work / "sft-grouped"), report_to="none", use_cpu=True, max_length=256,
                     per_device_train_batch_size=8, gradient_accumulation_steps=2,
                     train_sampling_strategy="group_by_length", assistant_only_loss=True,
                     gradient_checkpointing=False)
    trainer = batching.length_grouped(SFTTrainer)(
        model=AutoModelForCausalLM.from_pretrained(sft), args=args, processing_class=AutoTokenizer.from_pretrained(sft),
        train_dataset=data.dataset_of([{"messages": r["messages"]} for r in rows], "rows"))
    loader = trainer.get_train_dataloader()
    batches = list(loader)
    counts = [int(b["labels"][:, 1:].ne(-100).sum()) for b in batches]
    mean_per_row = sum(counts) / len(rows)
    assert trainer._loss_tokens_per_row == mean_per_row
    assert max(counts) > 2 * min(counts)  # grouped: long batches and short ones
    for step in (batches[:2], batches[2:4]):  # one optimizer step: 2 batches of 8 rows
        divisor = trainer._get_num_items_in_batch(step, "cpu")
        assert float(divisor) == mean_per_row * 16  # the same for a long step and a short one

    proc = run_cli(["pipeline/sft.py", recipe_path, "run.name=sft_grouped", f"sft.init_from={work / 'runs/tiny/pretrain'}",
                    "sft.max_steps=4", "sft.train_sampling_strategy=group_by_length", "sft.length_split=3",
                    "sft.heldout_prompts=",
                    "sft.report_to=none"], cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((work / "runs/sft_grouped/sft/metrics.json").read_text())
    assert metrics["eval_loss"] > 0


def test_length_chunks_pad_the_fewest_tokens():
    from pipeline.batching import length_chunks

    lengths = [300, 100, 120, 290, 80, 110, 305, 95]
    (one,) = length_chunks(lengths, 1)
    assert sorted(one) == list(range(8))
    two = length_chunks(lengths, 2)
    assert sorted(map(sorted, two)) == [[0, 3, 6], [1, 2, 4, 5, 7]]  # the three long rows apart
    assert len(length_chunks(lengths, 3)) == 3 and len(length_chunks([100] * 4, 3)) == 1  # equal rows: one group


def test_a_batch_split_by_length_gives_the_whole_batchs_outputs_and_gradients(tiny_run):
    """length_split: 3: the model's forward runs a batch as groups of rows of similar length (fewer tokens through
    the model), and returns what the whole batch gives: logits, TRL's fused log-probs (sft, dpo), the reward model's
    scores and hidden states, the loss; the gradients of every parameter are the same."""
    import copy

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.trainer.utils import add_fused_lm_head

    from pipeline import batching

    work, _, _ = tiny_run
    sft = str(work / "runs/tiny/sft")
    tokenizer = AutoTokenizer.from_pretrained(sft)
    texts = ["What is 2 + 3? The answer is 5."] * 5 + ["Sort 9 4 7 1 for me please " * 6] * 2 + ["Count a b c d " * 3]
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    real = batch["attention_mask"].bool()

    def run(model, **kwargs):
        widths = []
        hook = model.model.register_forward_pre_hook(  # the backbone's input: positional in the score model
            lambda m, a, kw: widths.append((a[0] if a else kw["input_ids"]).numel()), with_kwargs=True)
        model.zero_grad()
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
        hook.remove()
        return out, widths

    def grads(model):
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    whole = AutoModelForCausalLM.from_pretrained(sft)
    split = batching.split_forward(copy.deepcopy(whole), 3)
    (a, wa), (b, wb) = run(whole, labels=labels), run(split, labels=labels)
    assert wa == [batch["input_ids"].numel()] and len(wb) >= 2 and sum(wb) < 0.7 * wa[0]
    assert torch.allclose(a.logits[real], b.logits[real], atol=1e-5)
    assert torch.allclose(a.loss, b.loss, rtol=1e-5)
    a.loss.backward(), b.loss.backward()
    ga, gb = grads(whole), grads(split)
    assert ga.keys() == gb.keys() and all(torch.allclose(ga[n], gb[n], rtol=1e-4, atol=1e-7) for n in ga)

    for model in (whole, split):  # TRL's fused LM head (sft and dpo trainers): log-probs of the label tokens
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    batching.split_forward(split, 3)  # wraps the fused forward, as the stages do after the trainer adds it
    (a, _), (b, wb) = run(whole, labels=labels, fused_lm_head=True), run(split, labels=labels, fused_lm_head=True)
    assert len(wb) >= 2 and a.log_probs.shape == b.log_probs.shape
    for field in ("log_probs", "entropy", "is_top1", "label_mask"):
        assert torch.allclose(a[field].float(), b[field].float(), atol=1e-5), field
    assert torch.allclose(a.loss, b.loss, rtol=1e-5)
    a.log_probs.sum().backward(), b.log_probs.sum().backward()
    ga, gb = grads(whole), grads(split)
    diffs = {n: float((ga[n] - gb[n]).abs().max() / ga[n].abs().max()) for n in ga}
    assert max(diffs.values()) < 1e-4, diffs

    whole = AutoModelForSequenceClassification.from_pretrained(sft, num_labels=1)
    whole.config.pad_token_id = tokenizer.pad_token_id
    split = batching.split_forward(copy.deepcopy(whole), 3)
    (a, _), (b, wb) = run(whole, output_hidden_states=True), run(split, output_hidden_states=True)
    assert len(wb) >= 2 and torch.allclose(a.logits, b.logits, atol=1e-5)  # the score at each row's last token
    assert all(torch.allclose(x[real], y[real], atol=1e-5) for x, y in zip(a.hidden_states, b.hidden_states))


def test_a_ppo_batch_padded_on_both_sides_splits_with_its_positions(tiny_run):
    """ppo.length_split: a rollout (prompts padded on the left, replies on the right) runs as groups of rows, each cut
    to its own columns; the reply logits and the critic's values on every real token and the gradients are the whole
    batch's. Without position_ids (the model would count the left padding) the batch goes through whole."""
    import copy

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from pipeline import batching, rl
    from pipeline.ppo_rollout import positions, reply_logits
    from pipeline.ppo_critic import Critic

    work, _, _ = tiny_run
    sft = str(work / "runs/tiny/sft")
    tokenizer = AutoTokenizer.from_pretrained(sft)
    prompts = ["What is 2 + 3?"] * 5 + ["Sort 9 4 7 1 for me please " * 6] * 3  # text and tool-sized prompts
    replies = ["The answer is 5."] * 3 + ["It is five, " * 4] * 2 + ["1 4 7 9"] * 3
    left = tokenizer.pad({"input_ids": tokenizer(prompts)["input_ids"]}, padding_side="left", return_tensors="pt")
    right = tokenizer.pad({"input_ids": tokenizer(replies)["input_ids"]}, padding_side="right", return_tensors="pt")
    seq = torch.cat([left["input_ids"], right["input_ids"]], 1)
    att = torch.cat([left["attention_mask"], right["attention_mask"]], 1)
    ctx, reply_ids, reply_mask = left["input_ids"].shape[1], right["input_ids"], right["attention_mask"].bool()
    assert batching.row_spans(att) is not None and min(batching.row_spans(att)[0]) == 0 < max(batching.row_spans(att)[0])

    def widths_of(model):
        widths = []
        model.model.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].numel()),
                                              with_kwargs=True)
        return widths

    whole = AutoModelForCausalLM.from_pretrained(sft)
    split = batching.split_forward(copy.deepcopy(whole), 3)
    wa, wb = widths_of(whole), widths_of(split)
    a, b = (reply_logits(m, seq, att, ctx, 0.7) for m in (whole, split))
    assert wa == [seq.numel()] and len(wb) >= 2 and sum(wb) < 0.75 * seq.numel(), (wa, wb)
    assert torch.allclose(a[reply_mask], b[reply_mask], atol=1e-5)
    (rl.logprobs_of(a, reply_ids)[reply_mask].sum()).backward()
    (rl.logprobs_of(b, reply_ids)[reply_mask].sum()).backward()
    ga = {n: p.grad for n, p in whole.named_parameters()}
    gb = {n: p.grad for n, p in split.named_parameters()}
    assert max(float((ga[n] - gb[n]).abs().max() / ga[n].abs().max()) for n in ga) < 1e-4
    wb.clear()
    split(input_ids=seq, attention_mask=att)  # no position_ids: not split
    assert wb == [seq.numel()]

    scorer = AutoModelForSequenceClassification.from_pretrained(sft, num_labels=1)
    critic, split_critic = Critic(scorer), batching.split_forward(Critic(copy.deepcopy(scorer)), 3)
    wc = widths_of(split_critic.model)
    va, vb = (c(input_ids=seq, attention_mask=att, position_ids=positions(att)) for c in (critic, split_critic))
    assert len(wc) >= 2 and va.shape == vb.shape == seq.shape and torch.allclose(va[att.bool()], vb[att.bool()],
                                                                                 atol=1e-5)
    assert batching.tokens_run(split_critic.model) is None  # the critic's forward is split, not its model's
    counted = batching.tokens_run(split_critic)
    assert counted.startswith("1 of 1 forward passes split") and "%" in counted
