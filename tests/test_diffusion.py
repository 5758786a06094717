"""The image side: the digit world, the image judge, Diffusion-DPO's loss, and the diffusion / diffusion_dpo
stages through their real command lines on a tiny config (a 0.1M-parameter UNet, a few steps)."""

import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, launch_cli, run_cli, tiny_recipe
from pipeline import image_files, images
from pipeline.cli import PipelineError

TINY_UNET = {"block_out_channels": [8, 16], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "attention_head_dim": 4, "norm_num_groups": 4}
TINY_TEXT = {"d_model": 16, "d_ff": 32, "num_layers": 1, "num_heads": 2, "d_kv": 8}
TINY_DIFFUSION = {"max_steps": 6, "batch_size": 8, "logging_steps": 3, "save_steps": 0, "unet": TINY_UNET,
                  "text_encoder": TINY_TEXT, "judge_epochs": 4, "heldout_samples": 2, "sample_steps": 3,
                  "grid_columns": 2}
TINY_DPO = {"max_steps": 4, "batch_size": 4, "logging_steps": 2, "save_steps": 0, "candidates_per_caption": 2,
            "rounds": 2, "candidate_steps": 2, "heldout_samples": 2, "sample_steps": 3, "grid_columns": 2,
            "max_timestep": 500, "sft_weight": 1.0, "sft_images": "both", "winner_penalty": 1.0}


def image_recipe(directory, **sections):
    """The tiny recipe with only image stages (no pretrain / sft)."""
    return tiny_recipe(directory, pretrain=None, sft=None, **sections)


def tiny_vae():
    """A 16px RGB VAE with 4 latent channels at 8px, for tiny latent pipelines."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], latent_channels=4,
                         norm_num_groups=4, sample_size=16)


def counting_rows(ds, reads: list):
    """`ds` (a datasets.Dataset, and any copy made of it: cast_column's) noting in `reads` the index of each row it
    reads, by index or by iterating: what the readers read from a hub dataset's memory-mapped cache."""
    class Counting(type(ds)):
        def __getitem__(self, key):
            if isinstance(key, int):
                reads.append(key)
            return super().__getitem__(key)

        def __iter__(self):
            for i, row in enumerate(super().__iter__()):
                reads.append(i)
                yield row

    ds.__class__ = Counting
    return ds


# ---------------------------------------------------------------------------------------------- the world


def test_heldout_captions_are_disjoint_from_every_training_caption():
    held = set(images.heldout_captions())
    assert len(held) == 20 and all(images.parse_caption(c) is not None for c in held)
    # every caption a training image can carry: its full caption with any properties left out
    train = set()
    for d, *attrs in images.train_combos():
        for keep in range(8):
            train.add(images.caption(d, *[a if keep >> j & 1 else None for j, a in enumerate(attrs)]))
    assert not held & train
    # every digit and every property value is still trained on with every digit
    for d in range(10):
        combos = [c for c in images.train_combos() if c[0] == d]
        for j, values in enumerate(images.PROPERTIES.values()):
            assert {c[j + 1] for c in combos} == set(values)
    assert images.parse_caption("a large thin 7 on the left") == {"digit": 7, "size": "large", "thickness": "thin",
                                                                 "position": "left"}
    assert images.parse_caption("a large 7") == {"digit": 7, "size": "large"}
    assert images.parse_caption("a large cat") is None


def test_render_draws_the_properties_it_is_asked_for():
    base, _ = images.real_digits("heldout")
    base = base[:20]

    def ink_columns(img):  # columns holding ink, per image
        return (img[:, 0] > 0.2).any(1)

    large, small = images.render(base, "large", "thin", "left"), images.render(base, "small", "thin", "left")
    assert (ink_columns(large).sum(1) > ink_columns(small).sum(1)).float().mean() > 0.9
    right = images.render(base, "small", "thin", "right")
    cols = torch.arange(16).float()
    centre = lambda img: (img[:, 0].sum(1) * cols).sum(1) / img[:, 0].sum((1, 2))
    assert (centre(right) > 8).all() and (centre(small) < 8).all()
    thick = images.render(base, "small", "thick", "left")
    assert (thick.sum((1, 2, 3)) > small.sum((1, 2, 3))).all()
    assert large.shape == (20, 1, 16, 16) and 0 <= float(large.min()) and float(large.max()) <= 1


def test_tokenizer_is_word_level_without_stop_words_or_eos():
    tok = images.build_tokenizer(["a red 7"])
    ids = tok("a large 7", padding="max_length", max_length=6).input_ids
    assert tok.convert_ids_to_tokens(ids) == ["large", "7", "<pad>", "<pad>", "<pad>", "<pad>"]
    assert tok.convert_ids_to_tokens(tok("A RED 7").input_ids) == ["red", "7"]
    assert tok.convert_ids_to_tokens(tok("a large thin 7, on the left").input_ids) == ["large", "thin", "7", "left"]
    assert tok("").input_ids == []  # the empty caption of classifier-free guidance: padding only


def test_new_pipeline_keeps_padding_from_drowning_the_caption():
    """IF pads prompts to 77 tokens: the pad embedding stays zero in training, so padded positions carry the
    caption's words; the pooled-text embedding differs strongly between digits from the first step."""
    torch.manual_seed(0)
    pipe = images.build_pipeline({"block_out_channels": [8, 16], "down_block_types": ["DownBlock2D"] * 2,
                                  "up_block_types": ["UpBlock2D"] * 2, "norm_num_groups": 4,
                                  "attention_head_dim": 4}, {"d_model": 16, "d_ff": 32, "num_heads": 2, "d_kv": 8},
                                 {"num_train_timesteps": 10})
    pad = pipe.tokenizer.pad_token_id
    emb = images.encode_text(pipe, pipe.text_encoder, ["a 3", "a 7"], "cpu")
    assert float(emb.detach()[:, 1:].norm(dim=-1).min()) > 1  # padded positions are not empty: they see the caption
    pooled = pipe.unet.add_embedding(emb).detach()
    assert float((pooled[0] - pooled[1]).norm()) > 0.5 * float(pooled.norm(dim=-1).mean())
    emb.sum().backward()
    assert float(pipe.text_encoder.get_input_embeddings().weight.grad[pad].abs().max()) == 0.0


def test_eager_attention_computes_what_sdpa_does_and_other_names_are_refused():
    """`attn_implementation: eager` swaps every attention processor of the UNet for the bmm + softmax one: the same
    noise prediction as diffusers' SDPA default (it only runs faster in bf16 on a CPU)."""
    import copy

    from diffusers.models.attention_processor import AttnProcessor

    from pipeline import diffusion_config, diffusion_train

    torch.manual_seed(0)
    pipe = images.build_pipeline(TINY_UNET, TINY_TEXT, {"num_train_timesteps": 10})
    eager = copy.deepcopy(pipe.unet)
    diffusion_train.set_attention(eager, "eager")
    processors = eager.attn_processors
    assert processors and all(type(p) is AttnProcessor for p in processors.values())
    assert any(type(p) is not AttnProcessor for p in pipe.unet.attn_processors.values())  # the default: SDPA
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 7])
    emb = images.encode_text(pipe, pipe.text_encoder, ["a large 3", "a 7"], "cpu")
    with torch.no_grad():
        assert torch.allclose(pipe.unet(x, t, encoder_hidden_states=emb).sample,
                              eager(x, t, encoder_hidden_states=emb).sample, atol=1e-5)
    for config in (diffusion_config.DiffusionConfig, diffusion_config.DiffusionDPOConfig):
        with pytest.raises(ValueError, match="attn_implementation must be one of sdpa, eager, got 'flash'"):
            config(attn_implementation="flash")


@pytest.mark.parametrize("content, expected", [
    ("missing_caption", "line 1: missing caption"),
    ("unreadable", "cannot read image 'broken.png'"),
    ("bad_utf8", "metadata.jsonl: line 2: invalid UTF-8 (byte 0xff)"),
])
def test_bad_image_rows_raise_one_line_errors(tmp_path, content, expected):
    from PIL import Image

    Image.new("L", (16, 16)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    rows = {"missing_caption": {"file_name": "ok.png"},
            "unreadable": {"file_name": "broken.png", "caption": "a 7"},
            "bad_utf8": {"file_name": "ok.png", "caption": "a 7"}}[content]
    (tmp_path / "metadata.jsonl").write_bytes(json.dumps(rows).encode() + b"\n"
                                              + (b'{"file_name": "ok.png", "caption": "a \xff"}\n'
                                                 if content == "bad_utf8" else b""))
    with pytest.raises(PipelineError) as err:
        images.load_images(str(tmp_path), 16, 1)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_local_image_folder_loads_in_model_range(tmp_path):
    from PIL import Image

    Image.new("L", (16, 16), 255).save(tmp_path / "white.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "white.png", "caption": "a 1"}) + "\n")
    source = images.load_images(str(tmp_path), 16, 1)
    x, caps = source.sample(3, torch.Generator().manual_seed(0))
    assert x.shape == (3, 1, 16, 16) and float(x.min()) == 1.0 and caps == ["a 1"] * 3


def test_images_of_other_sizes_are_resized_and_centre_cropped(tmp_path):
    # they were refused ("is 20x12, expected 16x16"); diffusers' scripts resize the shorter side and crop
    import numpy as np
    from PIL import Image

    wide = np.zeros((16, 32), dtype=np.uint8)
    wide[:, 8:24] = 255  # white in the middle half: all that the centre crop keeps
    Image.fromarray(wide).save(tmp_path / "wide.png")
    tall = np.zeros((80, 32), dtype=np.uint8)
    tall[20:60] = 255
    Image.fromarray(tall).save(tmp_path / "tall.png")
    Image.new("L", (7, 9), 255).save(tmp_path / "tiny.png")
    rows = [{"file_name": n, "caption": "a 7"} for n in ("wide.png", "tall.png", "tiny.png")]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = images.load_images(str(tmp_path), 16, 1)
    assert source.resized == 3
    for file in source.files:
        x = image_files.decode(file, 1, 16)
        assert x.shape == (1, 16, 16) and float(x.min()) > 0.95, file.name
    x, _ = source.sample(5, torch.Generator().manual_seed(0))
    assert x.shape == (5, 1, 16, 16)


def test_metadata_as_csv_or_parquet_with_named_columns(tmp_path):
    # only metadata.jsonl with file_name/image and caption/text was read: diffusers' --image_column /
    # --caption_column (e.g. `image` + `prompt`) and imagefolder's metadata.csv / .parquet stopped the stage
    import pandas as pd
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    Image.new("L", (16, 16), 255).save(tmp_path / "imgs" / "a.png")
    pd.DataFrame({"image": ["imgs/a.png"], "prompt": ["a 4"]}).to_parquet(tmp_path / "metadata.parquet")
    source = images.load_images(str(tmp_path), 16, 1, image_column="image", caption_column="prompt")
    assert source.captions == ["a 4"] and list(source.files) == [tmp_path / "imgs" / "a.png"]
    with pytest.raises(PipelineError, match=r"metadata.parquet: row 1: no column 'caption' \(diffusion.caption_column;"
                                            r" the row has 'image', 'prompt'\)"):
        images.load_images(str(tmp_path), 16, 1, caption_column="caption")
    with pytest.raises(PipelineError, match=r"row 1: missing caption \('caption' \(or 'text'\): a string"):
        images.load_images(str(tmp_path / "metadata.parquet"), 16, 1)
    (tmp_path / "metadata.parquet").unlink()
    (tmp_path / "metadata.csv").write_text("file_name,text\nimgs/a.png,a 5\n")
    assert images.load_images(str(tmp_path), 16, 1).captions == ["a 5"]
    # through the stage's keys
    data = tmp_path / "data"
    data.mkdir()
    Image.new("L", (16, 16), 255).save(data / "a.png")
    (data / "metadata.jsonl").write_text(json.dumps({"img": "a.png", "prompt": "a 4"}) + "\n")
    recipe = image_recipe(tmp_path, diffusion={**TINY_DIFFUSION, "max_steps": 1, "judge_epochs": 0,
                                               "dataset": str(data), "image_column": "img",
                                               "caption_column": "prompt"})
    proc = run_cli(["pipeline/diffusion.py", recipe], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 training images" in proc.stdout + proc.stderr


def test_replacing_an_image_named_by_a_metadata_file_reruns_the_stage(tmp_path):
    # with `dataset` naming the metadata file, only that file was fingerprinted: images replaced under the same
    # names left the stage "up to date"
    import os

    from PIL import Image

    from pipeline import runs
    from pipeline.recipe import load_recipe

    Image.new("L", (16, 16), 0).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "caption": "a 1"}) + "\n")
    recipe = load_recipe(image_recipe(tmp_path, diffusion={**TINY_DIFFUSION,
                                                           "dataset": str(tmp_path / "metadata.jsonl")}))

    def fingerprint():
        return runs.stage_inputs(recipe, "diffusion", must_exist=False)["data"]["dataset"]["fingerprint"]

    before = fingerprint()
    assert fingerprint() == before
    Image.new("L", (16, 16), 255).save(tmp_path / "a.png")
    os.utime(tmp_path / "a.png", ns=(1, 1))
    assert fingerprint() != before


def test_editing_the_heldout_captions_or_the_dpo_judge_changes_the_stage_inputs(tmp_path):
    # neither was fingerprinted: a rewritten captions file or a retrained judge left the stages "up to date" with
    # the figures of the old ones
    from pipeline import runs
    from pipeline.recipe import load_recipe

    captions, judge = tmp_path / "held.jsonl", tmp_path / "judge"
    captions.write_text(json.dumps({"caption": "a large 7"}) + "\n")
    judge.mkdir()
    (judge / "config.json").write_text("{}")
    recipe = load_recipe(image_recipe(tmp_path, diffusion={**TINY_DIFFUSION, "heldout_captions": str(captions)},
                                      diffusion_dpo={**TINY_DPO, "judge": str(judge)}))

    def inputs():
        return runs.hash_obj([runs.stage_inputs(recipe, s, must_exist=False) for s in ("diffusion", "diffusion_dpo")])

    before = inputs()
    assert inputs() == before
    captions.write_text(json.dumps({"caption": "a small 3 on the left"}) + "\n")
    after_captions = inputs()
    assert after_captions != before
    (judge / "config.json").write_text('{"retrained": true}')
    assert inputs() != after_captions
    # the world's captions (the default) add nothing: runs finished before this change stay up to date
    world = load_recipe(image_recipe(tmp_path, diffusion=TINY_DIFFUSION, diffusion_dpo=TINY_DPO))
    assert all("heldout_captions" not in runs.stage_inputs(world, s, must_exist=False)["data"]
               for s in ("diffusion", "diffusion_dpo"))


def test_a_new_rgb_model_trains_on_rgb_images(tmp_path):
    # unet.in_channels: 3 built an RGB UNet but fed it grey images: a traceback in the first step, a .partial left
    from diffusers import DiffusionPipeline
    from PIL import Image

    (tmp_path / "data").mkdir()
    Image.new("RGB", (16, 16), (250, 0, 0)).save(tmp_path / "data" / "red.png")
    (tmp_path / "data" / "metadata.jsonl").write_text(json.dumps({"file_name": "red.png", "text": "a red 1"}) + "\n")
    recipe = image_recipe(tmp_path, diffusion={**TINY_DIFFUSION, "max_steps": 1, "judge_epochs": 0,
                                               "dataset": str(tmp_path / "data"),
                                               "unet": {**TINY_UNET, "in_channels": 3}})
    proc = run_cli(["pipeline/diffusion.py", recipe], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "16px x 3, 1 training images" in proc.stdout + proc.stderr
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "runs/tiny/diffusion")
    assert pipe("a red 1", num_inference_steps=2, output_type="np").images.shape == (1, 16, 16, 3)


def test_own_images_train_no_digit_judge_unless_asked(tmp_path):
    # judge_epochs defaulted to 24 for any dataset: a model of your own images trained the digit judge and was
    # scored on the digit world's held-out captions (minutes of drawing for meaningless accuracies)
    from pipeline.recipe import load_recipe

    def judge_epochs(**section):
        return load_recipe(image_recipe(tmp_path, diffusion=section)).keys("diffusion").judge_epochs

    assert judge_epochs() == 24 and judge_epochs(dataset="images:digits") == 24
    assert judge_epochs(dataset="my/metadata.jsonl") == 0
    assert judge_epochs(dataset="my/metadata.jsonl", judge_epochs=3) == 3


def test_a_list_of_captions_gives_one_per_draw(tmp_path):
    # diffusers' scripts take a list of captions per image (one drawn per step); here it was "missing caption"
    from PIL import Image

    Image.new("L", (16, 16), 255).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": ["a 1", " a large 1 "]}) + "\n")
    source = images.load_images(str(tmp_path), 16, 1)
    _, caps = source.sample(40, torch.Generator().manual_seed(0))
    assert set(caps) == {"a 1", "a large 1"} and source.texts == ["a 1", "a large 1"]
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": ["a 1", None]}) + "\n")
    with pytest.raises(PipelineError, match="line 1: missing caption"):
        images.load_images(str(tmp_path), 16, 1)


def test_an_empty_caption_trains_as_the_empty_prompt(tmp_path):
    """diffusers' train_text_to_image.py takes an empty caption (the image trains unconditionally); here it was
    "missing caption". It is the empty prompt: the loss equals that of a captioned image whose caption is dropped."""
    from types import SimpleNamespace

    from PIL import Image

    from pipeline import diffusion_config, diffusion_train

    Image.new("L", (16, 16), 255).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "caption": " "}) + "\n")
    empty = images.load_images(str(tmp_path), 16, 1)
    assert empty.captions == [""] and empty.sample(3, torch.Generator().manual_seed(0))[1] == ["", "", ""]
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "caption": "a large 7"}) + "\n")
    captioned = images.load_images(str(tmp_path), 16, 1)
    torch.manual_seed(0)
    pipe = images.build_pipeline(TINY_UNET, TINY_TEXT, {"num_train_timesteps": 10})

    def loss(source, dropout):
        cfg = SimpleNamespace(batch_size=2, caption_dropout=dropout,  # 1: every caption dropped (the config's < 1)
                              snr_gamma=diffusion_config.DiffusionConfig().snr_gamma, random_flip=False)
        return diffusion_train.text_to_image_loss(pipe, pipe.unet, pipe.text_encoder, pipe.scheduler, source, cfg,
                                                  torch.Generator().manual_seed(1), "cpu")

    with torch.no_grad():
        assert loss(empty, 0.0) == loss(captioned, 1.0) != loss(captioned, 0.0)
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "caption": None}) + "\n")
    with pytest.raises(PipelineError, match="line 1: missing caption"):  # no caption at all is still an error
        images.load_images(str(tmp_path), 16, 1)


def test_image_modes_decode_as_they_look_and_truncated_files_fail_at_the_start(tmp_path):
    # 16-bit PNGs came out nearly all white (PIL's convert clips them) and transparent pixels took the colour hidden
    # under them; a JPEG cut short passed the start's verify() and crashed training with a traceback
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((16, 16), 32896, dtype=np.uint16)).save(tmp_path / "deep.png")  # 16-bit grey, half
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)  # black, fully transparent: white as shown on a page
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    Image.fromarray(np.full((16, 16, 3), 128, dtype=np.uint8)).convert("P").save(tmp_path / "palette.png")
    rows = [{"file_name": n, "caption": "a 1"} for n in ("deep.png", "clear.png", "palette.png")]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for channels in (1, 3):
        source = images.load_images(str(tmp_path), 16, channels)
        x, _ = source.sample(4, torch.Generator().manual_seed(0))
        assert x.shape == (4, channels, 16, 16) and float(x.min()) >= -1 and float(x.max()) <= 1
        decoded = {f.name: image_files.decode(f, channels, 16) for f in source.files}
        assert decoded["deep.png"].shape == (channels, 16, 16)
        assert abs(float(decoded["deep.png"].mean()) - 0.5) < 0.01
        assert float(decoded["clear.png"].min()) == 1.0
        assert abs(float(decoded["palette.png"].mean()) - 128 / 255) < 0.01
    Image.fromarray(np.full((16, 16, 3), 90, dtype=np.uint8)).save(tmp_path / "cut.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "cut.jpg").read_bytes()[:-40])
    with open(tmp_path / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "cut.jpg", "caption": "a 2"}) + "\n")
    with pytest.raises(PipelineError, match=r"metadata.jsonl: line 4: cannot read image 'cut.jpg' \(OSError"):
        images.load_images(str(tmp_path), 16, 3)
    # a file removed after the start: one line naming it, not a traceback
    (tmp_path / "metadata.jsonl").write_text(json.dumps(rows[0]) + "\n")
    source = images.load_images(str(tmp_path), 16, 1)
    (tmp_path / "deep.png").unlink()
    with pytest.raises(PipelineError, match=r"metadata.jsonl: line 1: cannot read image 'deep.png'"):
        source.sample(2, torch.Generator().manual_seed(0))


def test_32_bit_images_are_refused_in_one_line_and_16_bit_ones_still_read(tmp_path):
    # a 32-bit integer image (mode I) was divided by 257 as if 16-bit; a float one (mode F) went through convert("L")
    # unscaled: both trained silently as other images
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((16, 16), 0.5, dtype=np.float32)).save(tmp_path / "float.tiff")
    Image.fromarray(np.full((16, 16), 70000, dtype=np.int32)).save(tmp_path / "int32.tiff")
    Image.fromarray(np.full((16, 16), 32896, dtype=np.int32)).save(tmp_path / "int16.tiff")  # mode I, 16-bit values
    Image.fromarray(np.full((16, 16), 32896, dtype=np.uint16)).save(tmp_path / "deep.png")  # mode I;16
    for name, expected in (("float.tiff", r"mode F"), ("int32.tiff", r"32-bit values 70000 to 70000 \(mode I\)")):
        (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": name, "caption": "a 1"}) + "\n")
        with pytest.raises(PipelineError, match=rf"metadata.jsonl: line 1: cannot read image '{name}' .*{expected}"):
            images.load_images(str(tmp_path), 16, 1)
    rows = [{"file_name": n, "caption": "a 1"} for n in ("int16.tiff", "deep.png")]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = images.load_images(str(tmp_path), 16, 1)
    assert [abs(float(image_files.decode(f, 1, 16).mean()) - 0.5) < 0.01 for f in source.files] == [True, True]


def test_images_read_as_diffusers_reads_them_upright_and_huge_ones_stop_in_one_line(tmp_path, monkeypatch):
    """A phone photo's EXIF rotation was ignored (it trained sideways; datasets' Image feature turns it upright); a
    16-bit grey PNG's transparent value came out black; an image over PIL's pixel limit was a traceback."""
    import numpy as np
    from PIL import Image

    stored = np.zeros((4, 8, 3), dtype=np.uint8)  # 8 wide, 4 high: left half red, right half blue
    stored[:, :4, 0], stored[:, 4:, 2] = 255, 255
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise to view: upright it is 4 wide, red on top
    Image.fromarray(stored).save(tmp_path / "phone.png", exif=exif)
    upright = image_files.decode(tmp_path / "phone.png", 3, 4)  # 4 x 8 upright, centre-cropped to 4 x 4
    assert upright[0, :2].min() == 1 and upright[2, :2].max() == 0  # the top rows red, no blue
    assert upright[2, 2:].min() == 1 and upright[0, 2:].max() == 0  # the bottom rows blue
    Image.fromarray(np.zeros((4, 4), dtype=np.uint16)).save(tmp_path / "deep.png", transparency=0)
    assert float(image_files.decode(tmp_path / "deep.png", 1, 4).min()) == 1.0  # transparent: white on a page
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "phone.png", "caption": "a 7"}) + "\n")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 8)  # 32 pixels: over twice the limit, PIL's bomb error
    with pytest.raises(PipelineError, match=r"metadata.jsonl: line 1: cannot read image 'phone.png' "
                                            r"\(DecompressionBombError"):
        images.load_images(str(tmp_path), 4, 3)


def test_diffusers_metadata_layouts_read_as_its_training_script_reads_them(tmp_path):
    """`image_column: image` (train_text_to_image.py's default) on a metadata file's `file_name` column, which
    datasets' imagefolder shows as `image`, was refused; a metadata.csv's captions "" (the empty prompt), "7" and
    "NA" were read by pandas as null, a number and null: "missing caption"."""
    from PIL import Image

    from pipeline.image_eval import file_part

    for name in ("a", "b", "c"):
        Image.new("L", (8, 8), 255).save(tmp_path / f"{name}.png")
    (tmp_path / "metadata.csv").write_text('file_name,text\na.png,""\nb.png,7\nc.png,NA\n')
    source = images.load_images(str(tmp_path), 8, 1, image_column="image", caption_column="text")
    assert source.captions == ["", "7", "NA"] and [f.name for f in source.files] == ["a.png", "b.png", "c.png"]
    # a held-out caption becomes a file name: a / in it made save_grid fail after training
    assert "/" not in file_part("a large 7 w/ thick strokes") and file_part("a large 7") == "a_large_7"
    assert len(file_part("a 7 " * 100)) <= 80


# ---------------------------------------------------------------------------------------------- the judge


@pytest.fixture(scope="module")
def judge():
    from pipeline.image_judge import train_judge

    model, metrics = train_judge(0, epochs=8, log=lambda s: None)
    return model, metrics


def test_judge_reads_real_heldout_digits_and_hand_made_images(judge, tmp_path):
    from pipeline.image_judge import ImageJudge

    model, metrics = judge
    acc = metrics["judge_heldout_accuracy"]
    assert metrics["judge_heldout_images"] == 360 * 8
    assert acc["digit"] > 0.85 and acc["size"] > 0.95 and acc["position"] > 0.95 and acc["thickness"] > 0.9
    # hand-made: a vertical bar (a "1") in the middle of the world's small box on the left (columns 0-7, rows
    # 4-11), and of its large box on the right (columns 4-15, rows 2-13)
    left = torch.zeros(1, 1, 16, 16)
    left[0, 0, 4:12, 3:5] = 1.0
    right = torch.zeros(1, 1, 16, 16)
    right[0, 0, 2:14, 9:11] = 1.0
    read = model.predict(torch.cat([left, right]))
    assert read[0]["position"] == "left" and read[1]["position"] == "right"
    assert read[0]["size"] == "small" and read[1]["size"] == "large"
    assert read[0]["digit"] == 1 and read[1]["digit"] == 1
    probs = model.read(torch.cat([left, right]))
    assert torch.allclose(probs["digit"].sum(-1), torch.ones(2)) and probs["size"].shape == (2, 2)
    # saved as safetensors + JSON; loads to the same readings; RGB and larger images are converted
    model.save(tmp_path / "judge")
    assert sorted(p.name for p in (tmp_path / "judge").iterdir()) == ["config.json", "model.safetensors"]
    again = ImageJudge.load(tmp_path / "judge")
    assert torch.allclose(again.read(left)["digit"], probs["digit"][:1])
    rgb32 = torch.nn.functional.interpolate(right, size=(32, 32), mode="nearest").repeat(1, 3, 1, 1)
    assert again.predict(rgb32)[0]["position"] == "right"


def test_annotator_prefers_the_matching_image_and_flips_at_the_noise_rate():
    import random

    from pipeline.image_judge import annotate_pairs, matches

    want = {"digit": 7, "size": "large"}
    good = {"match": matches({"digit": 7, "size": "large"}, want)}
    half = {"match": matches({"digit": 7, "size": "small"}, want)}
    bad = {"match": matches({"digit": 1, "size": "large"}, want)}
    same = {"match": matches({"digit": 7, "size": "large"}, want)}
    pairs = annotate_pairs([good, half, bad, same], [0, 1, 2, 3], 0.0, random.Random(0))
    assert (0, 1, True) in pairs and (0, 2, True) in pairs and (1, 2, True) in pairs  # digit first
    assert not any({i, j} == {0, 3} for i, j, _ in pairs)  # equal scores: no pair
    # digit_only keeps the pairs where exactly one image shows the caption's digit
    digit_pairs = annotate_pairs([good, half, bad, same], [0, 1, 2, 3], 0.0, random.Random(0), digit_only=True)
    assert sorted(digit_pairs) == [(0, 2, True), (1, 2, True), (3, 2, True)]
    rng = random.Random(0)
    flipped = [not annotate_pairs([good, bad], [0, 1], 0.3, rng)[0][2] for _ in range(2000)]
    assert abs(sum(flipped) / 2000 - 0.3) < 0.03


# ---------------------------------------------------------------------------------------------- Diffusion-DPO


def test_diffusion_dpo_loss_against_a_worked_example():
    from pipeline.diffusion_train import diffusion_dpo_loss

    target = torch.zeros(2, 1, 1, 2)
    # per-sample mean squared errors: model on the winner 1.0, on the loser 0.5; reference 2.0 and 0.25
    model = torch.tensor([[1.0, 1.0], [0.5 ** 0.5, 0.5 ** 0.5]]).reshape(2, 1, 1, 2)
    ref = torch.tensor([[2.0, 0.0], [0.5 ** 0.5, 0.0]]).reshape(2, 1, 1, 2)
    loss, stats = diffusion_dpo_loss(model, ref, target, beta=2.0)
    # inside = -beta/2 * ((1.0 - 2.0) - (0.5 - 0.25)) = -1 * (-1.25) = 1.25; loss = log(1 + e^-1.25)
    assert math.isclose(float(loss), math.log(1 + math.exp(-1.25)), rel_tol=1e-6)
    assert stats["implicit_acc"] == 1.0 and math.isclose(stats["margin"], 1.25, rel_tol=1e-6)
    # the model equal to the reference: log 2, whatever beta
    loss0, _ = diffusion_dpo_loss(ref, ref, target, beta=5000.0)
    assert math.isclose(float(loss0), math.log(2), rel_tol=1e-6)
    # the gradient lowers the winner's error and raises the loser's
    pred = model.clone().requires_grad_(True)
    diffusion_dpo_loss(pred, ref, target, beta=2.0)[0].backward()
    assert (pred.grad[0] * pred[0].detach()).sum() > 0 and (pred.grad[1] * pred[1].detach()).sum() < 0
    assert math.isclose(stats["winner_change"], -1.0, rel_tol=1e-6)
    assert math.isclose(stats["loser_change"], 0.25, rel_tol=1e-6)
    # DPO-Positive: the winner's error fell (1.0 < 2.0), so the penalty is 0 and the loss unchanged
    assert math.isclose(float(diffusion_dpo_loss(model, ref, target, beta=2.0, winner_penalty=10.0)[0]), float(loss))
    # swap the reference's errors (winner 0.5 -> model 1.0: +0.5; loser 1.0 -> model 0.5: -0.5): inside =
    # -1 * (0.5 - (-0.5) + 3 * 0.5) = -2.5 with lambda 3, against -1.0 without
    swapped_ref = torch.tensor([[0.5 ** 0.5, 0.5 ** 0.5], [1.0, 1.0]]).reshape(2, 1, 1, 2)
    plain, _ = diffusion_dpo_loss(model, swapped_ref, target, beta=2.0)
    positive, stats = diffusion_dpo_loss(model, swapped_ref, target, beta=2.0, winner_penalty=3.0)
    assert math.isclose(float(plain), math.log(1 + math.exp(1.0)), rel_tol=1e-6)
    assert math.isclose(float(positive), math.log(1 + math.exp(2.5)), rel_tol=1e-6)
    assert math.isclose(stats["margin"], -2.5, rel_tol=1e-6)


def test_diffusion_dpo_pairs_share_noise_and_timestep_below_max_timestep():
    from diffusers import DDPMScheduler

    from pipeline.diffusion_config import DiffusionDPOConfig
    from pipeline.diffusion_train import noise_pairs

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    x = torch.randn(2 * 64, 1, 4, 4)
    noisy, noise, t = noise_pairs(scheduler, x, torch.Generator().manual_seed(0), max_timestep=500)
    assert t.max() < 500 and torch.equal(t[:64], t[64:]) and torch.equal(noise[:64], noise[64:])
    assert torch.allclose(noisy, scheduler.add_noise(x, noise, t))
    _, _, every = noise_pairs(scheduler, x, torch.Generator().manual_seed(0))  # empty: the whole schedule
    assert every.max() >= 500 and every.max() < 1000
    for bad in ({"sft_images": "losers"}, {"pair_filter": "size"}, {"max_timestep": 0}, {"winner_penalty": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            DiffusionDPOConfig(**bad)


# ---------------------------------------------------------------------------------------------- the stages


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("images")
    small = {"mixed_precision": "bf16", "attn_implementation": "eager"}  # as recipes/small.yaml trains diffusion
    recipe = image_recipe(work, diffusion={**TINY_DIFFUSION, **small}, diffusion_dpo=TINY_DPO)
    proc = run_cli(["pipeline/run.py", recipe], cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, recipe, proc


def test_diffusion_and_dpo_stages_write_loadable_pipelines_and_reports(image_run):
    from diffusers import DiffusionPipeline
    from PIL import Image

    work, _, proc = image_run
    run_dir = work / "runs" / "tiny"
    assert sorted(p.name for p in run_dir.iterdir()) == ["cost.md", "diffusion", "diffusion_dpo"]
    for stage in ("diffusion", "diffusion_dpo"):
        out = run_dir / stage
        files = [p for p in out.rglob("*") if p.is_file()]
        assert not [p for p in files if p.suffix in (".bin", ".pkl", ".pt", ".ckpt")]
        assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
        assert (out / "judge" / "model.safetensors").is_file() and (out / "report.md").is_file()
        assert Image.open(out / "grid.png").size[1] == 20 * (16 * 3 + 2) + 2  # a row per held-out caption
        assert len(list((out / "samples" / "model").glob("*.png"))) == 20
        metrics = json.loads((out / "metrics.json").read_text())
        for m in ("digit", "size", "thickness", "position", "all"):
            ci = metrics["heldout"]["accuracy"][m]
            assert ci["n"] == 40 and ci["ci"][0] <= ci["mean"] <= ci["ci"][1]
        assert metrics["heldout"]["diversity"] > 0
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["stage"] == stage and manifest["config"]["max_steps"] in (6, 4)
    metrics = json.loads((run_dir / "diffusion" / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["judge_heldout_images"] == 2880 and metrics["real_diversity"] > 0
    dpo = json.loads((run_dir / "diffusion_dpo" / "metrics.json").read_text())
    assert dpo["pairs"] > 0 and set(dpo["gain"]) == {"digit", "size", "thickness", "position", "all"}
    # two online rounds, each drawn for the 60 training captions; their caches are gone from the finished folder
    assert [r["round"] for r in dpo["rounds"]] == [1, 2] and all(r["candidates"] == 120 for r in dpo["rounds"])
    assert all(r["sampler_steps"] == 2 for r in dpo["rounds"])  # candidate_steps, not the evaluation's 3
    assert dpo["pairs"] == sum(r["pairs"] for r in dpo["rounds"])
    assert not list((run_dir / "diffusion_dpo").glob("pairs-*"))
    assert json.loads((run_dir / "diffusion_dpo" / "manifest.json").read_text())["inputs"]["checkpoints"][
        "init_from"]["ref"] == "diffusion"
    # the stage folders are plain diffusers pipelines: a prompt string in, an image out
    pipe = DiffusionPipeline.from_pretrained(run_dir / "diffusion")
    assert type(pipe).__name__ == "IFPipeline" and type(pipe.scheduler).__name__ == "DDIMScheduler"
    image = pipe("a large 7", num_inference_steps=3).images[0]
    assert isinstance(image, Image.Image) and image.size == (16, 16)
    # same seed, same image; the DPO stage changed the weights
    a = pipe("a small 3", num_inference_steps=3, generator=torch.Generator().manual_seed(1), output_type="np").images
    b = pipe("a small 3", num_inference_steps=3, generator=torch.Generator().manual_seed(1), output_type="np").images
    assert (a == b).all()
    tuned = DiffusionPipeline.from_pretrained(run_dir / "diffusion_dpo")
    assert any(not torch.equal(p, q) for p, q in zip(pipe.unet.parameters(), tuned.unet.parameters()))
    # the runner skips both when nothing changed
    plan = run_cli(["pipeline/run.py", work / "recipe.yaml", "--dry-run"], cwd=work)
    assert "diffusion  skip" in plan.stdout and "diffusion_dpo skip" in plan.stdout


def test_diffusion_dpo_takes_its_start_figures_from_the_diffusion_stages_own_evaluation(image_run, tmp_path):
    """The start model is the diffusion stage's, which that stage drew and its judge read with the same held-out
    captions, seeds and sampler steps: diffusion_dpo reads those readings instead of drawing them again (half its
    held-out evaluation), and they are what drawing again gives."""
    import shutil

    work, _, _ = image_run
    diffusion, dpo = work / "runs/tiny/diffusion", work / "runs/tiny/diffusion_dpo"
    said = "held-out captions, start: diffusion's own evaluation"
    assert said in (dpo / "log.txt").read_text()
    ours, theirs = (json.loads((d / "metrics.json").read_text()) for d in (dpo, diffusion))
    assert ours["start"] == theirs["heldout"]
    assert ours["start_digit_accuracy"] == theirs["heldout_digit_accuracy"]
    for copied, source in (("samples/start/readings.jsonl", "samples/model/readings.jsonl"),
                           ("grid_start.png", "grid.png")):
        assert (dpo / copied).read_bytes() == (diffusion / source).read_bytes()
    assert len(list((dpo / "samples/start").glob("*.png"))) == 20
    # only the very settings and judge that drew and read them
    from pipeline import image_eval

    same = {"samples": 2, "steps": 3, "guidance": 4.0, "seed": 0, "columns": 2}  # TINY_DIFFUSION, defaults
    heldout = images.heldout_captions()
    assert image_eval.recorded(diffusion, diffusion / "judge", heldout, tmp_path, name="start", **same)
    for other in ({"steps": 4}, {"samples": 1}, {"seed": 1}, {"guidance": 1.0}):
        assert image_eval.recorded(diffusion, diffusion / "judge", heldout, tmp_path, name="x", **{**same, **other}) \
            is None
    assert image_eval.recorded(diffusion, tmp_path / "judge", heldout, tmp_path, name="x", **same) is None
    assert image_eval.recorded(diffusion, diffusion / "judge", heldout[:-1], tmp_path, name="x", **same) is None
    assert not (tmp_path / "samples/x").exists()
    # a start folder without the record (another judge, other settings, or written before it existed): drawn again,
    # to the same figures
    start = tmp_path / "diffusion"
    shutil.copytree(diffusion, start)
    (start / "samples/model/evaluation.json").unlink()
    recipe = image_recipe(tmp_path, diffusion_dpo={**TINY_DPO, "init_from": str(start)})
    again = run_cli(["pipeline/diffusion_dpo.py", recipe], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert said not in again.stdout + again.stderr
    redrawn = json.loads((tmp_path / "runs/tiny/diffusion_dpo/metrics.json").read_text())
    assert redrawn["start"] == ours["start"]


def _unet_weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def test_killed_diffusion_stage_resumes_to_the_uninterrupted_result(tmp_path):
    section = {**TINY_DIFFUSION, "max_steps": 24, "save_steps": 4, "judge_epochs": 0, "logging_steps": 12}
    recipe = image_recipe(tmp_path, diffusion=section)
    cmd = [sys.executable, str(REPO / "pipeline/diffusion.py"), str(recipe)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / "runs/tiny/diffusion.partial"
    deadline = time.time() + 120
    while not list(partial.glob("checkpoint-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpts = list(partial.glob("checkpoint-*"))
    assert ckpts and not (tmp_path / "runs/tiny/diffusion").exists()
    assert sorted(p.name for p in ckpts[0].iterdir()) == ["ema.safetensors", "loop_state.json",
                                                          "optimizer.safetensors", "text_encoder.safetensors",
                                                          "unet.safetensors"]
    resumed = run_cli(["pipeline/diffusion.py", recipe], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    manifest = json.loads((tmp_path / "runs/tiny/diffusion/manifest.json").read_text())
    assert manifest["resumed_from"] and manifest["resumed_from"].startswith("checkpoint-")
    assert "resuming from" in resumed.stdout
    fresh = run_cli(["pipeline/diffusion.py", recipe, "run.name=fresh"], cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    a, b = _unet_weights(tmp_path / "runs/tiny/diffusion"), _unet_weights(tmp_path / "runs/fresh/diffusion")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # the logged losses too: the resumed run's first log covered only the steps since the checkpoint
    logged = [[h["loss"] for h in json.loads((tmp_path / f"runs/{name}/diffusion/metrics.json").read_text())["history"]]
              for name in ("tiny", "fresh")]
    assert logged[0] == pytest.approx(logged[1], rel=1e-5) and len(logged[0]) == 2


def test_image_stages_under_a_zero3_launch_run_data_parallel_and_resume_after_a_kill(image_run, tmp_path):
    """Launched with ZeRO-3, the image stages, whose loops keep whole weights for their EMA and their own
    safetensors checkpoints, run data-parallel (DDP) and say so once (ZeRO-1/2 run with DeepSpeed:
    tests/test_image_deepspeed.py). Before, a new model stopped in accelerator.prepare ("multiple models when using
    DeepSpeed") and a UNet alone at its first checkpoint (KeyError 'state': a ZeRO optimizer's state dict). A kill
    after a checkpoint resumes to the weights of the run never killed; diffusion_dpo finishes under the same launch."""
    section = {**TINY_DIFFUSION, "max_steps": 12, "save_steps": 4, "judge_epochs": 0, "logging_steps": 6}
    recipe = image_recipe(tmp_path, diffusion=section)
    one_thread = {"OMP_NUM_THREADS": "1"}
    whole = launch_cli("zero3", ["pipeline/diffusion.py", recipe, "run.name=whole"], cwd=tmp_path, num_processes=2,
                       env=one_thread)
    assert whole.returncode == 0, whole.stderr[-3000:]
    said = "launched with DeepSpeed ZeRO-3: diffusion runs data-parallel (DDP)"
    assert (whole.stdout + whole.stderr).count(said) == 1 and "2 process(es)" in whole.stdout
    assert said in (tmp_path / "runs/whole/diffusion/log.txt").read_text()
    manifest = json.loads((tmp_path / "runs/whole/diffusion/manifest.json").read_text())
    assert manifest["num_processes"] == 2
    killed = launch_cli("zero3", ["pipeline/diffusion.py", recipe], cwd=tmp_path, num_processes=2,
                        env={**one_thread, "PIPELINE_FAULT": "kill:training:6"})
    assert killed.returncode != 0
    assert (tmp_path / "runs/tiny/diffusion.partial/checkpoint-4/optimizer.safetensors").is_file()
    resumed = launch_cli("zero3", ["pipeline/diffusion.py", recipe], cwd=tmp_path, num_processes=2, env=one_thread)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step 4" in resumed.stdout + resumed.stderr
    a, b = _unet_weights(tmp_path / "runs/tiny/diffusion"), _unet_weights(tmp_path / "runs/whole/diffusion")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    start = image_run[0] / "runs" / "tiny" / "diffusion"
    (tmp_path / "dpo").mkdir()
    dpo = image_recipe(tmp_path / "dpo", diffusion_dpo={**TINY_DPO, "init_from": str(start), "heldout_captions": ""})
    tuned = launch_cli("zero3", ["pipeline/diffusion_dpo.py", dpo], cwd=tmp_path / "dpo", num_processes=2,
                       env=one_thread)
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    said = "launched with DeepSpeed ZeRO-3: diffusion_dpo runs data-parallel (DDP)"
    assert (tuned.stdout + tuned.stderr).count(said) == 1
    assert json.loads((tmp_path / "dpo/runs/tiny/diffusion_dpo/manifest.json").read_text())["num_processes"] == 2


def test_killed_online_diffusion_dpo_resumes_to_the_uninterrupted_result(image_run, tmp_path):
    """Killed in round 2 (after its candidates were drawn by the tuned model, before the next checkpoint), the
    stage resumes from the round-1 checkpoint and ends with the weights of a run never killed."""
    start = image_run[0] / "runs" / "tiny" / "diffusion"
    section = {**TINY_DPO, "max_steps": 6, "save_steps": 2, "rounds": 2, "init_from": str(start),
               "heldout_captions": ""}
    recipe = image_recipe(tmp_path, diffusion_dpo=section)
    killed = run_cli(["pipeline/diffusion_dpo.py", recipe], cwd=tmp_path, env={"PIPELINE_FAULT": "kill:training:5"})
    assert killed.returncode != 0
    partial = tmp_path / "runs/tiny/diffusion_dpo.partial"
    assert (partial / "pairs-1.json").is_file() and not (tmp_path / "runs/tiny/diffusion_dpo").exists()
    killed = run_cli(["pipeline/diffusion_dpo.py", recipe], cwd=tmp_path, env={"PIPELINE_FAULT": "kill:publish"})
    assert killed.returncode != 0 and (partial / "manifest.json").is_file()  # all written, not renamed
    assert "resumed at step 4" in killed.stdout + killed.stderr
    resumed = run_cli(["pipeline/diffusion_dpo.py", recipe], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "candidates (candidates' digit" not in resumed.stdout + resumed.stderr  # the rounds' pairs kept
    assert not list((tmp_path / "runs/tiny/diffusion_dpo").glob("pairs-*"))
    fresh = run_cli(["pipeline/diffusion_dpo.py", recipe, "run.name=fresh"], cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    a, b = _unet_weights(tmp_path / "runs/tiny/diffusion_dpo"), _unet_weights(tmp_path / "runs/fresh/diffusion_dpo")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    rounds = [json.loads((tmp_path / f"runs/{name}/diffusion_dpo/metrics.json").read_text())["rounds"]
              for name in ("tiny", "fresh")]
    assert [[{k: v for k, v in r.items() if k != "wall_s"} for r in x] for x in rounds] == \
           [[{k: v for k, v in r.items() if k != "wall_s"} for r in rounds[1]]] * 2


def test_bad_image_data_exits_2_with_one_line_and_writes_nothing(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "metadata.jsonl").write_text(json.dumps({"file_name": "gone.png", "caption": "a 7"}) + "\n")
    recipe = image_recipe(tmp_path, diffusion=TINY_DIFFUSION)
    proc = run_cli(["pipeline/diffusion.py", recipe, f"diffusion.dataset={tmp_path / 'data'}"], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "line 1: cannot read image 'gone.png'" in lines[0]
    assert not (tmp_path / "runs").exists()
    # a bad key of the DPO stage: caught before it looks for its start model
    recipe = image_recipe(tmp_path, diffusion=TINY_DIFFUSION, diffusion_dpo=TINY_DPO)
    proc = run_cli(["pipeline/diffusion_dpo.py", recipe, "diffusion_dpo.candidate_steps=0"], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "diffusion_dpo.candidate_steps must be at least 1" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_check_reads_the_first_rows_of_a_local_image_dataset_as_the_stage_does(tmp_path):
    # --check resolved the metadata file only: a row without its caption passed, and the stage stopped on it
    from PIL import Image

    from pipeline import image_check
    from pipeline.recipe import load_recipe

    data = tmp_path / "data"
    data.mkdir()
    Image.new("L", (16, 16)).save(data / "a.png")
    good, bad = {"file_name": "a.png", "caption": "a 7"}, {"file_name": "a.png"}
    (data / "metadata.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    recipe = image_recipe(tmp_path, diffusion={**TINY_DIFFUSION, "dataset": str(data)})
    stage = run_cli(["pipeline/diffusion.py", recipe], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert stage.returncode == 2 and "Traceback" not in stage.stderr, stage.stderr[-2000:]
    line = stage.stderr.strip().splitlines()[-1].removeprefix("error: ")
    assert line.startswith(f"{data / 'metadata.jsonl'}: line 2: missing caption")
    check = run_cli(["pipeline/run.py", recipe, "--check", "--only", "diffusion"], cwd=tmp_path,
                    env={"OMP_NUM_THREADS": "1"})
    assert check.returncode == 2 and "Traceback" not in check.stderr, check.stderr[-2000:]
    assert f"error: diffusion.dataset: {line}\n" in check.stdout
    assert not (tmp_path / "runs").exists()
    # the first SAMPLE_ROWS rows only: decoding every image of a large set would take minutes
    rows = [good] * image_check.SAMPLE_ROWS + [bad]
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    keys = load_recipe(recipe).keys("diffusion")
    assert image_check.first_rows_problem(keys, {}) is None
    with pytest.raises(PipelineError, match="line 501: missing caption"):
        images.load_images(str(data), 16, 1)


def test_check_decodes_the_first_pairs_of_a_local_pairs_file_as_the_stage_does(tmp_path):
    # --check read diffusion_dpo's pairs and saw their files exist: an image that does not decode passed, and the
    # stage stopped on it after loading its model
    from PIL import Image

    pairs = tmp_path / "pairs"
    pairs.mkdir()
    Image.new("RGB", (16, 16), "white").save(pairs / "white.png")
    (pairs / "black.png").write_bytes(b"not a png")
    (pairs / "metadata.jsonl").write_text("".join(
        json.dumps({"prompt": f"a {i}", "chosen": "white.png", "rejected": "black.png"}) + "\n" for i in range(2)))
    base = _tiny_stable_diffusion(tmp_path / "tiny-sd")
    recipe = image_recipe(tmp_path, diffusion_dpo={**TINY_DPO, "rounds": 1, "init_from": str(base),
                                                   "dataset": str(pairs), "heldout_captions": None})
    stage = run_cli(["pipeline/diffusion_dpo.py", recipe], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert stage.returncode == 2 and "Traceback" not in stage.stderr, stage.stderr[-2000:]
    line = stage.stderr.strip().splitlines()[-1].removeprefix("error: ")
    assert line.startswith(f"{pairs / 'metadata.jsonl'}: line 1: cannot read image 'black.png'")
    check = run_cli(["pipeline/run.py", recipe, "--check"], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert check.returncode == 2 and "Traceback" not in check.stderr, check.stderr[-2000:]
    assert f"error: diffusion_dpo.dataset: {line}\n" in check.stdout


@pytest.mark.parametrize("section, expected", [
    ({"lr_scheduler_type": "cosinus"}, "diffusion.lr_scheduler_type must be one of"),  # a traceback in training
    ({"attn_implementation": "flash"}, "diffusion.attn_implementation must be one of"),  # --check passed it
    ({"text_encoder": {**TINY_TEXT, "d_model": "wide"}}, "diffusion.text_encoder: .*'d_model'"),  # traceback
    ({"unet": {**TINY_UNET, "block_out_channels": "wide"}}, "diffusion.unet: .*block_out_channels"),  # --check crashed
    ({"unet": {**TINY_UNET, "block_out_chanels": [8, 16]}}, "diffusion.unet: .*block_out_chanels"),  # --check passed
    ({"unet": {**TINY_UNET, "in_channels": 4}}, "diffusion.unet: in_channels must be 1 .grey. or 3 .RGB., got 4"),
    # sample_size was replaced by resolution without a word
    ({"unet": {**TINY_UNET, "sample_size": 32}}, r"diffusion.unet.sample_size \(32\) differs from diffusion.resolution "
                                                 r"\(16\)"),
    # LoRA left the text encoder frozen though train_text_encoder asked for it; a new model's LoRA froze it all
    ({"use_lora": True, "train_text_encoder": True},
     "section 'diffusion': train_text_encoder: true cannot train with use_lora: true"),
    ({"use_lora": True}, "diffusion.use_lora: a new model .no pretrained. starts random"),
])
def test_bad_image_section_is_one_line_in_the_stage_and_check_leaving_nothing(tmp_path, section, expected):
    recipe = image_recipe(tmp_path, diffusion={**TINY_DIFFUSION, **section})
    stage = run_cli(["pipeline/diffusion.py", recipe], cwd=tmp_path)
    assert stage.returncode == 2 and "Traceback" not in stage.stderr, stage.stderr[-2000:]
    assert re.search(expected, stage.stderr.strip().splitlines()[-1]) and str(recipe) in stage.stderr
    check = run_cli(["pipeline/run.py", recipe, "--check"], cwd=tmp_path)
    assert check.returncode == 2 and "Traceback" not in check.stderr, check.stderr[-2000:]
    assert re.search(expected, check.stdout)
    assert not (tmp_path / "runs").exists()


def _tiny_stable_diffusion(folder):
    """A StableDiffusionPipeline built from configs (tiny VAE, CLIP text encoder, UNet): what a hub pipeline is."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer = images.build_tokenizer()
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=1))
    vae = tiny_vae()
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=[16, 32], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                                up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=4)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDPMScheduler(beta_schedule="scaled_linear"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def test_lora_fine_tuning_of_a_pretrained_pipeline_and_its_memory_check(tmp_path):
    from diffusers import DiffusionPipeline

    base = _tiny_stable_diffusion(tmp_path / "tiny-sd")
    recipe = image_recipe(tmp_path, diffusion={"pretrained": str(base), "use_lora": True, "lora_rank": 4,
                                               "train_text_encoder": False, "max_steps": 3, "batch_size": 4,
                                               "ema_decay": 0.0, "judge_epochs": 0, "save_steps": 0,
                                               "learning_rate": 1e-2})
    proc = run_cli(["pipeline/diffusion.py", recipe], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "runs/tiny/diffusion"
    assert "trainable 0.0" in proc.stdout and (out / "pytorch_lora_weights.safetensors").is_file()
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == "StableDiffusionPipeline" and not hasattr(pipe.unet, "peft_config")
    image = pipe("a large 7", num_inference_steps=2, height=16, width=16).images[0]
    assert image.size == (16, 16)
    before, after = _unet_weights(base), _unet_weights(out)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all("attn" in k for k in changed)  # LoRA folded into the attention projections only
    # the LoRA file loads back onto the base pipeline
    base_pipe = DiffusionPipeline.from_pretrained(base)
    base_pipe.load_lora_weights(out / "pytorch_lora_weights.safetensors")
    # --check sizes the stage from the configs alone
    check = run_cli(["pipeline/run.py", recipe, "--check", "--force", "--device-memory", "1GiB"], cwd=tmp_path)
    assert check.returncode in (0, 1) and "Traceback" not in check.stderr, check.stdout + check.stderr
    assert "memory per device" in check.stdout and "LoRA:" in check.stdout and "vae" in check.stdout


def test_lora_targets_that_name_no_unet_module_stop_in_one_line_naming_the_override(tmp_path):
    """peft raised NoMatchingPeftModuleError with a traceback once the stage had begun, its .partial left behind;
    --check counted no LoRA parameters and passed."""
    base = _tiny_stable_diffusion(tmp_path / "tiny-sd")
    recipe = image_recipe(tmp_path, diffusion={"pretrained": str(base), "train_text_encoder": False, "max_steps": 1,
                                               "batch_size": 4, "judge_epochs": 0, "save_steps": 0})
    override = "diffusion.lora_target_modules=[to_q,to_kk]"
    proc = run_cli(["pipeline/diffusion.py", recipe, "diffusion.use_lora=true", override], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: override '{override}': diffusion.lora_target_"
                                                           f"modules: 'to_kk' names no module of the UNet (closest: to_k")
    assert not list((tmp_path / "runs/tiny").glob("diffusion*"))
    check = run_cli(["pipeline/run.py", recipe, "--check", "diffusion.use_lora=true", override], cwd=tmp_path)
    assert check.returncode == 2 and "Traceback" not in check.stderr, check.stderr[-2000:]
    assert "diffusion.lora_target_modules: 'to_kk' names no module of the UNet" in check.stdout


def test_a_pretrained_pipeline_trains_at_the_section_resolution(tmp_path):
    # `resolution` was silently ignored with `pretrained` (images had to be the pipeline's own size); now it is the
    # training size, as diffusers' --resolution, checked against the VAE and UNet downsampling
    from PIL import Image

    base = _tiny_stable_diffusion(tmp_path / "tiny-sd")  # 16px: UNet sample_size 8 x VAE factor 2, multiples of 4
    (tmp_path / "data").mkdir()
    Image.new("RGB", (40, 24), (200, 10, 10)).save(tmp_path / "data" / "red.png")
    (tmp_path / "data" / "metadata.jsonl").write_text(json.dumps({"file_name": "red.png", "text": "a 3"}) + "\n")
    section = {"pretrained": str(base), "dataset": str(tmp_path / "data"), "train_text_encoder": False,
               "max_steps": 1, "batch_size": 2, "ema_decay": 0.0, "judge_epochs": 0, "save_steps": 0}
    recipe = image_recipe(tmp_path, diffusion={**section, "resolution": 18})
    proc = run_cli(["pipeline/diffusion.py", recipe], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (f"error: {recipe}: diffusion.resolution: 18 is not a multiple "
                                                    f"of 4 (the pipeline's VAE factor x its UNet's downsampling)")
    assert not (tmp_path / "runs").exists()
    check = run_cli(["pipeline/run.py", recipe, "--check"], cwd=tmp_path)
    assert check.returncode == 2 and "diffusion.resolution: 18 is not a multiple of 4" in check.stdout
    recipe = image_recipe(tmp_path, diffusion={**section, "resolution": 24})
    proc = run_cli(["pipeline/diffusion.py", recipe], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 of 1 images are not 24x24: resized" in proc.stdout + proc.stderr


def test_check_sizes_a_pipeline_from_its_configs_with_the_defaults_the_stage_would_build(tmp_path):
    # a config.json may leave out keys that diffusers fills with defaults when it builds the model; --check read the
    # file as written (a UNet with no block_out_channels counted as one block: side multiple 2 instead of 2 x 8)
    from pipeline import image_check
    from pipeline.recipe import load_recipe

    base = _tiny_stable_diffusion(tmp_path / "tiny-sd")
    unet_file = base / "unet" / "config.json"
    unet_config = json.loads(unet_file.read_text())
    left_out = ("block_out_channels", "down_block_types", "up_block_types")  # so: SD 1.5's four blocks
    written = {k: v for k, v in unet_config.items() if k not in left_out}
    unet_file.write_text(json.dumps(written))
    recipe = load_recipe(image_recipe(tmp_path, diffusion={"pretrained": str(base)}))
    comps = image_check.components(recipe, str(base), {}, 16)
    assert list(comps["unet_config"]["block_out_channels"]) == [320, 640, 1280, 1280]  # UNet2DConditionModel's
    assert comps["vae_factor"] == 2
    assert images.side_multiple(comps["unet_config"], comps["vae_factor"]) == 2 * 8
    # the one function the stage asks too, on the pipeline it loads
    from diffusers import DiffusionPipeline

    unet_file.write_text(json.dumps(unet_config))
    pipe = DiffusionPipeline.from_pretrained(base)
    comps = image_check.components(recipe, str(base), {}, 16)
    assert images.pipeline_shape(pipe)["multiple"] == images.side_multiple(comps["unet_config"],
                                                                            comps["vae_factor"]) == 4


def test_fine_tuning_a_pipeline_leaves_its_text_encoder_alone_unless_asked(tmp_path):
    # train_text_encoder defaulted to true for a pretrained pipeline too: a diffusers user's CLIP was trained at the
    # UNet's learning rate without asking (train_text_to_image.py freezes it)
    base = _tiny_stable_diffusion(tmp_path / "tiny-sd")
    section = {"pretrained": str(base), "max_steps": 2, "batch_size": 2, "ema_decay": 0.0, "judge_epochs": 0,
               "save_steps": 0, "learning_rate": 1e-2}
    recipe = image_recipe(tmp_path, diffusion=section)
    proc = run_cli(["pipeline/diffusion.py", recipe], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "text_encoder" not in proc.stdout.split("StableDiffusionPipeline:")[1].split("\n")[0]
    before, after = (_weights(folder / "text_encoder") for folder in (base, tmp_path / "runs/tiny/diffusion"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not all(torch.equal(a, b) for a, b in zip(_unet_weights(base).values(),
                                                      _unet_weights(tmp_path / "runs/tiny/diffusion").values()))


def test_captions_of_words_a_word_level_model_does_not_know_are_refused_in_the_stage_and_check(tmp_path):
    # a new model's word-level tokenizer knows the words of the captions it was built on; reused (pretrained,
    # init_from) with captions of other words, each read as <unk>: "a red car" and "a blue boat" conditioned alike
    from PIL import Image
    from tokenizers import Tokenizer, models

    from pipeline import image_captions

    known = images.build_tokenizer(["a blue thing"])
    assert image_captions.caption_words_problem(known, [("f: line 1", "a blue 7"), ("f: line 2", ["7", "a thing"])]) \
        is None
    assert image_captions.unknown_words(known, "A red car, red!") == ["red", "car"]
    assert image_captions.caption_words_problem(known, [("f: line 1", "a 7"), ("f: line 2", "a red car")]) \
        .startswith("f: line 2: caption 'a red car': the model's word-level tokenizer does not know 'red', 'car'")
    subword = Tokenizer(models.BPE(vocab={"a": 0, "<unk>": 1}, merges=[], unk_token="<unk>"))
    assert image_captions.caption_words_problem(subword, [("f: line 1", "zebra")]) is None  # CLIP's, T5's: any word
    base = _tiny_stable_diffusion(tmp_path / "tiny-sd")  # its tokenizer: build_tokenizer's, the world's words
    (tmp_path / "data").mkdir()
    Image.new("RGB", (16, 16), "red").save(tmp_path / "data" / "red.png")
    rows = [{"file_name": "red.png", "text": "a 3"}, {"file_name": "red.png", "text": "a red car"}]
    (tmp_path / "data" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = image_recipe(tmp_path, diffusion={"pretrained": str(base), "dataset": str(tmp_path / "data"),
                                               "max_steps": 1, "batch_size": 2, "judge_epochs": 0, "save_steps": 0})
    expected = (f"{tmp_path / 'data' / 'metadata.jsonl'}: line 2: caption 'a red car': the model's word-level "
                f"tokenizer does not know 'red', 'car'")
    proc = run_cli(["pipeline/diffusion.py", recipe], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {expected}")
    assert not (tmp_path / "runs").exists()
    check = run_cli(["pipeline/run.py", recipe, "--check"], cwd=tmp_path)
    assert check.returncode == 2 and f"diffusion.dataset: {expected}" in check.stdout, check.stdout + check.stderr
    # diffusion_dpo's pairs of your own on that model
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"caption": "a green 7", "chosen": "data/red.png", "rejected": "data/red.png"}) + "\n")
    recipe = image_recipe(tmp_path, diffusion_dpo={"init_from": str(base), "dataset": str(pairs),
                                                   "heldout_captions": None, "max_steps": 1, "batch_size": 2})
    expected = f"{pairs}: line 1: caption 'a green 7': the model's word-level tokenizer does not know 'green'"
    proc = run_cli(["pipeline/diffusion_dpo.py", recipe], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {expected}")
    assert not (tmp_path / "runs").exists()
    check = run_cli(["pipeline/run.py", recipe, "--check"], cwd=tmp_path)
    assert check.returncode == 2 and f"diffusion_dpo.dataset: {expected}" in check.stdout, check.stdout


def _tiny_sdxl_and_pixart(folder):
    """An SDXL pipeline (its UNet needs added_cond_kwargs: text_time) and a PixArt one (a transformer, no unet)."""
    from diffusers import (DDPMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(0)
    tok = images.build_tokenizer()
    clip = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=77, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    vae = tiny_vae()
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=[16, 32], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                                up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=4, addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8)
    StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**clip)), tokenizer=tok,
                              text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**clip, projection_dim=16)),
                              tokenizer_2=tok, unet=unet, scheduler=DDPMScheduler()).save_pretrained(folder / "sdxl")
    transformer = PixArtTransformer2DModel(sample_size=8, num_layers=1, attention_head_dim=8, num_attention_heads=2,
                                           in_channels=4, out_channels=8, patch_size=2, cross_attention_dim=16,
                                           caption_channels=16, norm_num_groups=4)
    text = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    PixArtAlphaPipeline(tokenizer=tok, text_encoder=text, vae=vae, transformer=transformer,
                        scheduler=DDPMScheduler()).save_pretrained(folder / "pixart")


@pytest.mark.parametrize("kind, expected", [
    ("sdxl", r"StableDiffusionXLPipeline's UNet has addition_embed_type: 'text_time', so it needs inputs"),
    ("pixart", r"PixArtAlphaPipeline has no UNet2DConditionModel `unet` \(its components: .*transformer"),
])
def test_pipelines_the_stages_cannot_train_are_refused_in_one_line_by_the_stage_and_check(tmp_path, kind, expected):
    # SDXL's UNet (added_cond_kwargs) and PixArt's transformer crashed in training with a traceback; --check passed
    # SDXL and crashed on PixArt
    _tiny_sdxl_and_pixart(tmp_path)
    recipe = image_recipe(tmp_path, diffusion={"pretrained": str(tmp_path / kind), "max_steps": 1, "batch_size": 2,
                                               "judge_epochs": 0, "save_steps": 0})
    proc = run_cli(["pipeline/diffusion.py", recipe], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {recipe}: diffusion.pretrained '{tmp_path / kind}': ") and re.search(expected, last)
    assert not (tmp_path / "runs").exists()
    check = run_cli(["pipeline/run.py", recipe, "--check"], cwd=tmp_path)
    assert check.returncode == 2 and "Traceback" not in check.stderr, check.stderr[-2000:]
    assert re.search(f"diffusion.pretrained: '{tmp_path / kind}': {expected}", check.stdout), check.stdout


def _weights(folder):
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def test_held_out_captions_refuse_preference_pairs_and_check_reads_dpos_captions_and_judge(tmp_path):
    # Pick-a-Pic rows were read as their captions alone (the pairs silently ignored), and --check said "ok" for a
    # start model without the image judge that the stage then refused after loading the model
    from pipeline import image_eval
    from pipeline.recipe import load_recipe

    base = _tiny_stable_diffusion(tmp_path / "tiny-sd")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"caption": "a 7", "jpg_0": "a.png", "jpg_1": "b.png", "label_0": 0.5}) + "\n")
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"caption": "a 7"}) + "\n")
    recipe = image_recipe(tmp_path, diffusion_dpo={**TINY_DPO, "init_from": str(base), "dataset": str(captions),
                                                   "heldout_captions": str(pairs)})
    with pytest.raises(PipelineError, match=r"pairs.jsonl: line 1: a preference pair \(jpg_0, jpg_1, label_0\): "
                                            r"this key takes captions"):
        image_eval.read_captions(str(pairs), load_recipe(recipe))
    check = run_cli(["pipeline/run.py", recipe, "--check"], cwd=tmp_path)
    assert check.returncode == 2 and "Traceback" not in check.stderr, check.stderr[-2000:]
    assert "diffusion_dpo.heldout_captions: " in check.stdout and "a preference pair (jpg_0" in check.stdout
    assert f"diffusion_dpo.judge: no image judge in {base / 'judge'}" in check.stdout
    assert "labels its pairs with it" in check.stdout
    assert not (tmp_path / "runs").exists()


def test_a_hub_pipeline_without_network_is_named_at_once_by_check_and_stage(tmp_path, monkeypatch):
    # as a language model's hub id (tests/test_byod.py): the hub is probed once, then only the local cache is read,
    # instead of huggingface_hub's retries (23 s) ending in a message that does not say the hub is unreachable
    from pipeline import hub, image_check
    from pipeline.recipe import load_recipe

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: the probe fails at once
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    hub.reachable.cache_clear()
    recipe = load_recipe(image_recipe(tmp_path, diffusion={"pretrained": "someone/no-such-pipeline"}))
    try:
        with pytest.raises(PipelineError, match="'someone/no-such-pipeline': the hub cannot be reached"):
            image_check.components(recipe, "someone/no-such-pipeline", {}, 16)
        with pytest.raises(PipelineError, match="'someone/no-such-pipeline': .*the hub cannot be reached"):
            images.load_pipeline("someone/no-such-pipeline")
    finally:
        hub.reachable.cache_clear()


def test_a_hub_id_without_a_pipeline_index_is_one_line_in_check(tmp_path, monkeypatch):
    """--check reads a hub pipeline's model_index.json through hub.repo_file (one reader with the reward-head
    check): a repo without one, the hub reachable, is one line naming the ref and the file; a failure of the hub
    (a 5xx: LocalEntryNotFoundError when not cached) is said with what the library said."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    from pipeline import hub, image_check
    from pipeline.recipe import load_recipe

    monkeypatch.setattr(hub, "reachable", lambda: True)
    failure = EntryNotFoundError("no model_index.json")

    def download(repo, name, revision=None, **_):
        raise failure

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    recipe = load_recipe(image_recipe(tmp_path, diffusion={"pretrained": "someone/a-language-model"}))
    with pytest.raises(PipelineError, match="^'someone/a-language-model': the hub has no model_index.json for it"):
        image_check.components(recipe, "someone/a-language-model", {}, 16)
    failure = LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub")
    with pytest.raises(PipelineError, match=r"^'someone/a-language-model': cannot read the pipeline's configs from "
                                            r"the hub \(LocalEntryNotFoundError: An error happened"):
        image_check.components(recipe, "someone/a-language-model", {}, 16)
    failure = ConnectionResetError()  # no message: its type alone (the first line of nothing was an IndexError)
    with pytest.raises(PipelineError, match=r"configs from the hub \(ConnectionResetError\)"):
        image_check.components(recipe, "someone/a-language-model", {}, 16)


def test_images_stored_as_bytes_in_a_parquet_file_are_read(tmp_path):
    """A Hugging Face dataset saved with its Image feature (a parquet column of {bytes, path} structs, the path the
    original file's name, not here) was "missing 'file_name' (or 'image')": its images are read from the bytes."""
    import io

    import datasets
    from PIL import Image

    def png(value):
        out = io.BytesIO()
        Image.new("L", (16, 16), value).save(out, format="PNG")
        return out.getvalue()

    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    rows = {"image": [{"bytes": png(0), "path": "black.png"}, {"bytes": png(255), "path": None}],
            "text": ["a black square", "a white square"]}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(tmp_path / "metadata.parquet")
    source = images.load_images(str(tmp_path), 16, 1)
    assert source.captions == ["a black square", "a white square"]
    x, texts = source.sample(6, torch.Generator().manual_seed(0))
    for image, text in zip(x, texts):  # in [-1, 1]: black -1, white 1, each with its own caption
        assert torch.all(image == (-1.0 if text == "a black square" else 1.0))
    rows["image"][1] = {"bytes": png(255)[:40], "path": "cut.png"}  # a truncated PNG: one line naming the row
    datasets.Dataset.from_dict(rows, features=features).to_parquet(tmp_path / "metadata.parquet")
    with pytest.raises(PipelineError, match=r"metadata.parquet: row 2: cannot read image of 40 stored bytes \("):
        images.load_images(str(tmp_path), 16, 1)


def test_a_hub_image_dataset_is_read_as_diffusers_dataset_name_reads_it(tmp_path, monkeypatch):
    """`dataset: org/name` (diffusers' --dataset_name, e.g. lambdalabs/naruto-blip-captions) was "not found": only
    metadata files were read. It loads with datasets.load_dataset (here a stand-in returning the dataset the hub
    would: an Image column and a text column), its images read undecoded from their bytes; without the hub and
    the cache, one line says so, in the stage's reader and in --check."""
    import io

    import datasets
    from PIL import Image

    from pipeline import hub, image_check
    from pipeline.cluster import Launch
    from pipeline.recipe import load_recipe

    def png(value):
        out = io.BytesIO()
        Image.new("RGB", (20, 20), (value,) * 3).save(out, format="PNG")
        return out.getvalue()

    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    hub_dataset = datasets.Dataset.from_dict({"image": [{"bytes": png(0), "path": None},
                                                        {"bytes": png(255), "path": None}],
                                              "text": ["a black square", "a white square"]}, features=features)
    asked = []

    def load_dataset(name, split=None, **kwargs):
        asked.append((name, split))
        return hub_dataset

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(hub, "reachable", lambda: True)
    image_files.hub_rows.cache_clear()
    source = images.load_images("someone/squares:train", 16, 1)
    assert asked == [("someone/squares", "train")] and source.captions == ["a black square", "a white square"]
    x, texts = source.sample(4, torch.Generator().manual_seed(0))
    for image, text in zip(x, texts):  # resized to 16 x 16, grey, in [-1, 1]
        assert image.shape == (1, 16, 16) and torch.all(image == (-1.0 if text == "a black square" else 1.0))
    recipe = load_recipe(image_recipe(tmp_path, diffusion={"dataset": "someone/squares"}))
    lines, errors, _ = image_check.check_image_stage(recipe, "diffusion", Launch(), None)
    assert not errors and "hub dataset someone/squares: 2 rows" in lines
    monkeypatch.setattr(hub, "reachable", lambda: False)

    def unreachable(name, split=None, **kwargs):
        raise ConnectionError("Couldn't reach the hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    image_files.hub_rows.cache_clear()
    with pytest.raises(PipelineError, match=r"^dataset 'someone/absent': not a local file or folder, and the hub "
                                            r"cannot be reached"):
        images.load_images("someone/absent", 16, 1)
    recipe = load_recipe(image_recipe(tmp_path, diffusion={"dataset": "someone/absent"}))
    _, errors, _ = image_check.check_image_stage(recipe, "diffusion", Launch(), None)
    assert len(errors) == 1 and errors[0].startswith("diffusion.dataset: dataset 'someone/absent': not a local")
    image_files.hub_rows.cache_clear()


def test_a_hub_datasets_images_stay_in_its_cache_and_each_batch_reads_its_rows(tmp_path, monkeypatch):
    """diffusers' --dataset_name trains on sets larger than memory: the dataset is memory-mapped and a batch reads
    its rows. Ours did `to_list()`, every image's bytes in memory. Now the reader checks each image once and keeps
    row numbers; a batch of 3 reads 3 rows, each image the one its caption names."""
    import io

    import datasets
    from PIL import Image

    from pipeline import hub

    def png(value):
        out = io.BytesIO()
        Image.new("L", (16, 16), value).save(out, format="PNG")
        return out.getvalue()

    shades = [0, 51, 102, 153, 204, 255]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": [{"bytes": png(v), "path": None} for v in shades],
                                "text": [f"shade {v}" for v in shades]}, features=features).save_to_disk(tmp_path / "ds")
    reads = []
    on_disk = counting_rows(datasets.load_from_disk(str(tmp_path / "ds")), reads)  # memory-mapped, as the hub's
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split=None, **kw: on_disk)
    monkeypatch.setattr(hub, "reachable", lambda: True)
    image_files.hub_rows.cache_clear()
    try:
        source = images.load_images("someone/shades", 16, 1)
        assert sorted(reads) == list(range(len(shades)))  # each row read once to check its image
        reads.clear()
        x, texts = source.sample(3, torch.Generator().manual_seed(0))
    finally:
        image_files.hub_rows.cache_clear()
    assert len(reads) == 3
    for image, text in zip(x, texts):
        assert torch.allclose(image, torch.full_like(image, int(text.split()[1]) / 255 * 2 - 1), atol=1e-6)


def test_grid_labels_wrap_long_captions_within_their_column(tmp_path):
    """A user's long caption (Pick-a-Pic's run to a paragraph) is wrapped at spaces within the label column and cut
    with '...' where the row has no more room; the digit world's short captions stay one line."""
    import numpy as np
    from PIL import Image, ImageDraw

    from pipeline.images import label_lines, save_grid

    draw = ImageDraw.Draw(Image.new("L", (10, 10)))
    text = "a watercolour painting of a lighthouse on a cliff at dawn with seagulls and a small red boat below it"
    lines = label_lines(draw, text, 182, 10)
    assert len(lines) > 1 and " ".join(lines) == text and all(draw.textlength(line) <= 182 for line in lines)
    cut = label_lines(draw, text, 182, 2)
    assert len(cut) == 2 and cut[-1].endswith(" ...") and cut[0] == lines[0]
    assert label_lines(draw, "digit 3, small, thin, left", 182, 4) == ["digit 3, small, thin, left"]

    pictures = torch.rand(2, 1, 16, 16)
    save_grid(tmp_path / "grid.png", pictures, ["digit 3", text], per_row=1)
    label_column = np.asarray(Image.open(tmp_path / "grid.png"))[:, :190]
    inked_rows = np.flatnonzero((label_column > 128).any(axis=1))
    cell = 16 * 3 + 2
    short, long = inked_rows[inked_rows < cell], inked_rows[inked_rows >= cell]
    assert short.max() - short.min() < 14 < long.max() - long.min()  # one line of text; several


@pytest.mark.parametrize("native", [True, False])
def test_mixed_precision_auto_is_bf16_only_where_the_cpu_computes_it(monkeypatch, capsys, native):
    """An AVX2-only CPU emulates bf16: the small recipe's bf16 step took 11.6x fp32's there (a make run of hours).
    `auto` trains in bf16 where the CPU has it and in fp32 elsewhere, and says which; bf16 asked for where it is
    emulated is kept, with a warning."""
    import torch

    from pipeline import cluster, diffusion_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cluster, "cpu_bf16_native", lambda: native)

    def precision_and_log(value):
        chosen = diffusion_config.mixed_precision_here(value, "diffusion")
        return chosen, capsys.readouterr().out

    chosen, said = precision_and_log("auto")
    assert chosen == ("bf16" if native else "no")
    assert "WARNING" not in said and said.rstrip().endswith(
        "diffusion.mixed_precision auto: bf16 (this CPU computes bf16)" if native else
        "diffusion.mixed_precision auto: fp32 (this CPU has no native bf16)")
    chosen, said = precision_and_log("bf16")
    assert chosen == "bf16" and (said == "" if native else "WARNING: " in said and "torch emulates it" in said)
    assert precision_and_log("no") == ("no", "")


def test_check_plans_zero2s_fp32_partition_and_reduce_bucket_for_the_image_stages(tmp_path):
    """Under ZeRO-1/2 the image stages run with DeepSpeed, which clones the fp32 weights of each process's partition
    beside the moments and reduces gradients through a buffer of reduce_bucket_size elements (DeepSpeed's 5e8 unless
    the config says otherwise; two with overlap_comm). `--check` planned the moments alone, so a full fine-tune could
    pass it and not fit."""
    from pipeline import check, cluster
    from pipeline.recipe import load_recipe

    recipe = load_recipe(image_recipe(tmp_path, diffusion=TINY_DIFFUSION))

    def planned(launch):
        memory = next(line for line in check.check_stage(recipe, "diffusion", launch, None).lines
                      if line.startswith("memory per device"))
        return dict(re.findall(r"(\w[\w ]*?) ([\d.]+ (?:[KMGT]i)?B)", memory.split("(", 1)[1]))

    ddp = planned(cluster.read_launch(REPO / "launch/accelerate/ddp.yaml", num_processes=8))
    zero2 = planned(cluster.read_launch(REPO / "launch/accelerate/zero2.yaml", num_processes=8))
    assert "reduce bucket" not in ddp and zero2["reduce bucket"] == "1.86 GiB"  # 4 bytes x 5e8
    moments = float(ddp["optimizer"].split()[0])  # 8 bytes a trainable parameter, whole on every process
    assert ddp["optimizer"].split()[1] == zero2["optimizer"].split()[1]
    assert float(zero2["optimizer"].split()[0]) == pytest.approx(moments * 12 / 8 / 8, rel=0.01)  # + fp32, / 8
    ds_file = tmp_path / "ds.json"
    ds_file.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": 1e8}}))
    yaml_file = tmp_path / "zero2_file.yaml"
    yaml_file.write_text(f"distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: {ds_file}\n"
                         f"num_processes: 8\n")
    assert planned(cluster.read_launch(yaml_file))["reduce bucket"] == "381 MiB"
    ds_file.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": 1e8, "overlap_comm": True}}))
    assert planned(cluster.read_launch(yaml_file))["reduce bucket"] == "763 MiB"  # two buffers, to overlap


def _rgb_images(folder, captions):
    """A metadata folder of 24px RGB images, one per caption: your own images, as a diffusers user has them."""
    from PIL import Image

    folder.mkdir()
    for i, text in enumerate(captions):
        Image.new("RGB", (24, 24), (40 * i, 200, 10)).save(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": text}) + "\n"
                                                   for i, text in enumerate(captions)))
    return str(folder)


def test_own_heldout_captions_are_drawn_without_a_judge_as_diffusers_validation_prompts(tmp_path):
    # with your own images (no judge by default) held-out captions of your own were silently dropped: nothing drawn,
    # no grid, and report.md named a sampler that drew nothing; world.json described the digit world regardless
    base = _tiny_stable_diffusion(tmp_path / "tiny-sd")  # a word-level tokenizer of the world's words
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"caption": "a large thick"}) + "\n" + json.dumps({"caption": "a 3 on the left"}) + "\n")
    section = {"pretrained": str(base), "dataset": _rgb_images(tmp_path / "data", ["a 3", "a large 7"]),
               "heldout_captions": str(held), "heldout_samples": 3, "sample_steps": 2, "grid_columns": 2,
               "max_steps": 1, "batch_size": 2, "ema_decay": 0.0, "save_steps": 0}
    recipe = image_recipe(tmp_path, diffusion=section)
    proc = run_cli(["pipeline/diffusion.py", recipe], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "runs/tiny/diffusion"
    drew = f"2 held-out captions of {held}, 3 images each, drawn without a judge (not scored)"
    assert f"{drew}: grid.png, samples/model/" in proc.stdout + proc.stderr
    assert sorted(p.name for p in (out / "samples/model").iterdir()) == ["00_a_large_thick.png",
                                                                         "01_a_3_on_the_left.png"]
    from PIL import Image

    assert Image.open(out / "grid.png").size[1] > 2 * 16  # two rows of 16px images (scaled) under their labels
    report = (out / "report.md").read_text()
    assert f"{drew}, a row each: ![samples](grid.png)" in report and "accuracy" not in report.lower()
    assert "held-out captions drawn by it with 2 steps, guidance 4.0" in report
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["heldout_drawn"]["captions"] == ["a large thick", "a 3 on the left"]
    assert "heldout_digit_accuracy" not in metrics and not (out / "judge").exists()
    assert not (out / "world.json").exists()  # the digit world's captions: not what this model was trained on
    # with a judge such captions are refused, as before: the judge scores digits
    proc = run_cli(["pipeline/diffusion.py", recipe, "diffusion.judge_epochs=1", "run.name=judged"], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (f"error: {held}: line 1: caption 'a large thick' names no "
                                                    f"single digit, so the judge cannot score it")
    # --check reads them as the stage does: without a judge, a file of any words, and says what the stage would
    proc = run_cli(["pipeline/run.py", recipe, "--check", "--only", "diffusion"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a 3"}) + "\n")
    proc = run_cli(["pipeline/run.py", recipe, "--check", "--only", "diffusion", f"diffusion.heldout_captions={bad}"],
                   cwd=tmp_path)
    assert proc.returncode == 2 and f"diffusion.heldout_captions: {bad}: line 1" in proc.stdout + proc.stderr, \
        proc.stdout[-2000:] + proc.stderr[-2000:]


def test_a_pipeline_keeps_its_schedule_but_takes_a_set_prediction_type_and_saves_its_trained_size(tmp_path,
                                                                                                   monkeypatch):
    # prediction_type was silently ignored with `pretrained` (diffusers' --prediction_type overrides the loaded
    # scheduler's); resolution 32 trained a 16px pipeline at 32px but saved sample_size 8 (16px) so the saved
    # pipeline drew at 16px; and without a judge the saved folder was never loaded back to check it
    from diffusers import DiffusionPipeline

    from pipeline import diffusion

    base = _tiny_stable_diffusion(tmp_path / "tiny-sd")
    scheduler_file = base / "scheduler/scheduler_config.json"
    scheduler_file.write_text(json.dumps({**json.loads(scheduler_file.read_text()), "prediction_type": "sample"}))
    loaded = []
    load_pipeline = images.load_pipeline
    monkeypatch.setattr(images, "load_pipeline",
                        lambda path, *a, **k: loaded.append(path) or load_pipeline(path, *a, **k))
    monkeypatch.chdir(tmp_path)
    section = {"pretrained": str(base), "dataset": _rgb_images(tmp_path / "data", ["a 3", "a large 7"]),
               "max_steps": 1, "batch_size": 2, "ema_decay": 0.0, "save_steps": 0}
    diffusion.main([str(image_recipe(tmp_path, diffusion=section))])  # a default does not override the pipeline's
    out = tmp_path / "runs/tiny/diffusion"
    saved = json.loads((out / "scheduler/scheduler_config.json").read_text())
    assert saved["prediction_type"] == "sample" and saved["beta_schedule"] == "scaled_linear"
    # the saved folder (still .partial) loads back, without a judge too
    assert [Path(p).resolve() for p in loaded] == [base.resolve(), out.with_name("diffusion.partial").resolve()]
    diffusion.main([str(image_recipe(tmp_path, diffusion={**section, "prediction_type": "v_prediction",
                                                          "resolution": 32, "beta_schedule": "linear"})),
                    "run.name=v"])
    out = tmp_path / "runs/v/diffusion"
    saved = json.loads((out / "scheduler/scheduler_config.json").read_text())
    assert saved["prediction_type"] == "v_prediction" and saved["beta_schedule"] == "scaled_linear"
    assert json.loads((out / "unet/config.json").read_text())["sample_size"] == 16  # 32px over the VAE's factor 2
    image = DiffusionPipeline.from_pretrained(out)("a 3", num_inference_steps=1, output_type="np").images
    assert image.shape == (1, 32, 32, 3)


# ---------------------------------------------------------------------------------------------- random_flip


def test_random_flip_mirrors_about_half_the_images_from_the_steps_generator():
    """diffusers' --random_flip (RandomHorizontalFlip, p 0.5) was an unknown key here and nothing flipped. A coin per
    image from the step's generator: the same seed flips the same images; off (the default), a step's loss draws from
    the generator exactly what it drew before the key existed, so the small recipe trains as it did."""
    from types import SimpleNamespace

    from pipeline import diffusion_config, diffusion_train

    x = torch.zeros(400, 1, 16, 16)
    x[..., :8] = 1  # ink on the left half: a mirror has it on the right
    flipped = diffusion_train.flip_images(x, torch.Generator().manual_seed(3))
    mirrored = flipped[:, 0, 0, 15] == 1
    assert torch.equal(flipped[mirrored], x[mirrored].flip(-1)) and torch.equal(flipped[~mirrored], x[~mirrored])
    assert 160 < int(mirrored.sum()) < 240  # 200 +- 4 standard deviations
    assert torch.equal(diffusion_train.flip_images(x, torch.Generator().manual_seed(3)), flipped)
    assert not torch.equal(diffusion_train.flip_images(x, torch.Generator().manual_seed(4)), flipped)

    class Source:  # the half-inked image, drawing nothing from the generator itself
        def sample(self, n, gen):
            return x[:n] * 2 - 1, ["a 1"] * n

    torch.manual_seed(0)
    pipe = images.build_pipeline(TINY_UNET, TINY_TEXT, {"num_train_timesteps": 10})

    def drawn(random_flip):  # the generator's state after one step's loss
        cfg = SimpleNamespace(batch_size=8, caption_dropout=0.1, snr_gamma=5.0, random_flip=random_flip)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            diffusion_train.text_to_image_loss(pipe, pipe.unet, pipe.text_encoder, pipe.scheduler, Source(), cfg, gen,
                                               "cpu")
        return gen.get_state()

    before = torch.Generator().manual_seed(1)  # a step's draws before random_flip: dropout, noise, timesteps
    torch.rand(8, generator=before)
    torch.randn(8, 1, 16, 16, generator=before)
    torch.randint(0, 10, (8,), generator=before)
    assert diffusion_config.DiffusionConfig().random_flip is False
    assert torch.equal(drawn(False), before.get_state()) and not torch.equal(drawn(True), before.get_state())


def test_random_flip_resumes_after_a_kill_to_the_uninterrupted_runs_unet(tmp_path):
    """The flips come from the step's generator, seeded by (seed, step, process): a run killed after its checkpoint
    flips, once resumed, what the run never killed flipped, and ends with its UNet to the bit."""
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        im = Image.new("L", (16, 16), 0)
        im.paste(255, (0, 0, 3 + i, 16))  # a bar against the left edge: its mirror differs
        im.save(data / f"{i}.png")
    (data / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "caption": f"a bar {i}"}) + "\n"
                                                 for i in range(4)))
    section = {**TINY_DIFFUSION, "max_steps": 8, "save_steps": 4, "logging_steps": 4, "judge_epochs": 0,
               "dataset": str(data), "random_flip": True}
    recipe = image_recipe(tmp_path, diffusion=section)
    one_thread = {"OMP_NUM_THREADS": "1"}  # the same kernels in every run
    killed = run_cli(["pipeline/diffusion.py", recipe], cwd=tmp_path, env={**one_thread,
                                                                          "PIPELINE_FAULT": "kill:training:6"})
    assert killed.returncode != 0 and (tmp_path / "runs/tiny/diffusion.partial/checkpoint-4").is_dir()
    resumed = run_cli(["pipeline/diffusion.py", recipe], cwd=tmp_path, env=one_thread)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step 4" in resumed.stdout + resumed.stderr
    fresh = run_cli(["pipeline/diffusion.py", recipe, "run.name=fresh"], cwd=tmp_path, env=one_thread)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    a, b = _unet_weights(tmp_path / "runs/tiny/diffusion"), _unet_weights(tmp_path / "runs/fresh/diffusion")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_random_flip_on_the_digit_world_stops_in_one_line_naming_where_it_was_set(tmp_path):
    """The digit world's captions say the digit's side ("a 7 on the left") and a mirrored 3 or 7 is no digit: flips
    would train images against their captions. Refused before anything is written (an error, not a warning: no
    digit-world run is right with it)."""
    from pipeline import diffusion_config

    assert diffusion_config.flip_problem(True, "my/metadata.jsonl") is None
    assert diffusion_config.flip_problem(False, images.WORLD_SPEC) is None
    said = "diffusion.random_flip: the digit world (images:digits) captions say the digit's side"
    for section, override, where in (({}, ["diffusion.random_flip=true"], "override 'diffusion.random_flip=true'"),
                                     ({"random_flip": True}, [], None)):
        recipe = image_recipe(tmp_path, diffusion={**TINY_DIFFUSION, **section})
        proc = run_cli(["pipeline/diffusion.py", recipe, *override], cwd=tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and f"{where or recipe}: {said}" in lines[0], lines
        assert not (tmp_path / "runs").exists()
        proc = run_cli(["pipeline/run.py", recipe, "--check", "--only", "diffusion", *override], cwd=tmp_path)
        assert proc.returncode == 2 and f"{where or recipe}: {said}" in proc.stdout + proc.stderr, \
            proc.stdout[-2000:] + proc.stderr[-2000:]  # --check says it too
