"""TFDS builders that turn our data into array_record datasets.

They write `file_format="array_record"` and are read back with
`builder.as_data_source()`, a random-access source that grain can use
directly. Neither step needs TensorFlow (checked with tensorflow-datasets
4.9.10 and no TensorFlow installed): the generator-based writer and the
array_record data source are pure Python. Avoid `as_dataset()`, which does
need TensorFlow.

A prepared dataset lives in `<data_dir>/<builder name>/<config name>/<version>`
and is reused as it is by later calls with the same name, so give a new
`name` when the input files change.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from cai_jax.data.conversation import Turn
from cai_jax.data.hh_rlhf import PreferencePair, ReadStats, read_pairs
from cai_jax.data.prompt_sets import Prompt, embedded_prompts

FILE_FORMAT = "array_record"


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base for our builders, which read local files only.

    They are not registered with tfds: they need constructor arguments, so
    `tfds.builder(name)` could not build them anyway.

    tfds looks up `code_path` to find download checksums. For a builder
    defined inside a package, tfds 4.9.10 then imports the `importlib_resources`
    backport, which it only declares for Python < 3.9, and fails. We download
    nothing, so there are no checksums to find.
    """

    code_path = None


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class HhPreferencePairs(_LocalBuilder, skip_registration=True):
    """Preference pairs read from HH-format `.jsonl(.gz)` files.

    `split_files` maps a split name to one file or a list of files. Each
    example holds the context turns, the chosen and rejected answers, and the
    source file and line for tracing a bad example back to its origin.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}

    def __init__(self, *, split_files: Mapping[str, str | os.PathLike | Sequence[str | os.PathLike]],
                 name: str = "default", on_error: str = "raise", **kwargs):
        self._split_files = {
            split: [os.fspath(files)] if isinstance(files, (str, os.PathLike)) else [os.fspath(f) for f in files]
            for split, files in split_files.items()}
        self._on_error = on_error
        self.read_stats: dict[str, ReadStats] = {}
        kwargs.setdefault("file_format", FILE_FORMAT)
        super().__init__(config=tfds.core.BuilderConfig(name=name), **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="HH-RLHF style preference pairs (context, chosen, rejected).",
            features=tfds.features.FeaturesDict({
                "context": tfds.features.Sequence({
                    "role": tfds.features.Text(),
                    "content": tfds.features.Text(),
                }),
                "chosen": tfds.features.Text(),
                "rejected": tfds.features.Text(),
                "source": tfds.features.Text(),
                "line": np.int64,
            }),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # local files only, nothing to download
        return {split: self._generate_examples(split, files) for split, files in self._split_files.items()}

    def _generate_examples(self, split: str, files: Sequence[str]):
        stats = self.read_stats.setdefault(split, ReadStats())
        for file_index, path in enumerate(files):
            for pair in read_pairs(path, on_error=self._on_error, stats=stats):
                # Keys must be unique within a split, even across same-named files.
                yield f"{file_index}:{pair.line}", {
                    "context": {"role": [t.role for t in pair.context],
                                "content": [t.content for t in pair.context]},
                    "chosen": pair.chosen,
                    "rejected": pair.rejected,
                    "source": pair.source,
                    "line": pair.line,
                }


class CaiPromptSet(_LocalBuilder, skip_registration=True):
    """One of the embedded prompt sets ("red_team" or "helpful"), with its train/test splits."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}

    def __init__(self, *, kind: str = "red_team", **kwargs):
        self._kind = kind
        kwargs.setdefault("file_format", FILE_FORMAT)
        super().__init__(config=tfds.core.BuilderConfig(name=kind), **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Prompts written for cai-jax.",
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "category": tfds.features.Text(),
                "text": tfds.features.Text(),
            }),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in ("train", "test")}

    def _generate_examples(self, split: str):
        for p in embedded_prompts(self._kind, split):
            yield p.id, {"id": p.id, "category": p.category, "text": p.text}


def prepare_hh_pairs(split_files, data_dir: str | os.PathLike, *, name: str = "default",
                     on_error: str = "raise") -> HhPreferencePairs:
    """Writes (or reuses) the array_record dataset and returns its builder.

    `builder.read_stats` (per split) is filled only when the data is written,
    not when an existing copy is reused.
    """
    builder = HhPreferencePairs(split_files=split_files, name=name, on_error=on_error,
                                data_dir=os.fspath(data_dir))
    builder.download_and_prepare()
    return builder


def prepare_prompt_set(kind: str, data_dir: str | os.PathLike) -> CaiPromptSet:
    builder = CaiPromptSet(kind=kind, data_dir=os.fspath(data_dir))
    builder.download_and_prepare()
    return builder


def decode_pair(record: Mapping[str, Any]) -> PreferencePair:
    """Turns a record from `as_data_source()` back into a PreferencePair."""
    context = tuple(Turn(_text(r), _text(c))
                    for r, c in zip(record["context"]["role"], record["context"]["content"]))
    return PreferencePair(context, _text(record["chosen"]), _text(record["rejected"]),
                          int(record["line"]), _text(record["source"]))


def decode_prompt(record: Mapping[str, Any], kind: str = "") -> Prompt:
    return Prompt(_text(record["id"]), _text(record["category"]), _text(record["text"]), kind)
