"""data=hf: any Hugging Face dataset as a query source (save_to_disk, parquet, hub ids), with
every kind of bad row skipped, counted and logged; and a PrefLoop pair set trains in TRL's
DPOTrainer unchanged."""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import pytest
from PIL import Image

from evaluation.suites.hf import DataUnavailable, HFSource

FEATURES = {"id": "string", "question": "string", "answer": "string", "qtype": "string"}


def png(mode: str = "RGB", size: tuple[int, int] = (32, 24), color=(200, 30, 30)) -> bytes:
    fill = {"RGB": color, "L": 128, "RGBA": (0, 0, 255, 0), "P": 3}[mode]
    buffer = io.BytesIO()
    Image.new(mode, size, fill).save(buffer, format="PNG")
    return buffer.getvalue()


def row(i: int, image: bytes | None = None, question: str = "What color is it?", answer: str = "Red",
        boxes=None) -> dict:
    return {"id": f"r{i}", "image": None if image is None else {"bytes": image, "path": None},
            "question": question, "answer": answer, "qtype": "colour", "boxes": boxes or []}


def good(i: int) -> dict:
    return row(i, png(), answer=["red", "blue", "green"][i % 3])


BAD = {  # reason or conversion -> a row showing it
    "corrupt_image": row(100, b"\x89PNG\r\n\x1a\n not really a png"),
    "no_image": row(101, None, question="A text-only question?"),
    "empty_answer": row(102, png(), answer="  "),
    "empty_question": row(103, png(), question=""),
    "grayscale": row(104, png("L"), answer="gray"),
    "rgba": row(105, png("RGBA"), answer="white"),
    "huge": row(106, png(size=(2000, 1000)), answer="big", boxes=[[100.0, 200.0, 1100.0, 800.0]]),
}


def features():
    import datasets

    return datasets.Features({**{k: datasets.Value(v) for k, v in FEATURES.items()}, "image": datasets.Image(),
                              "boxes": datasets.List(datasets.List(datasets.Value("float32")))})


def make_dataset(rows: list[dict]):
    import datasets

    return datasets.Dataset.from_list(rows, features=features())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """One dataset in three layouts: save_to_disk DatasetDict (train/test), a parquet file per split,
    and a single-split save_to_disk Dataset."""
    import datasets

    root = tmp_path_factory.mktemp("hfdata")
    train = make_dataset([good(i) for i in range(6)] + list(BAD.values()))
    test = make_dataset([good(i) for i in range(10, 14)])
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(root / "disk"))
    train.to_parquet(str(root / "train.parquet"))
    test.to_parquet(str(root / "test.parquet"))
    train.save_to_disk(str(root / "single"))
    return root


def source(path, **kw) -> HFSource:
    return HFSource(path=str(path), shuffle=kw.pop("shuffle", False), image_max_side=kw.pop("image_max_side", 512),
                    cache_dir=kw.pop("cache_dir", None), **kw)


@pytest.mark.parametrize("layout", ["disk", "{split}.parquet"])
def test_bad_rows_are_skipped_counted_and_logged(data_dir, layout, tmp_path, caplog):
    src = source(data_dir / layout, columns={"id": "id", "qtype": "qtype", "boxes": "boxes"},
                 cache_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="prefloop"):
        queries = src.queries("train", 0, 100, seed=0)
    ids = [q["id"] for q in queries]
    assert ids == [f"r{i}" for i in range(6)] + ["r104", "r105", "r106"]
    assert dict(src.skipped) == {"corrupt_image": 1, "no_image": 1, "empty_answer": 1, "empty_question": 1}
    assert dict(src.converted) == {"to_rgb": 2, "downscaled": 1}
    assert all(q["image"].mode == "RGB" for q in queries)
    by_id = {q["id"]: q for q in queries}
    assert by_id["r105"]["image"].getpixel((0, 0)) == (255, 255, 255)  # transparent -> white, not black
    assert by_id["r106"]["image"].size == (512, 256)
    assert by_id["r106"]["boxes"][0] == pytest.approx([25.6, 51.2, 281.6, 204.8])  # scaled with the image
    assert by_id["r0"]["answer"] == "red" and by_id["r0"]["qtype"] == "colour" and by_id["r0"]["target_box"] == []
    text = caplog.text
    assert "skipping row 7 of split 'train' (no_image): text-only row" in text
    assert "(corrupt_image): cannot decode the image: UnidentifiedImageError" in text and "(empty_answer)" in text
    assert "9 queries; skipped {" in text and "'corrupt_image': 1" in text
    assert "converted images {'to_rgb': 2, 'downscaled': 1}" in text


def test_slices_are_disjoint_deterministic_and_shuffled(data_dir):
    src = HFSource(path=str(data_dir / "disk"), columns={"id": "id"})
    first, second = src.queries("test", 0, 2, seed=0), src.queries("test", 2, 4, seed=0)
    assert not {q["id"] for q in first} & {q["id"] for q in second}
    assert [q["id"] for q in first] == [q["id"] for q in src.queries("test", 0, 2, seed=0)]
    orders = {tuple(q["id"] for q in src.queries("test", 0, 4, seed=s)) for s in range(6)}
    assert len(orders) > 1  # the seed permutes rows
    with pytest.raises(ValueError, match=r"has 4 rows, but rows \[4, 6\) were asked for"):
        src.queries("test", 4, 6, seed=0)


def test_split_names_slices_and_single_split_datasets(data_dir, caplog):
    src = source(data_dir / "disk")
    with pytest.raises(ValueError, match=r"splits \['test', 'train'\], not 'validation'.*eval.split"):
        src.queries("validation", 0, 3, seed=0)
    single = source(data_dir / "single", columns={"id": "id"})
    pool = single.queries("train[:50%]", 0, 100, seed=0)
    held_out = single.queries("train[50%:]", 0, 100, seed=0)
    assert [q["id"] for q in pool] == ["r0", "r1", "r2", "r3", "r4", "r5"]
    assert {q["id"] for q in held_out} == {"r104", "r105", "r106"}
    with caplog.at_level(logging.WARNING, logger="prefloop"):
        single.queries("test", 0, 2, seed=0)
    assert "has no splits" in caplog.text and "train[:90%]" in caplog.text


def test_missing_column_names_column_available_columns_and_config_key(data_dir):
    src = source(data_dir / "disk", columns={"answer": "label"})
    with pytest.raises(ValueError) as err:
        src.queries("train", 0, 3, seed=0)
    message = str(err.value)
    assert "'label'" in message and "data.source.columns.answer" in message
    assert "available columns: ['answer', 'boxes', 'id', 'image', 'qtype', 'question']" in message
    with pytest.raises(ValueError, match="unknown source.columns keys \\['questoin'\\]"):
        HFSource(path="x", columns={"questoin": "q"})
    with pytest.raises(ValueError, match="columns.image is null"):
        HFSource(path="x", columns={"image": None})
    with pytest.raises(ValueError, match="set data.source.path="):
        HFSource()


def test_unmapped_answer_keeps_rows_without_ground_truth(data_dir):
    src = source(data_dir / "disk", columns={"answer": None, "id": "id"})
    queries = src.queries("train", 0, 100, seed=0)
    assert "r102" in {q["id"] for q in queries}  # its empty answer is not read
    assert all(q["answer"] is None for q in queries)
    assert "empty_answer" not in src.skipped
    assert src.answer_space() == set()  # unknown


def test_answer_space_is_the_normalised_answers_seen_or_the_given_choices(data_dir):
    seen = source(data_dir / "disk").answer_space()
    assert {"red", "blue", "green", "gray", "white", "big"} <= seen and "" not in seen
    assert source(data_dir / "disk", split="test").answer_space() == {"red", "blue", "green"}
    assert source(data_dir / "disk", answer_choices=["Yes.", "No"]).answer_space() == {"yes", "no"}


def test_vqa_style_answer_lists_and_paths_to_image_files(tmp_path):
    import datasets

    yes_no = [{"answer": "yes"}, {"answer": "no"}, {"answer": "yes"}]
    rows = [{"img": "images/a.png", "q": "Is it dark?", "answers": yes_no},  # relative to the dataset folder
            {"img": str(tmp_path / "vqa" / "images" / "a.png"), "q": "Dark?", "answers": []},
            {"img": "images/missing.png", "q": "Here?", "answers": yes_no}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "vqa"))
    (tmp_path / "vqa" / "images").mkdir()
    Image.new("L", (20, 10), 50).save(tmp_path / "vqa" / "images" / "a.png")
    src = HFSource(path=str(tmp_path / "vqa"), columns={"image": "img", "question": "q", "answer": "answers"},
                   shuffle=False)
    queries = src.queries("train", 0, 3, seed=0)
    assert [(q["answer"], q["image"].mode, q["image"].size) for q in queries] == [("yes", "RGB", (20, 10))]
    assert dict(src.skipped) == {"empty_answer": 1, "missing_image_file": 1}


def test_hub_id_offline_fails_with_one_clear_message(monkeypatch):
    import socket

    from huggingface_hub import constants

    def unreachable(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    src = HFSource(path="HuggingFaceM4/ChartQA")
    with pytest.raises(DataUnavailable) as err:
        src.queries("train", 0, 3, seed=0)
    message = str(err.value)
    assert "'HuggingFaceM4/ChartQA'" in message and "cannot be reached" in message
    assert "data.source.path=/path/to/ChartQA" in message and "save_to_disk" in message

    import datasets

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataUnavailable, match=r"'HuggingFaceM4/ChartQA' could not be loaded.*HF_HUB_OFFLINE is set"):
        src.queries("train", 0, 3, seed=0)
    with pytest.raises(DataUnavailable, match="does not exist"):
        HFSource(path="/no/such/dataset").queries("train", 0, 3, seed=0)


def test_data_hf_composes_validates_and_feeds_the_stages(data_dir):
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from flows.schema import register, validate
    from tasks.common import eval_queries, round_queries

    register()
    with initialize_config_module("conf", version_base="1.3"):
        cfg = compose("config", overrides=[
            "data=hf", "eval=hf", f"data.source.path={data_dir / 'disk'}", "data.source.columns.id=id",
            "queries_per_round=3", "eval.size=4"])
        with pytest.raises(Exception, match="data.source.colums"):
            compose("config", overrides=["data=hf", "data.source.colums.answer=x"])
    validate(cfg)
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert plain["eval"]["source"]["path"] == str(data_dir / "disk")  # eval follows data by default
    assert plain["eval"]["source"]["columns"]["id"] == "id"
    round_1, round_2 = round_queries(plain, 1), round_queries(plain, 2)
    assert len(round_1) <= 3 and not {q["id"] for q in round_1} & {q["id"] for q in round_2}
    assert sorted(q["id"] for q in eval_queries(plain)) == ["r10", "r11", "r12", "r13"]


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_preference_pairs_train_in_trl_dpo_trainer_unchanged(tiny_model_dir, tmp_path):
    """The pair stage's dataset layout (tasks/pair.py) loads in TRL 1.16's DPOTrainer as is:
    the collator builds image+prompt+completion tensors and one optimiser step runs."""
    import datasets
    import torch

    from models.load import load_policy
    from models.records import assistant_message, user_prompt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl import DPOConfig, DPOTrainer

    pairs = [{"pair_id": f"p{i}", "query_id": f"q{i}", "prompt": user_prompt("What color is the circle?"),
              "images": [Image.new("RGB", (64, 64), (60 * i, 120, 30))], "chosen": assistant_message("red"),
              "rejected": assistant_message("blue"), "score_chosen": 1.0, "score_rejected": 0.0,
              "rejected_extra": [], "method": "seva", "ref_chosen_logp": -1.0, "ref_rejected_logp": -2.0}
             for i in range(2)]
    datasets.Dataset.from_list(pairs).save_to_disk(str(tmp_path / "pairs"))
    pair_set = datasets.load_from_disk(str(tmp_path / "pairs"))

    model_cfg = {"name_or_path": str(tiny_model_dir), "dtype": "float32", "device": "cpu", "lora": {"enabled": False}}
    model, processor = load_policy(model_cfg, None, trainable=True)
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=1, per_device_train_batch_size=2, report_to=[],
                     use_cpu=True, bf16=False, gradient_checkpointing=False, save_strategy="no", logging_steps=1,
                     dataloader_num_workers=0)
    trainer = DPOTrainer(model=model, args=args, train_dataset=pair_set, processing_class=processor)

    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 4  # chosen and rejected rows of 2 pairs
    assert batch["pixel_values"].shape == (4, 3, 64, 64)
    image_tokens = (batch["input_ids"] == model.config.image_token_id).sum(1)
    assert image_tokens.tolist() == [64] * 4  # the image placeholder in the prompt became 64 image tokens
    assert batch["completion_mask"].sum() > 0

    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    result = trainer.train()
    assert result.global_step == 1 and torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(before[k], v) for k, v in model.named_parameters())
