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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_patch_embedding_as_gemm_equals_the_convolution(dtype):
    """On a CPU the patch embedding runs as a GEMM (oneDNN's strided convolution is several times slower,
    backward most): the same outputs and input gradients as the convolution, at sizes that are and are not
    a multiple of the patch (the convolution drops the remainder), with the convolution's parameters."""
    import torch
    from atlasgen.model import PatchConv2d, patchify_as_gemm
    dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(3, 24, kernel_size=16, stride=16).to(dtype)
    ours = PatchConv2d(3, 24, kernel_size=16, stride=16).to(dtype)
    ours.load_state_dict(conv.state_dict())
    assert list(ours.state_dict()) == ["weight", "bias"]
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}
    for h, w in ((64, 64), (80, 48), (71, 90)):
        x = torch.rand(3, 3, h, w, generator=gen).to(dtype)
        x_conv, x_ours = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y_conv, y_ours = conv(x_conv), ours(x_ours)
        assert y_ours.shape == y_conv.shape == (3, 24, h // 16, w // 16)
        torch.testing.assert_close(y_ours, y_conv, **tol)
        grad_out = torch.randn(y_conv.shape, generator=gen).to(dtype)
        y_conv.backward(grad_out)
        y_ours.backward(grad_out)
        torch.testing.assert_close(x_ours.grad, x_conv.grad, **tol)
        assert x_ours.grad[..., (h // 16) * 16:, :].abs().sum() == 0  # pixels past the last patch: no gradient
    # Only a patchify convolution is replaced.
    overlapping = torch.nn.Sequential()
    overlapping.embeddings = torch.nn.Module()
    overlapping.embeddings.patch_embeddings = torch.nn.Conv2d(3, 8, kernel_size=16, stride=8)
    patchify_as_gemm(overlapping)
    assert type(overlapping.embeddings.patch_embeddings) is torch.nn.Conv2d


def test_patch_embedding_on_a_gpu_is_the_gemm_without_gradients_and_the_convolution_with(monkeypatch):
    """Off the CPU (here the meta device, which has no data: only which path runs is checked) the patch embedding
    is the GEMM where no gradient is needed (embed: no cuDNN first call at start-up) and the convolution where one
    is (render, whose GPU speed was measured with it)."""
    import torch
    from atlasgen.model import PatchConv2d
    conv_calls = []
    plain_forward = torch.nn.Conv2d.forward
    monkeypatch.setattr(torch.nn.Conv2d, "forward",
                        lambda self, x: conv_calls.append(tuple(x.shape)) or plain_forward(self, x))
    patch = PatchConv2d(3, 24, kernel_size=16, stride=16).to("meta")
    x = torch.empty(2, 3, 64, 48, device="meta")
    with torch.inference_mode():
        assert patch(x).shape == (2, 24, 4, 3)
    with torch.no_grad():
        patch(x)
    assert conv_calls == []
    assert patch(x.requires_grad_(True)).shape == (2, 24, 4, 3)
    assert conv_calls == [(2, 3, 64, 48)]
    patch.to_empty(device="cpu")  # on a CPU the GEMM, gradients or not
    patch(torch.zeros(2, 3, 64, 48, requires_grad=True))
    assert len(conv_calls) == 1


def test_loaded_models_embed_through_the_gemm_as_through_the_convolution(tmp_path):
    import torch
    from atlasgen.executor import PackedModel
    from atlasgen.model import PatchConv2d
    model = load_embedding_model("tiny", "cpu", "fp32", models_dir=tmp_path)
    conv = model.backbone.embeddings.patch_embeddings
    assert type(conv) is PatchConv2d
    assert type(PackedModel.pack(model).build(torch.device("cpu")).backbone.embeddings.patch_embeddings) is PatchConv2d
    pixels = torch.rand(4, 3, 112, 112, generator=torch.Generator().manual_seed(1), requires_grad=True)
    emb_gemm = model(pixels)
    grad_gemm, = torch.autograd.grad(emb_gemm.sum(), pixels)
    conv.__class__ = torch.nn.Conv2d
    emb_conv = model(pixels)
    grad_conv, = torch.autograd.grad(emb_conv.sum(), pixels)
    torch.testing.assert_close(emb_gemm, emb_conv, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad_gemm, grad_conv, rtol=1e-3, atol=1e-5)
