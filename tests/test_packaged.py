"""Packaged models: parts found by package, joined once, checked before use."""
import hashlib
import importlib.metadata
import os

import pytest

from cai_jax.weights import packaged
from cai_jax.weights.packaged import PackagedModel, PackagedModelError


class _FakeDist:
    def __init__(self, root):
        self.root = root

    def locate_file(self, inner):
        return os.path.join(self.root, inner)


def _fake_model(tmp_path, monkeypatch, contents, size=None, sha=None):
    dists = {}
    parts = []
    for i, data in enumerate(contents, 1):
        root = tmp_path / f"site{i}"
        (root / f"fake_part{i}" / "data").mkdir(parents=True)
        (root / f"fake_part{i}" / "data" / f"part{i:02d}.bin").write_bytes(data)
        dists[f"fake-part{i}"] = _FakeDist(str(root))
        parts.append((f"fake-part{i}", f"fake_part{i}/data/part{i:02d}.bin"))

    def distribution(name):
        if name not in dists:
            raise importlib.metadata.PackageNotFoundError(name)
        return dists[name]

    monkeypatch.setattr(packaged.importlib.metadata, "distribution", distribution)
    whole = b"".join(contents)
    model = PackagedModel(name="fake-model", install='pip install -e ".[fake]"',
                          parts=tuple(parts), size=len(whole) if size is None else size,
                          sha256=hashlib.sha256(whole).hexdigest() if sha is None else sha)
    monkeypatch.setitem(packaged.PACKAGED_MODELS, "fake-model", model)
    monkeypatch.setenv("CAI_JAX_CACHE", str(tmp_path / "cache"))
    return whole


def test_parts_are_joined_in_order_once(tmp_path, monkeypatch):
    whole = _fake_model(tmp_path, monkeypatch, [b"first-", b"second-", b"third"])
    path = packaged.packaged_gguf_path("fake-model")
    assert open(path, "rb").read() == whole == b"first-second-third"
    stamp = os.stat(path).st_mtime_ns
    assert packaged.packaged_gguf_path("fake-model") == path
    assert os.stat(path).st_mtime_ns == stamp  # not joined again
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"


def test_a_wrong_part_is_an_error_naming_the_packages_and_nothing_is_kept(tmp_path, monkeypatch):
    _fake_model(tmp_path, monkeypatch, [b"abc", b"def"], sha="0" * 64)
    with pytest.raises(PackagedModelError, match=r"fake-part1, fake-part2.*reinstall"):
        packaged.packaged_gguf_path("fake-model")
    assert not os.listdir(tmp_path / "cache" / "models")  # no half-checked file left behind


def test_a_missing_package_names_it_and_the_extra(tmp_path, monkeypatch):
    _fake_model(tmp_path, monkeypatch, [b"abc"])
    model = packaged.PACKAGED_MODELS["fake-model"]
    monkeypatch.setitem(packaged.PACKAGED_MODELS, "fake-model", PackagedModel(
        **{**model.__dict__, "parts": model.parts + (("fake-part9", "x/part09.bin"),)}))
    with pytest.raises(PackagedModelError, match=r"needs the PyPI package fake-part9.*\[fake\]"):
        packaged.packaged_gguf_path("fake-model")


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="qwen2.5-coder-0.5b-instruct"):
        packaged.packaged_gguf_path("gpt-5")


def _setup_extras() -> dict:
    """extras_require as setup.py declares it (names exactly as written)."""
    import ast

    path = os.path.join(os.path.dirname(__file__), "..", "setup.py")
    tree = ast.parse(open(path).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    extras = next(k.value for k in call.keywords if k.arg == "extras_require")
    return {key.value: value for key, value in zip(extras.keys, extras.values)}


def test_extra_names_survive_normalisation_and_every_install_hint_names_one():
    import re

    extras = _setup_extras()
    # setuptools writes extras normalised (PEP 685: runs of "-_." become "-");
    # some pip versions compare the requested name unnormalised, so "qwen-0.5b"
    # was silently not installed. Only already-normal names are safe.
    for name in extras:
        assert re.sub(r"[-_.]+", "-", name).lower() == name, name
    for model in packaged.PACKAGED_MODELS.values():
        wanted = re.search(r'"\.\[([^\]]+)\]"', model.install)
        if wanted:
            assert set(wanted.group(1).split(",")) <= set(extras), model.install
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    for group in re.findall(r'pip install -e "\.\[([^\]]+)\]"', readme):
        assert set(group.split(",")) <= set(extras), group
