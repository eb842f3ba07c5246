"""The head-pose VAE: a small Transformer VAE that maps z-normalized head pose to the 8-d latent
the flow model generates, and back.

Module names follow the published `head_vae/iter-0500000.pt` exactly, so its `model_state_dict`
loads with strict=True. Inputs are already z-normalized; normalization statistics live with the
caller (see avflow.train.head_vae).
The published file's layout: docs/reference.md, "Head VAE".
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from avflow.config import HeadVAEConfig


def _transformer(cfg: HeadVAEConfig) -> nn.TransformerEncoder:
    """The published encoder/decoder body: PyTorch's post-norm ReLU TransformerEncoder, batch first."""
    layer = nn.TransformerEncoderLayer(
        d_model=cfg.hidden,
        nhead=cfg.n_heads,
        dim_feedforward=cfg.ffn_hidden,
        dropout=cfg.dropout,
        batch_first=True,
    )
    # Nested tensors only pay off for inference on padded batches and warn for this layer shape.
    return nn.TransformerEncoder(layer, num_layers=cfg.n_layers, enable_nested_tensor=False)


class HeadVAE(nn.Module):
    """pose (B, T, pose_dim) -> per-frame latent (B, T, latent_dim) -> pose.

    An optional `mask` (B, T), True on real frames, keeps padded frames out of attention and the loss,
    so a padded crop (with finite padding values) behaves exactly like the unpadded one.
    """

    def __init__(self, cfg: HeadVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = nn.Sequential(nn.Linear(cfg.pose_dim, cfg.hidden), _transformer(cfg))
        self.fc_mu = nn.Linear(cfg.hidden, cfg.latent_dim)
        self.fc_var = nn.Linear(cfg.hidden, cfg.latent_dim)
        self.decoder_input = nn.Linear(cfg.latent_dim, cfg.hidden)
        self.decoder = nn.Sequential(_transformer(cfg))
        self.final_layer = nn.Linear(cfg.hidden, cfg.pose_dim)

    def encode(self, pose: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (mu, logvar), each (B, T, latent_dim); mu is the flow model's head target."""
        self._check_input(pose, self.cfg.pose_dim, "pose", mask)
        hidden = self.encoder[0](pose)
        hidden = self.encoder[1](hidden, src_key_padding_mask=_padding_mask(mask))
        return self.fc_mu(hidden), self.fc_var(hidden)

    def decode(self, latent: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Map latents (B, T, latent_dim) back to z-normalized pose (B, T, pose_dim)."""
        self._check_input(latent, self.cfg.latent_dim, "latent", mask)
        hidden = self.decoder_input(latent)
        hidden = self.decoder[0](hidden, src_key_padding_mask=_padding_mask(mask))
        return self.final_layer(hidden)

    def forward(
        self, pose: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (reconstruction, mu, logvar); samples the latent in training mode, uses mu in eval."""
        mu, logvar = self.encode(pose, mask)
        latent = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return self.decode(latent, mask), mu, logvar

    def loss(
        self, pose: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Masked MSE reconstruction + kl_weight * KL(q(z|x) || N(0, I)).

        Recon is averaged over real frames and pose dimensions; KL is summed over latent dimensions
        and averaged over real frames. Returns (total, {'recon', 'kl', 'total'}) with detached parts.
        """
        recon, mu, logvar = self(pose, mask)
        weight = torch.ones(pose.shape[:2], device=pose.device) if mask is None else mask.to(pose.dtype)
        frames = weight.sum().clamp(min=1)
        recon_per_frame = ((recon - pose) ** 2).mean(dim=-1)
        recon_loss = (recon_per_frame * weight).sum() / frames
        kl_per_frame = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(dim=-1)
        kl = (kl_per_frame * weight).sum() / frames
        total = recon_loss + self.cfg.kl_weight * kl
        return total, {"recon": recon_loss.detach(), "kl": kl.detach(), "total": total.detach()}

    @staticmethod
    def _check_input(values: torch.Tensor, width: int, name: str, mask: torch.Tensor | None) -> None:
        if values.ndim != 3 or values.shape[-1] != width:
            raise ValueError(f"HeadVAE {name}: expected shape (batch, frames, {width}), got {tuple(values.shape)}")
        if mask is not None and (mask.dtype != torch.bool or mask.shape != values.shape[:2]):
            raise ValueError(
                f"HeadVAE mask: expected a bool tensor of shape {tuple(values.shape[:2])}, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )


def _padding_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """PyTorch's key-padding mask is True where a frame is padding: the inverse of ours."""
    return None if mask is None else ~mask


class PoseDecoder:
    """Head latents -> raw (denormalized) head pose: a trained head VAE with the pose statistics it was trained on.

    The decoder attends over every frame it is given, so a frame's pose depends on which frames are decoded
    with it: every stage decodes the latents of each sampled window together, and cross-fades the poses as it
    cross-fades the states (avflow.model.state.StateDecoder).
    """

    def __init__(self, vae: HeadVAE, mean: torch.Tensor, std: torch.Tensor):
        self.vae = vae
        device = next(vae.parameters()).device
        self.mean, self.std = mean.float().to(device), std.float().to(device)

    def normalized(self, latent: torch.Tensor) -> torch.Tensor:
        """Latents (N, frames, latent_dim) decoded together -> z-normalized pose (N, frames, pose_dim), float32, on
        the latents' device. It does not depend on the identity: the VAE is shared, only the statistics are not."""
        with _eval_mode(self.vae), torch.no_grad():
            return self.vae.decode(latent.to(self.mean.device, torch.float32)).to(latent.device)

    def denormalize(self, pose: torch.Tensor) -> torch.Tensor:
        """z-normalized pose -> raw pose, with this decoder's statistics."""
        return pose * self.std.to(pose) + self.mean.to(pose)

    def __call__(self, latent: torch.Tensor) -> torch.Tensor:
        """Latents (N, frames, latent_dim) decoded together -> raw pose (N, frames, pose_dim), float32, on the
        latents' device."""
        return self.denormalize(self.normalized(latent))


@contextlib.contextmanager
def _eval_mode(vae: HeadVAE) -> Iterator[None]:
    """Decode deterministically (no dropout), then restore the caller's train/eval mode."""
    was_training = vae.training
    vae.eval()
    try:
        yield
    finally:
        vae.train(was_training)
