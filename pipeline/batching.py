"""Less padding for the sft, reward and dpo stages: README "Padding: `length_split` and `group_by_length`".

`split_forward` (key `length_split`) runs each batch through the model as groups of rows of similar length and
returns the whole batch's outputs: the same batches and gradients, less padding. `length_grouped` makes
`train_sampling_strategy: group_by_length` batch rows of similar length: transformers' LengthGroupedSampler sorts each
megabatch of up to 50 batches longest first and trains them in that order, so data of two lengths (the world's
~300-token tool conversations among ~100-token text ones) trains in runs of one kind, about 17 steps of tool rows,
then 33 of text rows, over and over; here its batches train shuffled (as fairseq's length-bucketed batches do), the
batch with the longest row still first so that running out of memory happens at once. It also measures TRL's
tokenized pairs, which have no `input_ids` for transformers' sampler to measure (it stops with "Can only
automatically infer lengths").
"""

from __future__ import annotations

import functools

import torch


def measurable(dataset, length_column: str) -> bool:
    """Whether `row_lengths` can measure the rows (from the column names alone, without reading the rows)."""
    columns = getattr(dataset, "column_names", None) or ()
    return length_column in columns or "input_ids" in columns or {"chosen_ids", "rejected_ids"} <= set(columns)


def row_lengths(dataset, length_column: str) -> list[int] | None:
    """Each row's padded width in its batch: `length_column` when the data has one, else the tokenized row (TRL's
    sft `input_ids`; reward pairs' longer side; dpo pairs' prompt plus longer reply, the collator pads both replies
    to it); None for data that is not a tokenized `datasets.Dataset`."""
    if not measurable(dataset, length_column):
        return None
    columns = dataset.column_names
    if length_column in columns:
        return list(dataset[length_column])
    if "input_ids" in columns:
        return [len(ids) for ids in dataset["input_ids"]]
    prompts = dataset["prompt_ids"] if "prompt_ids" in columns else [()] * len(dataset)
    return [len(p) + max(len(c), len(r)) for p, c, r in zip(prompts, dataset["chosen_ids"], dataset["rejected_ids"])]


class ShuffledLengthGroupedSampler(torch.utils.data.Sampler):
    """transformers' length-grouped order cut into its groups of `group_size` rows (a step's rows on one process),
    the groups shuffled: the first (it holds the longest row) stays first and a short last group stays last, so every
    other group is still one whole step. Draws from torch's global generator, as transformers' samplers do: the
    trainer's seed fixes the order, and a resumed run replays it."""

    def __init__(self, lengths: list[int], group_size: int):
        self.lengths, self.group_size = lengths, group_size

    def __len__(self):
        return len(self.lengths)

    def __iter__(self):
        from transformers.trainer_pt_utils import get_length_grouped_indices

        order = get_length_grouped_indices(self.lengths, self.group_size)
        groups = [order[i:i + self.group_size] for i in range(0, len(order), self.group_size)]
        last = [groups.pop()] if len(groups) > 1 and len(groups[-1]) < self.group_size else []
        middle = [groups[1 + i] for i in torch.randperm(len(groups) - 1).tolist()]
        for group in groups[:1] + middle + last:
            yield from group


def loss_tokens_per_row(collator, dataset, chunk: int = 256) -> float | None:
    """The mean number of tokens a row puts into the loss, counted as transformers counts them for its loss
    normaliser (`labels[..., 1:] != -100` of the collated rows: masks and truncation included); None when the
    collator gives no `labels` (preference pairs: their losses are means over pairs, not tokens)."""
    total = 0
    for start in range(0, len(dataset), chunk):
        batch = collator([dataset[i] for i in range(start, min(start + chunk, len(dataset)))])
        if "labels" not in batch or batch["labels"].dim() != 2:
            return None
        total += int(batch["labels"][:, 1:].ne(-100).sum())
    return total / max(1, len(dataset))


def length_grouped(trainer_class):
    """`trainer_class` (TRL's SFTTrainer, RewardTrainer or DPOTrainer) whose `group_by_length` trains in
    ShuffledLengthGroupedSampler's order, with the weight every token had in random order, and evaluates in the
    same order as without it.

    The weight: a token-level loss (sft) is the sum over a step's tokens divided by their number. Random batches all
    hold about the same number, so every token weighs alike; a grouped batch of short rows holds few, so its tokens
    would weigh more. So the divisor becomes the rows of the step times the dataset's mean loss tokens per row: what
    random batches divide by on average. It is not the whole story: grouped with transformers' divisor, the small
    recipe's sft ended with twice the eval loss on tool conversations (0.12 against 0.067; text 0.28 both), with
    this one still 0.10-0.11 (README), and the recipe trains in random order."""

    class LengthGrouped(trainer_class):
        _loss_tokens_per_row = None

        def _lengths(self, dataset):
            if self.args.train_sampling_strategy != "group_by_length":
                return None
            return row_lengths(dataset, self.args.length_column_name)

        def _get_train_sampler(self, train_dataset=None):
            dataset = self.train_dataset if train_dataset is None else train_dataset
            lengths = self._lengths(dataset)
            if lengths is None:
                return super()._get_train_sampler(train_dataset)
            flat = getattr(self.args, "padding_free", False) or getattr(self.args, "packing", False)
            if "input_ids" in dataset.column_names and not flat:
                self._loss_tokens_per_row = loss_tokens_per_row(self.data_collator, dataset)
            return ShuffledLengthGroupedSampler(lengths, self.args.train_batch_size * self.args.gradient_accumulation_steps)

        def _get_num_items_in_batch(self, batch_samples, device):
            counted = super()._get_num_items_in_batch(batch_samples, device)
            if self._loss_tokens_per_row is None or not torch.is_tensor(counted) or counted.dim() != 0:
                return counted
            rows = sum(len(batch["labels"]) for batch in batch_samples)
            gathered = self.args.average_tokens_across_devices and self.args.world_size > 1  # a sum over processes
            expected = self._loss_tokens_per_row * rows * (self.args.world_size if gathered else 1)
            return torch.tensor(expected, device=counted.device, dtype=torch.float32)

        def _get_eval_sampler(self, eval_dataset):
            # the order random-order runs evaluate in: a batch's loss is the mean over its own tokens and batches
            # weigh by rows, so batches sorted by length would change eval_loss itself (transformers sorts them)
            if self.args.train_sampling_strategy != "group_by_length" or not measurable(eval_dataset,
                                                                                     self.args.length_column_name):
                return super()._get_eval_sampler(eval_dataset)
            return torch.utils.data.SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None

    LengthGrouped.__name__ = LengthGrouped.__qualname__ = f"LengthGrouped{trainer_class.__name__}"
    return LengthGrouped


def length_chunks(lengths: list[int], max_chunks: int) -> list[list[int]]:
    """Rows (indices into `lengths`) in at most `max_chunks` groups of similar length, chosen to pad the fewest
    tokens: longest first, cut where the padded total (each group padded to its longest row) is smallest."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    widths = [lengths[i] for i in order]
    n = len(order)
    # cost[k][j]: fewest padded tokens for the first j rows in k groups; a group of rows i..j-1 costs (j - i) x row i
    cost = [[0] + [float("inf")] * n] + [[float("inf")] * (n + 1) for _ in range(max_chunks)]
    cut = [[0] * (n + 1) for _ in range(max_chunks + 1)]
    for k in range(1, max_chunks + 1):
        cost[k][0] = 0
        for j in range(1, n + 1):
            for i in range(j):
                c = cost[k - 1][i] + (j - i) * widths[i]
                if c < cost[k][j]:
                    cost[k][j], cut[k][j] = c, i
    k = min(range(1, max_chunks + 1), key=lambda k: (cost[k][n], k))
    groups, j = [], n
    while j > 0:
        i = cut[k][j]
        groups.append(order[i:j])
        j, k = i, k - 1
    return groups[::-1]


def _reassemble(outputs, parts, batch: int, width: int):
    """One output of the whole batch from its groups' outputs: per-row tensors scattered back to their rows,
    per-token ones (a group's columns, or one less: next-token fields) put back at the group's first column and
    padded with zeros to the batch's width, as the models leave padded and ignored positions; tuples (hidden states)
    field by field."""
    first = outputs[0]
    if isinstance(first, tuple):
        return tuple(_reassemble([o[k] for o in outputs], parts, batch, width) for k in range(len(first)))
    if not torch.is_tensor(first) or any(o.dim() == 0 or o.shape[0] != len(rows) for o, (rows, _, _) in
                                         zip(outputs, parts)):
        return None  # not per row (a cache, a statistic of the group): nothing of the whole batch's to give
    offsets = {o.shape[1] - (end - start) for o, (_, start, end) in zip(outputs, parts)} if first.dim() >= 2 \
        else {None}
    per_token = len(offsets) == 1 and next(iter(offsets)) in (0, -1)
    full = (batch, width + next(iter(offsets)), *first.shape[2:]) if per_token else (batch, *first.shape[1:])
    merged = first.new_zeros(full)
    for out, (rows, start, _) in zip(outputs, parts):
        if per_token:
            merged[rows, start:start + out.shape[1]] = out
        else:
            merged[rows] = out
    return merged


def row_spans(mask: torch.Tensor) -> tuple[list[int], list[int]] | None:
    """(first, one past the last) column of each row's tokens when every row's tokens are one run of columns
    (padding on the left, the right or both); else None."""
    width = mask.shape[1]
    columns = torch.arange(width, device=mask.device)
    real = mask.bool()
    starts = torch.where(real, columns, width).amin(1)  # `width` for a row without tokens
    ends = starts + real.sum(1)
    if not torch.equal(real, (columns >= starts[:, None]) & (columns < ends[:, None])):
        return None
    return starts.tolist(), ends.tolist()


def split_forward(model, max_chunks: int, min_saving: float = 0.1):
    """Make `model`'s forward run a padded batch as up to `max_chunks` groups of rows of similar length
    (`length_chunks`), each cut to the columns its own rows use, and return the output the whole batch would have
    given: the same logits, log-probs, scores, values and loss on every real token (up to float rounding), so the same
    gradients. Only padding goes: the small recipe's batches mix ~300-token tool rows with ~100-token text ones and pad
    all to ~300. One forward call of the wrapper is one of the model's, so DDP and the trainers see nothing else.
    Right-padded batches (sft, reward, dpo) split as they are; batches padded on the left too (PPO's prompts and
    replies) only with explicit `position_ids`, since the model's default positions count the left padding. A batch
    goes through whole when splitting saves under `min_saving` of its tokens, when a row's tokens are not one run of
    columns, and for generation (a cache) or MoE router outputs."""
    inner = model.forward
    if max_chunks < 2 or getattr(inner, "length_split", None):
        return model

    counts = {"passes": 0, "split": 0, "tokens": 0, "run": 0}  # what went through the model: `tokens_run`

    def tally(tokens: int, run: int) -> None:
        counts["passes"] += 1
        counts["split"] += run < tokens
        counts["tokens"] += tokens
        counts["run"] += run

    def whole(kwargs):
        tally(kwargs["attention_mask"].numel(), kwargs["attention_mask"].numel())
        return inner(**kwargs)

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        input_ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if (args or input_ids is None or mask is None or mask.dim() != 2 or kwargs.get("past_key_values") is not None
                or kwargs.get("use_cache") or kwargs.get("output_router_logits") or kwargs.get("inputs_embeds")
                is not None):
            return inner(*args, **kwargs)  # generation and other calls this does not split: not counted
        batch, width = mask.shape
        spans = row_spans(mask)
        if spans is None or (max(spans[0]) > 0 and kwargs.get("position_ids") is None):
            return whole(kwargs)
        starts, ends = spans
        lengths = [e - s for s, e in zip(starts, ends)]
        if min(lengths) == 0:
            return whole(kwargs)
        groups = length_chunks(lengths, max_chunks)
        bounds = [(min(starts[i] for i in group), max(ends[i] for i in group)) for group in groups]
        run = sum(len(g) * (e - s) for g, (s, e) in zip(groups, bounds))
        if len(groups) < 2 or len(set(bounds)) < len(bounds) or run > (1 - min_saving) * mask.numel():
            return whole(kwargs)
        parts = [(torch.tensor(group, device=mask.device), s, e) for group, (s, e) in zip(groups, bounds)]
        pieces = [{key: value[rows][:, s:e] if torch.is_tensor(value) and value.shape[:2] == (batch, width)
                   else value[rows] if torch.is_tensor(value) and value.dim() and value.shape[0] == batch
                   else value for key, value in kwargs.items()} for rows, s, e in parts]
        outputs = [inner(**piece) for piece in pieces]
        tally(mask.numel(), run)
        merged = type(outputs[0])() if hasattr(outputs[0], "keys") else None
        if merged is None:
            return _reassemble(outputs, parts, batch, width)
        for key in outputs[0].keys():
            values = [out[key] for out in outputs]
            if key == "loss":
                merged[key] = _combined_loss(values, outputs, pieces, kwargs)
            elif key == "aux_loss" or any(v is None for v in values):
                merged[key] = None
            else:
                merged[key] = _reassemble(values, parts, batch, width)
        return merged

    forward.length_split = max_chunks
    forward.counts = counts
    model.forward = forward
    return model


def tokens_run(model) -> str | None:
    """What `split_forward` saved on `model` so far, in words; None when its forward is not split."""
    counts = getattr(getattr(model, "forward", None), "counts", None)
    if not counts or not counts["tokens"]:
        return None
    return (f"{counts['split']} of {counts['passes']} forward passes split by length; "
            f"{counts['run'] / counts['tokens']:.0%} of their padded tokens went through the model")


def _combined_loss(losses, outputs, pieces, kwargs):
    """The whole batch's loss from its groups': divided by `num_items_in_batch` the groups' losses add up;
    otherwise each is a mean over its own items (label tokens, or rows for a score's labels), weighted here by
    their number."""
    if kwargs.get("num_items_in_batch") is not None:
        return sum(losses)
    counts = []
    for out, piece in zip(outputs, pieces):
        labels = piece.get("labels")
        if "label_mask" in out.keys() and out["label_mask"] is not None:
            counts.append(out["label_mask"].sum())
        elif torch.is_tensor(labels) and labels.dim() == 2:
            counts.append(labels[:, 1:].ne(-100).sum())  # a causal LM's loss: shifted labels, -100 ignored
        elif torch.is_tensor(labels):
            counts.append(torch.tensor(labels.shape[0], device=labels.device))
        else:
            return None
    return sum(loss * count for loss, count in zip(losses, counts)) / sum(counts).clamp(min=1)
