"""Model loading: the real checkpoint's failure modes are one clear line, fast, with no network."""
from __future__ import annotations

import time

import pytest

from atlasgen.errors import ModelLoadError
from atlasgen.model import DEFAULT_MODEL_ID, load_embedding_model


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def test_unreachable_hub_is_one_clear_error_in_seconds(empty_hub_cache, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_embedding_model(DEFAULT_MODEL_ID, "cpu")
    assert time.perf_counter() - t0 < 15
    assert "cannot reach" in info.value.message and DEFAULT_MODEL_ID in info.value.message
    assert "HF_TOKEN" in info.value.hint and "--model PATH" in info.value.hint and "--preset tiny" in info.value.hint


def test_offline_mode_without_cache_says_so(empty_hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="offline mode"):
        load_embedding_model(DEFAULT_MODEL_ID, "cpu")


def test_a_folder_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_embedding_model(str(tmp_path), "cpu")


def test_tiny_model_round_trips_through_save_pretrained(tmp_path):
    model = load_embedding_model("tiny", "cpu", "fp32", models_dir=tmp_path)
    assert (tmp_path / "tiny-dinov3" / "config.json").exists()
    assert model.backbone.config.num_register_tokens == 4
    again = load_embedding_model(str(tmp_path / "tiny-dinov3"), "cpu", "fp32")
    import torch
    pixels = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.allclose(model(pixels), again(pixels))
