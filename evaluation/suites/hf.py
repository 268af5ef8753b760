"""Any Hugging Face dataset as a query source (conf/data/hf.yaml, conf/eval/hf.yaml).

Loads, by ``format`` (``auto`` picks from the path):

    disk     a ``save_to_disk`` directory (Dataset or DatasetDict)   datasets.load_from_disk
    parquet  a .parquet file, a glob, or a folder of parquet files  load_dataset("parquet", ...)
    hub      a hub id such as ``HuggingFaceM4/ChartQA``              load_dataset(id); needs the
             hub (or the local HF cache with HF_HUB_OFFLINE=1). Offline it fails at once with one
             message naming the dataset and how to point ``path`` at a local copy.

``path`` may contain ``{split}`` (``/data/vqa/{split}.parquet``). A dataset without splits (a
single Dataset, a single parquet file) serves every split name; use a slice to keep the pool
and the benchmark apart: ``data.split='train[:90%]'``, ``eval.split='train[90%:]'`` (slices
``name[a:b]`` with row counts or percentages work for every format; the name may be left out).

Columns are mapped by ``columns`` ({image, question, answer, boxes, target_box, id, qtype} ->
the dataset's column names; null = not in the dataset). ``image`` and ``question`` are
required; with ``answer: null`` queries carry ``answer=None`` (fine for judges that need no
ground truth; the correctness judge refuses them with a clear message).

Rows: ``queries(split, start, stop, seed)`` returns the usable rows among rows [start, stop)
of the split in a fixed order (a seeded permutation with ``shuffle``), so round i reads its own
rows and a resumed run reads the same ones. Rows that cannot be used are skipped, counted in
``self.skipped`` and logged to the ``prefloop`` logger (the first few individually, then one
summary line per call), so a round may get fewer than stop - start queries, never silently:

    no_image         the row has no image (text-only): PrefLoop's VLM prompts need one
    corrupt_image    the image bytes/file cannot be decoded (or exceed PIL's pixel limit)
    missing_image_file  a path-valued image column names a file that does not exist
                     (relative paths: to the working directory, else to the dataset folder)
    empty_question   the question is empty
    empty_answer     ``columns.answer`` is mapped but the row's answer is empty
    bad_boxes        ``boxes`` / ``target_box`` is not a list of [x0, y0, x1, y1]
    duplicate_id     an id already used in the same slice (ids key the pair stage's lookup)

``check(split)`` reads only the layout (path or hub id, split, mapped columns) and raises
DataUnavailable naming the fix; ``python -m flows.iterate`` runs it before any stage.

Images are normalised, counted in ``self.converted``: grayscale / palette / CMYK -> RGB,
RGBA -> RGB over white (``to_rgb``); longer side > ``image_max_side`` -> downscaled with
Lanczos, boxes scaled with it (``downscaled``).

``answer_space()``: ``answer_choices`` when given; otherwise the normalised answers seen in the
dataset (every split, or ``split`` when set; the train file of a ``{split}`` path; every answer
of a list-valued answer column), so the evaluate stage's malformed rate means "an answer no
row of the dataset has"; the empty set when no answer column is mapped (no answer space known).
"""

from __future__ import annotations

import glob
import io
import logging
import os
import re
import socket
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
from PIL import Image

from evaluation.metrics import normalise
from models.records import Query

log = logging.getLogger("prefloop")

COLUMN_KEYS = ("image", "question", "answer", "boxes", "target_box", "id", "qtype")
DEFAULT_COLUMNS = {"image": "image", "question": "question", "answer": "answer", "boxes": None,
                   "target_box": None, "id": None, "qtype": None}
FORMATS = ("auto", "disk", "parquet", "hub")
SKIP_REASONS = ("no_image", "corrupt_image", "missing_image_file", "empty_question", "empty_answer", "bad_boxes", "duplicate_id")
LOGGED_PER_REASON = 3  # individual log lines per skip reason and call; the rest are counted
_SLICE = re.compile(r"^(?P<name>[^\[\]]*)\[(?P<a>-?\d+%?)?:(?P<b>-?\d+%?)?\]$")


class DataUnavailable(ValueError):
    """A dataset that cannot be read as configured (path, hub, split, columns, rows); the message
    names it and says how to fix the config. A ValueError, so the stage fails at once instead of
    retrying; the CLI prints the message alone."""


@dataclass
class HFSource:
    """A query source over any Hugging Face dataset. See the module docstring."""

    path: str = ""  # save_to_disk dir | parquet file / glob / folder | hub id; may hold {split}
    format: str = "auto"  # auto | disk | parquet | hub
    subset: str | None = None  # hub config name (load_dataset's ``name``)
    split: str | None = None  # dataset split to read; None: the split the flow asks for
    columns: dict[str, str | None] = field(default_factory=lambda: dict(DEFAULT_COLUMNS))
    answer_choices: list[str] | None = None  # the answer space; None: answers seen in the data
    default_qtype: str = "vqa"  # question type when columns.qtype is null
    image_max_side: int = 1024  # downscale larger images (0: never)
    shuffle: bool = True  # read rows in a seeded permutation (False: dataset order)
    cache_dir: str | None = None  # datasets' cache for parquet / hub loads (None: HF default)
    # Not read by this source: model=tiny builds its model from ${data.source.suite} (the shapes
    # suite's ShapesSpec overrides), so every data option carries one, as judge_pairs does.
    suite: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("the hf data source needs a dataset: set data.source.path=<save_to_disk dir | "
                             "parquet file or folder | hub id> (and eval.source.path with eval=hf)")
        if self.format not in FORMATS:
            raise ValueError(f"source.format={self.format!r} is not one of {', '.join(FORMATS)}")
        unknown = set(self.columns) - set(COLUMN_KEYS)
        if unknown:
            raise ValueError(f"unknown source.columns keys {sorted(unknown)}; known: {list(COLUMN_KEYS)}")
        self.columns = DEFAULT_COLUMNS | dict(self.columns)
        for key in ("image", "question"):
            if not self.columns[key]:
                raise ValueError(f"source.columns.{key} is null, but every PrefLoop query needs an {key}: "
                                 f"set data.source.columns.{key}=<column name>")
        self.skipped: Counter = Counter()
        self.converted: Counter = Counter()

    # ------------------------------------------------------------------ public API

    def queries(self, split: str, start: int, stop: int, seed: int) -> list[Query]:
        """Usable rows among rows [start, stop) of ``split`` (see the module docstring)."""
        ds, split_name, rows = self._rows(split)
        if start >= len(rows):
            raise DataUnavailable(
                f"dataset {self.path!r} split {split_name!r} has {len(rows)} rows, but rows "
                f"[{start}, {stop}) were asked for: lower queries_per_round / rounds (data) or eval.size (eval)")
        if self.shuffle:
            rows = rows[np.random.default_rng(seed).permutation(len(rows))]
        wanted = rows[start:stop]
        if stop > len(rows):
            log.warning("dataset %r split %r has %d rows; returning rows [%d, %d) instead of [%d, %d)",
                        self.path, split_name, len(rows), start, len(rows), start, stop)
        ds = self._check_columns(ds)
        ds = _undecoded(ds, self.columns["image"])
        base = self.name()
        before_skip, before_conv = Counter(self.skipped), Counter(self.converted)
        logged: Counter = Counter()
        seen: set[str] = set()
        out: list[Query] = []
        for row_index, row in zip(wanted.tolist(), ds.select(wanted)):
            query, reason, detail = self._query(row, row_index, split_name, base)
            if query is not None and query["id"] in seen:
                query, reason, detail = None, "duplicate_id", f"id {query['id']!r} repeats"
            if query is None:
                self.skipped[reason] += 1
                logged[reason] += 1
                if logged[reason] <= LOGGED_PER_REASON:
                    log.warning("%s: skipping row %d of split %r (%s): %s", base, row_index, split_name,
                                reason, detail)
                continue
            seen.add(query["id"])
            out.append(query)
        skipped = self.skipped - before_skip
        converted = self.converted - before_conv
        if skipped or converted:
            log.warning("%s split %r rows [%d, %d): %d queries; skipped %s; converted images %s",
                        base, split_name, start, min(stop, len(rows)), len(out),
                        dict(skipped) or "none", dict(converted) or "none")
        return out

    def check(self, split: str) -> None:
        """Raise DataUnavailable now, decoding no row, if ``split`` cannot be read as configured:
        the path (or hub id), the split name and every mapped column. The CLI calls this before
        any stage, so a typo in a column name fails in seconds, not after the model is built."""
        ds, split_name, rows = self._rows(split)
        if not len(rows):
            raise DataUnavailable(f"dataset {self.path!r} split {split_name!r} has no rows; set data.split / "
                                  "eval.split to a split (or slice) that has some")
        self._check_columns(ds)

    def answer_space(self) -> set[str]:
        """Normalised answers a response is checked against (the evaluate stage's malformed rate)."""
        if self.answer_choices is not None:
            return {normalise(str(a)) for a in self.answer_choices}
        column = self.columns["answer"]
        if not column:
            return set()
        loaded = self._load(self.split or "train")
        if hasattr(loaded, "keys") and self.split is None:
            parts = list(loaded.values())  # every split
        else:
            parts = [self._pick(loaded, self.split)[0]]
        answers: set[str] = set()
        for ds in parts:
            self._check_columns(ds, only=("answer",))
            for value in ds.select_columns([column])[column]:
                for text in _answer_texts(value):
                    if normalise(text):
                        answers.add(normalise(text))
        return answers

    def name(self) -> str:
        """A short name for ids and log lines: the hub id or the path's last component."""
        local = Path(self.path.replace("{split}", "split").rstrip("/"))
        stem = local.stem if local.suffix == ".parquet" else local.name
        return f"hf:{self.path if self._kind() == 'hub' else stem}"

    # ------------------------------------------------------------------ loading

    def _kind(self) -> str:
        if self.format != "auto":
            return self.format
        path = self.path
        if any(ch in path for ch in "*?[") or path.endswith(".parquet"):
            return "parquet"
        local = Path(os.path.expanduser(path.replace("{split}", "*")))
        candidates = [Path(p) for p in glob.glob(str(local))] if "{split}" in path else [local]
        for p in candidates:
            if (p / "dataset_dict.json").exists() or (p / "state.json").exists():
                return "disk"
            if p.is_file() or p.is_dir():
                return "parquet"
        if path.startswith(("/", ".", "~")) or "{split}" in path:
            raise DataUnavailable(f"dataset path {path!r} does not exist (working directory {os.getcwd()}); "
                                  "set data.source.path to a save_to_disk directory, a parquet file or folder, "
                                  "or a hub id")
        return "hub"

    def _load(self, split: str):
        """The dataset (Dataset or DatasetDict) for ``split``'s base name (``{split}`` filled in)."""
        import datasets

        base_split = _parse_split(split)[0] or "train"
        path = os.path.expanduser(self.path.replace("{split}", base_split))
        kind = self._kind()
        if kind == "disk":
            try:
                return datasets.load_from_disk(path)
            except FileNotFoundError as err:
                raise DataUnavailable(f"{path!r} is not a save_to_disk directory ({err}); set "
                                      "data.source.format=parquet for parquet files") from None
        if kind == "parquet":
            if Path(path).is_dir():
                files = sorted(str(p) for p in Path(path).rglob("*.parquet"))
                if not files:
                    raise DataUnavailable(f"folder {path!r} holds neither a save_to_disk dataset nor .parquet files")
                if len(files) > 1 and "{split}" not in self.path:
                    # let datasets infer splits from file names (train-*.parquet, test-*.parquet, ...)
                    return datasets.load_dataset("parquet", data_dir=path, cache_dir=self.cache_dir)
                return datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=self.cache_dir)
            if not glob.glob(path):
                raise DataUnavailable(f"no parquet file matches {path!r}; set data.source.path to an existing "
                                      "file, glob or folder")
            return datasets.load_dataset("parquet", data_files=path, split="train", cache_dir=self.cache_dir)
        return self._load_hub(path)

    def _load_hub(self, name: str):
        import datasets
        from huggingface_hub import constants

        target = name.split("/")[-1]
        how = (f"Get a local copy where the hub is reachable: `hf download {name} --repo-type dataset "
               f"--local-dir /path/to/{target}` (parquet files) or `datasets.load_dataset({name!r})"
               f".save_to_disk('/path/to/{target}')`; copy it here and set data.source.path=/path/to/{target} "
               "(and eval.source.path with eval=hf).")
        if not constants.HF_HUB_OFFLINE:
            host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
            try:
                socket.create_connection((host, 443), timeout=3.0).close()
            except OSError as err:
                raise DataUnavailable(f"Dataset {name!r} is not a local path and the Hugging Face Hub ({host}) "
                                      f"cannot be reached: {err}. {how} (A copy in the local HF cache is used "
                                      "with HF_HUB_OFFLINE=1.)") from None
        try:
            return datasets.load_dataset(name, self.subset, cache_dir=self.cache_dir)
        except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetsError) as err:
            offline = " and HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else ""
            raise DataUnavailable(f"Dataset {name!r} could not be loaded from the hub or the local cache"
                                  f"{offline}: {type(err).__name__}: {err}. {how}") from None

    def _pick(self, loaded, split: str):
        """(Dataset, split name) from a Dataset or DatasetDict."""
        base = _parse_split(split)[0]
        if not hasattr(loaded, "keys"):
            if base and base != "train" and split == base:
                log.warning("dataset %r has no splits: split %r reads the same rows as every other split; keep "
                            "the pool and the benchmark apart with slices, e.g. data.split='train[:90%%]' "
                            "eval.split='train[90%%:]'", self.path, base)
            return loaded, base or "all"
        if not base and len(loaded) == 1:
            base = next(iter(loaded))
        if base not in loaded:
            raise DataUnavailable(f"dataset {self.path!r} has splits {sorted(loaded)}, not {base!r}: set data.split / "
                             "eval.split (or source.split) to one of them, or slice one, e.g. 'train[90%:]'")
        return loaded[base], base

    def _rows(self, split: str):
        """(Dataset, split label, row indices of the slice) for the requested split."""
        split = self.split or split
        ds, name = self._pick(self._load(split), split)
        _, a, b = _parse_split(split)
        n = len(ds)
        rows = np.arange(n)[slice(_bound(a, n), _bound(b, n))]
        label = split if (a or b) else name
        return ds, label, rows

    def _check_columns(self, ds, only: tuple[str, ...] = COLUMN_KEYS):
        available = list(ds.column_names)
        for key in only:
            column = self.columns.get(key)
            if column and column not in available:
                hint = " (or null if the dataset has none)" if key not in ("image", "question") else ""
                raise DataUnavailable(
                    f"column {column!r} (source.columns.{key}) is not in dataset {self.path!r}; available columns: "
                    f"{sorted(available)}. Fix it with data.source.columns.{key}=<column>{hint} "
                    f"(eval.source.columns.{key} for eval=hf)")
        return ds

    # ------------------------------------------------------------------ rows

    def _query(self, row: dict, row_index: int, split_name: str, base: str):
        """(Query, None, None) or (None, skip reason, detail)."""
        c = self.columns
        question = row[c["question"]]
        question = "" if question is None else str(question).strip()
        if not question:
            return None, "empty_question", "the question is empty"
        answer = None
        if c["answer"]:
            texts = [t for t in _answer_texts(row[c["answer"]]) if t.strip()]
            if not texts:
                return None, "empty_answer", f"column {c['answer']!r} is empty"
            answer = Counter(texts).most_common(1)[0][0].strip()  # majority answer (VQAv2 lists)
        value = row[c["image"]]
        if isinstance(value, list):  # a list-of-images column: the first image
            value = value[0] if value else None
        if value is None or value == "" or (isinstance(value, dict) and not value.get("bytes")
                                            and not value.get("path")):
            return None, "no_image", "text-only row (no image); PrefLoop's VLM prompts need one"
        try:
            image, original_width = self._open(value)
        except FileNotFoundError as err:
            return None, "missing_image_file", f"no image file {err.filename!r}"
        except (OSError, SyntaxError, ValueError, TypeError, Image.DecompressionBombError) as err:
            message = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "(the row's bytes)", str(err))
            return None, "corrupt_image", f"cannot decode the image: {type(err).__name__}: {message}"
        image = self._normalise(image)
        scale = image.width / original_width  # boxes are in the file's pixels
        try:
            boxes = _boxes(row[c["boxes"]], many=True) if c["boxes"] else []
            target = _boxes(row[c["target_box"]], many=False) if c["target_box"] else []
        except ValueError as err:
            return None, "bad_boxes", str(err)
        query = Query(
            id=str(row[c["id"]]) if c["id"] and row[c["id"]] is not None else f"{base}-{split_name}-{row_index}",
            image=image,
            question=question,
            answer=answer,
            qtype=str(row[c["qtype"]]) if c["qtype"] and row[c["qtype"]] is not None else self.default_qtype,
            boxes=[[v * scale for v in b] for b in boxes],
            target_box=[v * scale for v in target],
            source=base,
        )
        return query, None, None

    def _open(self, value) -> tuple[Image.Image, int]:
        """The decoded image and the width of the file's image (before any JPEG draft scaling)."""
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict) and value.get("bytes"):
            image = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        else:
            path = value["path"] if isinstance(value, dict) else str(value)
            if not os.path.isabs(path) and not os.path.exists(path):
                root = Path(os.path.expanduser(self.path))
                path = str((root if root.is_dir() else root.parent) / path)  # relative to the dataset
            image = Image.open(path)
        width = image.width
        if self.image_max_side and image.format == "JPEG":
            image.draft("RGB", (self.image_max_side, self.image_max_side))  # cheap JPEG downscale on decode
        image.load()
        return image, width

    def _normalise(self, image: Image.Image) -> Image.Image:
        """RGB (alpha composited over white), longer side <= image_max_side."""
        if image.mode != "RGB":
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                image = Image.new("RGB", rgba.size, (255, 255, 255))
                image.paste(rgba, mask=rgba.getchannel("A"))
            else:
                image = image.convert("RGB")
            self.converted["to_rgb"] += 1
        longest = max(image.size)
        if self.image_max_side and longest > self.image_max_side:
            s = self.image_max_side / longest
            image = image.resize((max(1, round(image.width * s)), max(1, round(image.height * s))),
                                 Image.Resampling.LANCZOS)
            self.converted["downscaled"] += 1
        return image


def _undecoded(ds, column: str):
    """The dataset with its image column left as {bytes, path}, so a corrupt file is caught per
    row (datasets would raise while iterating) and decoding happens once, here."""
    import datasets

    feature = ds.features.get(column)
    if isinstance(feature, datasets.Image) and feature.decode:
        return ds.cast_column(column, datasets.Image(decode=False))
    inner = getattr(feature, "feature", None)
    if isinstance(inner, datasets.Image) and inner.decode:
        return ds.cast_column(column, datasets.List(datasets.Image(decode=False)))
    return ds


def _answer_texts(value: Any) -> list[str]:
    """The answer strings of one cell: a string, a number, a bool, or a list of strings or of
    {"answer": ...} dicts (VQAv2)."""
    if value is None:
        return []
    if isinstance(value, bool):
        return ["yes" if value else "no"]
    if isinstance(value, dict):
        return _answer_texts(value.get("answer", value.get("text")))
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _answer_texts(v)]
    return [str(value)]


def _boxes(value: Any, many: bool) -> list:
    """[[x0, y0, x1, y1], ...] (many) or [x0, y0, x1, y1] / [] (one) as floats; ValueError otherwise."""
    if value is None:
        return []
    values = list(value)
    if not values:
        return []
    if many:
        if not isinstance(values[0], (list, tuple, np.ndarray)):
            values = [values]  # one flat box
        return [_box(b) for b in values]
    return _box(values)


def _box(value) -> list[float]:
    box = list(value) if isinstance(value, (list, tuple, np.ndarray)) else None
    if box is None or len(box) != 4:
        raise ValueError(f"a box must be [x0, y0, x1, y1], got {value!r}")
    try:
        return [float(v) for v in box]
    except (TypeError, ValueError):
        raise ValueError(f"a box must hold numbers, got {value!r}") from None


def _parse_split(split: str) -> tuple[str, str | None, str | None]:
    """'train[10%:90%]' -> ('train', '10%', '90%'); 'test' -> ('test', None, None)."""
    m = _SLICE.match(split or "")
    if not m:
        return split, None, None
    return m["name"], m["a"], m["b"]


def _bound(value: str | None, n: int) -> int | None:
    if value is None:
        return None
    if value.endswith("%"):
        return round(n * int(value[:-1]) / 100)
    return int(value)
