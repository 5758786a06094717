"""The image world and the text-to-image pipeline shared by the image stages (diffusion, diffusion_dpo).

The world, offline: scikit-learn's `load_digits` (1,797 handwritten digits, 8x8) drawn onto a small canvas under
properties the world controls and a program can measure:

    digit      0-9
    size       small (half the canvas) | large (three quarters)
    thickness  thin | thick (strokes dilated by one pixel)
    position   left | right (against the canvas edge; vertically centred)

Captions say them in one order, leaving out properties at random in training: "a large thin 7 on the left",
"a small 3", "a thick 9 on the right". Real images are split by index (every fifth held out: 360 images the judge
never trains on). Of the 80 full captions (10 digits x 8 property combinations), 20 are held out, two per digit
(`heldout_combos`): no training image carries them, so held-out captions are disjoint from training captions, as
the text world's held-out prompts are, and every property value still appears with every digit in training.

Dataset specs of the image stages: `images:digits` (the world above), or a local JSON Lines file / a folder (or its
train/ folder) with `metadata.jsonl` whose rows name an image file (`file_name`, relative to the file) and a `caption`
(`data/README.md`; pipeline/image_files.py reads them). The model: diffusers' `IFPipeline` layout (pixel space:
tokenizer, T5 text encoder, `UNet2DConditionModel`, scheduler), which plain
`DiffusionPipeline.from_pretrained(folder)` loads; or a diffusers text-to-image pipeline whose UNet reads the text
alone (SD 1.x / 2.x, IF: image_check.pipeline_problem) given as `init_from` (a VAE then moves training into its latent
space).
"""

from __future__ import annotations

import itertools
import json
from functools import lru_cache
from pathlib import Path

from pipeline.cli import PipelineError, first_line, typed_line

WORLD_SPEC = "images:digits"
PROPERTIES = {"size": ("small", "large"), "thickness": ("thin", "thick"), "position": ("left", "right")}
ATTR_COMBOS = list(itertools.product(*PROPERTIES.values()))  # 8 (size, thickness, position)
CAPTION_WORDS = ["a", "on", "the", *[str(d) for d in range(10)], *[w for v in PROPERTIES.values() for w in v]]
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
HELDOUT_PER_DIGIT = 2
MAX_TEXT_LENGTH = 77  # IFPipeline pads every prompt to 77 tokens; training does the same


# ---------------------------------------------------------------------------------------------- the world


def caption(digit: int, size=None, thickness=None, position=None) -> str:
    words = ["a", size, thickness, str(digit)]
    text = " ".join(w for w in words if w)
    return f"{text} on the {position}" if position else text


def parse_caption(text: str) -> dict | None:
    """The properties a caption asks for ({"digit": 7, "size": "large", ...}); None without exactly one digit."""
    words = str(text).lower().replace(",", " ").split()
    digits = [w for w in words if len(w) == 1 and w.isdigit()]
    if len(digits) != 1:
        return None
    out = {"digit": int(digits[0])}
    for prop, values in PROPERTIES.items():
        found = [v for v in values if v in words]
        if len(found) == 1:
            out[prop] = found[0]
    return out


def heldout_combos() -> set[tuple]:
    """(digit, size, thickness, position) of the held-out captions: two per digit, spread over the 8 combinations."""
    return {(d, *ATTR_COMBOS[(3 * d + k * 5) % len(ATTR_COMBOS)]) for d in range(10) for k in range(HELDOUT_PER_DIGIT)}


def heldout_captions() -> list[str]:
    return [caption(*c) for c in sorted(heldout_combos())]


def train_combos() -> list[tuple]:
    held = heldout_combos()
    return [(d, *a) for d in range(10) for a in ATTR_COMBOS if (d, *a) not in held]


@lru_cache(maxsize=1)
def _digits():
    import torch
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32) / 16.0, torch.tensor(d.target, dtype=torch.long)


def real_digits(split: str):
    """(images N x 8 x 8 in [0, 1], labels) of the real digits: `train` (4 of 5) or `heldout` (every fifth)."""
    import torch

    images, labels = _digits()
    idx = torch.arange(len(labels))
    keep = (idx % 5 == 0) if split == "heldout" else (idx % 5 != 0)
    return images[keep], labels[keep]


def render(base, size: str, thickness: str, position: str, resolution: int = 16):
    """Digits (N x 8 x 8 in [0, 1]) drawn on a resolution x resolution canvas: N x 1 x R x R in [0, 1]."""
    import torch
    import torch.nn.functional as F

    w = round(resolution * (0.75 if size == "large" else 0.5))
    img = F.interpolate(base[:, None], size=(w, w), mode="bilinear", align_corners=False)
    img = ((img - 0.3) * 2.0).clamp(0, 1)
    if thickness == "thick":
        img = F.max_pool2d(F.pad(img, (0, 1, 0, 1)), 2, stride=1)
    out = torch.zeros(len(base), 1, resolution, resolution)
    x0 = resolution - w if position == "right" else 0
    y0 = (resolution - w) // 2
    out[:, :, y0:y0 + w, x0:x0 + w] = img
    return out


def render_all(split: str, resolution: int = 16):
    """Every real digit of a split under every property combination: images [N, 8, 1, R, R], labels [N]."""
    import torch

    base, labels = real_digits(split)
    return torch.stack([render(base, *a, resolution=resolution) for a in ATTR_COMBOS], 1), labels


class WorldImages:
    """Training images of the world, drawn per batch: a real training digit under a training combination, captioned
    with each property left out with probability `property_dropout`."""

    def __init__(self, resolution: int, property_dropout: float):
        import torch

        self.images, self.labels = render_all("train", resolution)
        self.property_dropout = property_dropout
        allowed = torch.zeros(10, len(ATTR_COMBOS), dtype=torch.bool)
        for d, *a in train_combos():
            allowed[d, ATTR_COMBOS.index(tuple(a))] = True
        self.allowed = allowed
        self.size = len(self.labels)

    def sample(self, n: int, gen) -> tuple:
        import torch

        idx = torch.randint(0, len(self.labels), (n,), generator=gen)
        digits = self.labels[idx]
        # a training combination of each digit, uniformly among the digit's allowed ones
        weights = self.allowed[digits].float()
        combo = torch.multinomial(weights, 1, generator=gen)[:, 0]
        drop = torch.rand(n, len(PROPERTIES), generator=gen) < self.property_dropout
        captions = []
        for i in range(n):
            attrs = [None if drop[i, j] else v for j, v in enumerate(ATTR_COMBOS[combo[i]])]
            captions.append(caption(int(digits[i]), *attrs))
        return self.images[idx, combo] * 2 - 1, captions


def load_images(spec: str, resolution: int, channels: int, property_dropout: float = 0.0,
                max_rows: int | None = None, key: str = "dataset", **columns):
    """A training source for a dataset spec (see the module docstring); bad files and rows raise PipelineError.
    `columns`: image_column / caption_column of a metadata file; `max_rows`: its first rows only (--check); `key`:
    the recipe key that named the spec, for a spec that names nothing readable (with where it was set: source_of)."""
    if spec == WORLD_SPEC:
        return WorldImages(resolution, property_dropout) if channels == 1 else _Converted(
            WorldImages(16, property_dropout), resolution, channels)
    if spec.startswith("images:"):
        raise PipelineError(f"{key}: '{spec}': unknown image world (the world is {WORLD_SPEC})")
    from pipeline import image_files

    try:
        source = image_files.dataset_source(spec, WORLD_SPEC)
    except PipelineError as err:
        raise PipelineError(f"{key}: {err}") from None
    return image_files.read_image_rows(source, resolution, channels, max_rows=max_rows, **columns)


class _Converted:
    """The world resized / repeated to a pipeline's resolution and channels (fine-tuning an RGB pipeline)."""

    def __init__(self, source, resolution: int, channels: int):
        self.source, self.resolution, self.channels, self.size = source, resolution, channels, source.size

    def sample(self, n: int, gen) -> tuple:
        import torch.nn.functional as F

        images, captions = self.source.sample(n, gen)
        images = F.interpolate(images, size=(self.resolution,) * 2, mode="bilinear", align_corners=False)
        return images.repeat(1, self.channels, 1, 1), captions


# ---------------------------------------------------------------------------------------------- the model


STOP_WORDS = ("a", "an", "the", "on", "of")  # carry nothing in the world's captions; dropped by the tokenizer


def build_tokenizer(extra_captions=()):
    """A word-level tokenizer over the world's words (and those of any extra captions), saved and loaded as a
    transformers fast tokenizer: lower-cased, punctuation and STOP_WORDS removed, split on whitespace. No `</s>` is
    appended: every token of a caption is a word that says something ("a large thin 7 on the left" -> large, thin,
    7, left), and the empty caption of classifier-free guidance is all padding."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    norm = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(Regex(r"[^\w\s]"), " "),
                                 normalizers.Replace(Regex(r"\b(" + "|".join(STOP_WORDS) + r")\b"), " ")])
    words = [w for w in CAPTION_WORDS if w not in STOP_WORDS]
    for text in extra_captions:
        for w, _ in pre.pre_tokenize_str(norm.normalize_str(text)):
            if w not in words:
                words.append(w)
    vocab = {w: i for i, w in enumerate([*SPECIAL_TOKENS, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = norm
    tok.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=MAX_TEXT_LENGTH)


DEFAULT_UNET = dict(sample_size=16, in_channels=1, out_channels=2, layers_per_block=1, block_out_channels=[32, 64, 64],
                    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                    mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=64, attention_head_dim=8,
                    norm_num_groups=8, addition_embed_type="text", addition_embed_type_num_heads=4)
DEFAULT_TEXT_ENCODER = dict(d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4, dropout_rate=0.0)


def new_pipeline(cfg, resolution: int, extra_captions=()):
    """A new pixel-space pipeline from a DiffusionConfig's `unet` / `text_encoder` configs and DDPM schedule keys."""
    noise_config = {"num_train_timesteps": cfg.num_train_timesteps, "beta_schedule": cfg.beta_schedule,
                    "prediction_type": cfg.prediction_type, "variance_type": "fixed_small", "clip_sample": True}
    return build_pipeline({**cfg.unet, "sample_size": resolution}, cfg.text_encoder, noise_config,
                          extra_captions=extra_captions)


def build_pipeline(unet_config: dict, text_config: dict, scheduler_config: dict, extra_captions=()):
    """A new pixel-space IFPipeline: word-level tokenizer, T5 encoder and UNet built from configs. The UNet's output
    has twice the image channels (IF's layout: noise and variance); training and sampling use the noise half with a
    fixed variance.

    The text reaches the UNet through cross-attention at the 8x8 and 4x4 levels and the middle block (the digit's
    shape is read from there: README "Image models") and through IF's pooled-text embedding (`addition_embed_type:
    text`, added to the timestep embedding, as a class embedding would be). IF pads every prompt to
    77 tokens and the UNet sees all of them, so three things keep the caption's few words from drowning in padding
    (README "Image models" has the measurements): the pad token's embedding is zero and held there in training
    (`hold_pad_at_zero`), so each padded position of the T5 encoder's output is the caption's words seen through
    attention, never a constant; the pooled embedding's projections start without biases; and the final norm of
    that embedding has no trainable scale or shift (the model cannot turn the caption down to a constant while it
    does not yet use it)."""
    from diffusers import IFPipeline, UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel

    tokenizer = build_tokenizer(extra_captions)
    tcfg = {**DEFAULT_TEXT_ENCODER, **text_config}
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                           eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0, **tcfg))
    ucfg = {**DEFAULT_UNET, **unet_config}
    ucfg["cross_attention_dim"] = tcfg["d_model"]
    ucfg["out_channels"] = 2 * ucfg["in_channels"]
    try:
        unet = UNet2DConditionModel(**ucfg)
    except (TypeError, ValueError) as err:
        raise PipelineError(f"unet config: {first_line(err)}") from None
    hold_pad_at_zero(text_encoder, tokenizer.pad_token_id)
    pooled = getattr(unet, "add_embedding", None)
    if pooled is not None and hasattr(pooled, "pool"):  # TextTimeEmbedding
        import torch

        with torch.no_grad():
            for linear in (pooled.pool.k_proj, pooled.pool.q_proj, pooled.pool.v_proj, pooled.proj):
                linear.bias.zero_()
        pooled.norm2.requires_grad_(False)
    return IFPipeline(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet,
                      scheduler=make_scheduler("ddpm", scheduler_config),
                      safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)


def hold_pad_at_zero(text_encoder, pad_id: int) -> None:
    """Zero the pad token's embedding and its gradient, so training (AdamW without weight decay on it) keeps it 0."""
    import torch

    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[pad_id] = 0

    def no_pad_gradient(grad):
        grad = grad.clone()
        grad[pad_id] = 0
        return grad

    weight.register_hook(no_pad_gradient)


def make_scheduler(kind: str, config: dict):
    """diffusers schedulers: `ddpm` (training), `ddim`, `dpm` (DPM-Solver++ multistep) or `euler` for sampling."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    classes = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler,
               "euler": EulerDiscreteScheduler}
    if kind not in classes:
        raise PipelineError(f"sampler '{kind}': expected one of {', '.join(classes)}")
    return classes[kind].from_config(config)


def load_pipeline(path: str, revision: str | None = None, key: str | None = None):
    """A diffusers pipeline; `key`: the recipe key that named it, for messages (with where it was set: source_of)."""
    from diffusers import DiffusionPipeline

    from pipeline import hub

    online = hub.online_for(path)  # a hub id offline: the cache only, at once
    where = f"{key}: '{path}'" if key else f"'{path}'"
    try:
        pipe = DiffusionPipeline.from_pretrained(path, revision=revision)
    except (OSError, ValueError, EnvironmentError) as err:
        why = hub.load_failure(online, f"not a loadable diffusers pipeline ({typed_line(err, 160)})")
        raise PipelineError(f"{where}: {why}") from None
    from pipeline.image_tokens import cap_text_length

    cap_text_length(pipe, where)
    return pipe


def pipeline_shape(pipe) -> dict:
    """Resolution and channels of the images a pipeline makes, whether it works in a VAE's latent space, and what
    any image side it trains on must be a multiple of (the VAE's factor x the UNet's downsampling)."""
    unet, vae = pipe.unet, getattr(pipe, "vae", None)
    factor = vae_factor(vae.config if vae is not None else None)
    channels = vae.config.in_channels if vae is not None else unet.config.in_channels
    return {"resolution": unet.config.sample_size * factor, "channels": channels, "latent": vae is not None,
            "multiple": side_multiple(unet.config, factor)}


def vae_factor(vae_config) -> int:
    """How many pixels a side of one latent cell covers: 2 per downsampling of the VAE (1 without one)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1) if vae_config is not None else 1


def side_multiple(unet_config, factor: int) -> int:
    """What every image side a pipeline trains on must be a multiple of: the VAE's factor x the UNet's
    downsampling (one halving between consecutive blocks). The stages and --check ask this one function."""
    return factor * 2 ** (len(unet_config["block_out_channels"]) - 1)


def resolution_problem(resolution: int, multiple: int) -> str | None:
    """Why a pipeline whose image sides must be multiples of `multiple` (pipeline_shape) cannot train at
    `resolution`, or None. The stage and --check ask the same."""
    if resolution < 1 or resolution % multiple:
        return f"{resolution} is not a multiple of {multiple} (the pipeline's VAE factor x its UNet's downsampling)"
    return None


def trains_text_encoder(value: bool | None, pretrained: bool) -> bool:
    """diffusion.train_text_encoder; empty: a new model's trains with its UNet, a pretrained pipeline's stays as it
    is (as diffusers' train_text_to_image.py)."""
    return value if value is not None else not pretrained


def encode_text(pipe, text_encoder, captions: list[str], device):
    """Text embeddings the way the pipeline computes them at sampling time (IF: 77 tokens with attention mask)."""
    tok = pipe.tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt",
                         max_length=MAX_TEXT_LENGTH if pipe.__class__.__name__.startswith("IF")
                         else pipe.tokenizer.model_max_length)
    mask = tok.attention_mask.to(device) if pipe.__class__.__name__.startswith("IF") else None
    return text_encoder(tok.input_ids.to(device), attention_mask=mask)[0]


def generate(pipe, captions: list[str], *, steps: int, guidance: float, seed: int, batch_size: int = 256,
             desc: str = "drawing"):
    """Images for captions (N x C x R x R in [0, 1]), through the pipeline's own __call__ (what a user gets);
    a progress bar counts the batches."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    out = []
    for start in tqdm(range(0, len(captions), batch_size), desc=f"{desc} ({len(captions)} images)",
                      dynamic_ncols=True):
        chunk = captions[start:start + batch_size]
        gen = torch.Generator().manual_seed(seed + start)
        kw = {"clean_caption": False} if pipe.__class__.__name__.startswith("IF") else {}
        arr = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gen, output_type="np",
                   **kw).images
        out.append(torch.from_numpy(np.asarray(arr, dtype=np.float32)).permute(0, 3, 1, 2))
    return torch.cat(out)


def save_grid(path: Path, images, row_labels: list[str], per_row: int, scale: int = 3) -> None:
    """A PNG with one row of `per_row` samples per label (images N x C x R x R in [0, 1], grouped by row); in colour
    when the images have 3 channels."""
    import numpy as np
    from PIL import Image, ImageDraw

    n_rows = len(row_labels)
    res = images.shape[-1]
    cell = res * scale + 2
    label_w = 190
    rgb = images.shape[1] == 3
    mode, background, ink = ("RGB", (40, 40, 40), (230, 230, 230)) if rgb else ("L", 40, 230)
    canvas = Image.new(mode, (label_w + per_row * cell, n_rows * cell + 2), background)
    draw = ImageDraw.Draw(canvas)
    pixels = (images if rgb else images.mean(1, keepdim=True)).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    line_h = draw.textbbox((0, 0), "Ag")[3] + 1
    for r, label in enumerate(row_labels):
        lines = label_lines(draw, label, label_w - 8, max(1, (cell - 2) // line_h))
        for k, line in enumerate(lines):
            draw.text((4, r * cell + cell // 2 - 5 + (2 * k - len(lines) + 1) * line_h // 2), line, fill=ink)
        for c in range(per_row):
            i = r * per_row + c
            if i >= len(pixels):
                break
            tile = (pixels[i] * 255).astype(np.uint8)
            tile = Image.fromarray(tile if rgb else tile[..., 0], mode)
            canvas.paste(tile.resize((res * scale,) * 2, Image.NEAREST), (label_w + c * cell + 1, r * cell + 1))
    canvas.save(path)


def label_lines(draw, text: str, width: int, max_lines: int) -> list[str]:
    """`text` wrapped at spaces into lines of at most `width` pixels (a longer word stays whole), at most `max_lines`
    of them; a cut caption ends with '...'."""
    lines = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] += " ..."
    return lines or [""]


def world_json() -> dict:
    """What defines the image world, saved beside the model (world.json) for the stages that read it."""
    return {"spec": WORLD_SPEC, "properties": PROPERTIES, "heldout_captions": heldout_captions(),
            "train_captions": [caption(*c) for c in train_combos()], "heldout_real_images": "every fifth of "
            "sklearn load_digits by index (360)"}


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
