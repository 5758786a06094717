"""Own-image datasets and pretrained pipelines as a diffusers user brings them: imagefolder's split layout, a
save_to_disk folder, a folder without metadata, a caption column of another name, keys named in messages, and a
tokenizer saved without model_max_length."""

import json
from types import SimpleNamespace

import pytest
from PIL import Image

from conftest import run_cli
from pipeline import image_check, images
from pipeline.cli import PipelineError
from pipeline.recipe import load_recipe
from test_diffusion import TINY_DIFFUSION, _tiny_stable_diffusion, image_recipe


def _image_folder(folder, captions, column="caption"):
    folder.mkdir(parents=True)
    for i, text in enumerate(captions):
        Image.new("L", (16, 16), 40 * i).save(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", column: text}) + "\n"
                                                   for i, text in enumerate(captions)))


def test_imagefolder_split_layout_reads_its_train_split_alone_in_the_stage_and_check(tmp_path):
    # diffusers' --train_data_dir (load_dataset("imagefolder", data_dir=...)) reads data/train/metadata.jsonl: the
    # stage said "not found"
    data = tmp_path / "data"
    _image_folder(data / "train", ["a 1", "a 2"])
    _image_folder(data / "validation", ["a 9"])  # another split: not mixed into training
    source = images.load_images(str(data), 16, 1)
    assert source.size == 2 and sorted(source.captions) == ["a 1", "a 2"]
    recipe = load_recipe(image_recipe(tmp_path, diffusion={**TINY_DIFFUSION, "dataset": str(data)}))
    assert image_check.first_rows_problem(recipe.keys("diffusion"), {}) is None
    (data / "train" / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png"}) + "\n")
    assert image_check.first_rows_problem(recipe.keys("diffusion"), {}).startswith(
        f"{data / 'train' / 'metadata.jsonl'}: line 1: missing caption")


def test_a_folder_without_metadata_or_saved_by_save_to_disk_is_named_for_what_it_is(tmp_path):
    import datasets

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PipelineError) as err:
        images.load_images(str(empty), 16, 1)
    assert "not found" not in str(err.value)
    assert f"'{empty}': no metadata.jsonl, .csv or .parquet in it or in its train/ folder" in str(err.value)
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": ["a 1"]}).save_to_disk(str(saved))
    with pytest.raises(PipelineError, match=f"'{saved}': a datasets save_to_disk folder .* not read: .*to_parquet"):
        images.load_images(str(saved), 16, 1)
    with pytest.raises(PipelineError, match=f"^dataset: '{tmp_path / 'gone'}': not found"):
        images.load_images(str(tmp_path / "gone"), 16, 1)


def test_check_says_the_stages_line_for_a_folder_it_cannot_read(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    recipe = image_recipe(tmp_path, diffusion={**TINY_DIFFUSION, "dataset": str(empty)})
    check = run_cli(["pipeline/run.py", recipe, "--check", "--only", "diffusion"], cwd=tmp_path,
                    env={"OMP_NUM_THREADS": "1"})
    assert check.returncode == 2 and "Traceback" not in check.stderr, check.stderr[-2000:]
    assert f"error: diffusion.dataset: '{empty}': no metadata.jsonl, .csv or .parquet in it" in check.stdout


def test_the_stage_names_the_key_that_named_the_dataset_or_pipeline(tmp_path):
    key = f"{tmp_path / 'recipe.yaml'}: diffusion.pretrained"
    (tmp_path / "unet").mkdir()
    with pytest.raises(PipelineError) as err:
        images.load_pipeline(str(tmp_path / "unet"), key=key)
    assert str(err.value).startswith(f"{key}: '{tmp_path / 'unet'}': not a loadable diffusers pipeline")
    with pytest.raises(PipelineError) as err:  # no key given: the path alone, never a key it was not
        images.load_pipeline(str(tmp_path / "unet"))
    assert str(err.value).startswith(f"'{tmp_path / 'unet'}': ") and "init_from" not in str(err.value)
    with pytest.raises(PipelineError, match=r"^override 'diffusion.dataset=x': diffusion.dataset: 'x': not found"):
        images.load_images("x", 16, 1, key="override 'diffusion.dataset=x': diffusion.dataset")


def test_a_missing_caption_lists_the_rows_columns(tmp_path):
    _image_folder(tmp_path / "data", ["a 1"], column="prompt")
    with pytest.raises(PipelineError, match=r"line 1: missing caption .*the row has 'file_name', 'prompt'\)$"):
        images.load_images(str(tmp_path / "data"), 16, 1)


def test_a_tokenizer_saved_without_model_max_length_pads_to_its_text_encoders_positions(tmp_path):
    # padding to transformers' "unset" sentinel (int(1e30)) was OverflowError: int too big to convert
    folder = _tiny_stable_diffusion(tmp_path / "sd")
    config_file = folder / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("model_max_length")
    config_file.write_text(json.dumps(config))
    pipe = images.load_pipeline(str(folder))
    assert pipe.tokenizer.model_max_length == 77  # the CLIP text encoder's max_position_embeddings
    assert images.encode_text(pipe, pipe.text_encoder, ["a 7"], "cpu").shape == (1, 77, 16)
    from pipeline.image_tokens import cap_text_length

    unbounded = SimpleNamespace(tokenizer=SimpleNamespace(model_max_length=int(1e30)),
                                text_encoder=SimpleNamespace(config=SimpleNamespace()))
    no_limit = "^x: its tokenizer sets no model_max_length .* in tokenizer/tokenizer_config.json$"
    with pytest.raises(PipelineError, match=no_limit):
        cap_text_length(unbounded, "x")


def test_check_judges_no_captions_by_a_tokenizer_built_without_the_dataset_it_could_not_read(tmp_path):
    # a new model's tokenizer was built from the world's words alone when its dataset did not read, so --check added
    # "the model's word-level tokenizer does not know 'cat'" for held-out captions beside the dataset's own line
    from pipeline import image_captions

    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "captions.txt").write_text("a cat\n")
    recipe = image_recipe(tmp_path, diffusion={**TINY_DIFFUSION, "judge_epochs": 0, "dataset": str(empty),
                                               "heldout_captions": str(tmp_path / "captions.txt")})
    assert image_captions.ref_tokenizer(load_recipe(recipe), None, load_recipe(recipe).keys("diffusion")) is None
    check = run_cli(["pipeline/run.py", recipe, "--check", "--only", "diffusion"], cwd=tmp_path,
                    env={"OMP_NUM_THREADS": "1"})
    assert check.returncode == 2 and "Traceback" not in check.stderr, check.stderr[-2000:]
    errors = [line.strip() for line in check.stdout.splitlines() if "error:" in line]
    assert errors == [f"error: diffusion.dataset: '{empty}': no metadata.jsonl, .csv or .parquet in it or in its "
                      f"train/ folder (the imagefolder layout: rows of file_name and caption; data/README.md)"], errors
