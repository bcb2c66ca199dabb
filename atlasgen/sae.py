"""The sparse autoencoder (SAE) as in the seed study: ReLU, L1 penalty, unit-norm decoder rows.

Inputs are normalised before encoding: x = (embedding − corpus mean) × scale, with the scalar
`scale` chosen so that E‖x‖² = d_in on the training corpus. Decoder rows (`W_dec[i]`) are unit
vectors in that space; since the normalisation is a shift plus a scalar, a feature's direction in
embedding space (around the corpus mean) is the same unit vector.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import StageInputError
from .paths import as_umask_allows, atomic_path

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "sae.json"


class SparseAutoencoder(torch.nn.Module):
    def __init__(self, d_in: int, n_features: int):
        super().__init__()
        self.d_in, self.n_features = d_in, n_features
        self.W_enc = torch.nn.Parameter(torch.empty(d_in, n_features))
        self.b_enc = torch.nn.Parameter(torch.zeros(n_features))
        self.W_dec = torch.nn.Parameter(torch.empty(n_features, d_in))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in))
        self.register_buffer("input_mean", torch.zeros(d_in))
        self.register_buffer("input_scale", torch.ones(()))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        w = torch.randn(self.n_features, self.d_in, generator=generator)
        self.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        self.W_enc.copy_(self.W_dec.t())
        self.b_enc.zero_()
        self.b_dec.zero_()

    def normalize(self, emb_nd: torch.Tensor) -> torch.Tensor:
        return (emb_nd - self.input_mean) * self.input_scale

    def encode(self, x_nd: torch.Tensor) -> torch.Tensor:
        """Normalised inputs → non-negative feature activations (N, F)."""
        return torch.relu((x_nd - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, acts_nf: torch.Tensor) -> torch.Tensor:
        return acts_nf @ self.W_dec + self.b_dec

    def forward(self, x_nd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        acts_nf = self.encode(x_nd)
        return self.decode(acts_nf), acts_nf

    def encode_embeddings(self, emb_nd: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
        """Raw model embeddings → activations, keeping only the `top_k` largest per row if given."""
        acts_nf = self.encode(self.normalize(emb_nd.float()))
        if top_k is not None and top_k < acts_nf.shape[1]:
            values_nk, idx_nk = acts_nf.topk(top_k, dim=1)
            acts_nf = torch.zeros_like(acts_nf).scatter_(1, idx_nk, values_nk)
        return acts_nf

    def feature_directions(self) -> torch.Tensor:
        """Unit decoder rows (F, d_in): each feature's direction."""
        w = self.W_dec.detach()
        return w / w.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    def save(self, folder: Path, extra_config: dict | None = None) -> None:
        """Write `sae.safetensors` and `sae.json` into `folder` (each via a temp name)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / WEIGHTS_FILE) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(tmp))
            as_umask_allows(tmp)
        with atomic_path(folder / CONFIG_FILE) as tmp:
            tmp.write_text(json.dumps({"d_in": self.d_in, "n_features": self.n_features, "activation": "relu",
                                       "decoder_norm": "unit", **(extra_config or {})}, indent=2))

    @classmethod
    def load(cls, folder: Path) -> "SparseAutoencoder":
        folder = Path(folder)
        if folder.suffix == ".safetensors":
            folder = folder.parent
        config = json.loads((folder / CONFIG_FILE).read_text())
        sae = cls(int(config["d_in"]), int(config["n_features"]))
        sae.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
        # A loaded SAE is for inference: frozen, so its outputs are plain tensors (gradients still flow
        # to the inputs, e.g. pixels in render).
        return sae.eval().requires_grad_(False)


def load_stage_sae(store, used_by: str = "encode") -> tuple[SparseAutoencoder, str]:
    """(SAE, run id) of the training run a finished stage used, as its summary records it: "train" for the
    run it made, "encode" (the default) for the run whose activations the store holds, which is the one
    render, probe, decompose and the site must use."""
    run = store.sae_run_used_by(used_by)
    if run is None:
        raise StageInputError(f"the store has no trained SAE used by the {used_by} stage",
                              f"run `atlasgen {used_by}` (or `atlasgen build`) first")
    folder = Path(run["weights_path"]).parent
    out = store.paths.out_dir
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / name).is_file()]
    if missing:
        raise StageInputError(f"the SAE files of train run {run['run_id']} are missing: "
                              f"{', '.join(str(folder / m) for m in missing)}",
                              f"run `atlasgen build --out {out}`: it trains the SAE again (same config, same result)")
    try:
        return SparseAutoencoder.load(folder), run["run_id"]
    except Exception as e:  # a damaged file: safetensors, json and torch raise many kinds
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise StageInputError(f"the SAE files in {folder} cannot be read: {text}",
                              f"delete {folder} and run `atlasgen build --out {out}`: it trains the SAE again") from None
