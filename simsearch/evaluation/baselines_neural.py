"""The trained baselines: a convolutional autoencoder, a VAE and GANomaly, all on the same input.

Each sees the whole decoded RGB image resized to 128 x 128 (values in [0, 1]), trains on good images only for a
fixed number of steps with a fixed seed (batches drawn with replacement, a random horizontal flip as the one
augmentation), and gives a map: the per-pixel squared reconstruction error, resized back to the image and
smoothed as the engine smooths its maps. The autoencoder and the VAE score an image by the map's maximum;
GANomaly by its latent distance, as its paper does.
"""
from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import SimsearchError
from ..images import load_image
from ..scoring import smooth
from .feature_cache import FeatureCache, cached


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float() / 255.0


def error_map(x: torch.Tensor, reconstruction: torch.Tensor, height: int, width: int, sigma: float) -> np.ndarray:
    """(1, 3, s, s) input and reconstruction -> (height, width) float32: the squared error averaged over channels,
    resized to the image and Gaussian-smoothed."""
    error = ((reconstruction - x) ** 2).mean(dim=1)[0].numpy()
    return smooth(cv2.resize(error, (width, height), interpolation=cv2.INTER_LINEAR), sigma)


class _ReconstructionBaseline:
    """What the three share: input preparation (through the run's feature cache), the seeded batch stream,
    the timing of the fit, and the map. Subclasses define `_train(data, generator)` and `_reconstruct(x)`."""

    name = ""
    size = 128

    def __init__(self, steps: int, batch: int = 16, seed: int = 0, blur_sigma: float = 4.0,
                 cache: FeatureCache | None = None):
        self.steps, self.batch, self.seed, self.blur_sigma, self.cache = steps, batch, seed, blur_sigma, cache
        self.fit_seconds = 0.0  # the training alone, without preparing the inputs
        self.model: nn.Module | None = None

    def _input(self, path: Path) -> tuple[np.ndarray, int, int]:
        """-> the (size, size, 3) uint8 input and the image's height and width, once per run and image."""
        def prepare(p: Path):
            rgb = load_image(p).rgb
            return cv2.resize(rgb, (self.size, self.size), interpolation=cv2.INTER_AREA), rgb.shape[0], rgb.shape[1]
        return cached(self.cache, f"rgb{self.size}", path, prepare)

    def _batches(self, data: torch.Tensor, generator: torch.Generator):
        """`steps` batches of `batch` images drawn with replacement, each batch flipped left-right half the time."""
        for _ in range(self.steps):
            batch = data[torch.randint(len(data), (min(self.batch, len(data)),), generator=generator)]
            yield batch.flip(3) if torch.rand(1, generator=generator).item() < 0.5 else batch

    def fit(self, images: list[Path]) -> None:
        data = torch.stack([to_tensor(self._input(p)[0]) for p in images])
        torch.manual_seed(self.seed)  # the weights' initialisation
        start = time.perf_counter()
        self._train(data, torch.Generator().manual_seed(self.seed))
        self.fit_seconds = time.perf_counter() - start
        self.model.eval()

    def _train(self, data: torch.Tensor, generator: torch.Generator) -> None:
        raise NotImplementedError

    def _reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _prepared(self, image: Path) -> tuple[torch.Tensor, int, int]:
        if self.model is None:
            raise SimsearchError(f"fit the {self.name} baseline before scoring")
        small, height, width = self._input(image)
        return to_tensor(small)[None], height, width

    @torch.inference_mode()
    def score(self, image: Path) -> tuple[float, np.ndarray]:
        x, height, width = self._prepared(image)
        amap = error_map(x, self._reconstruct(x), height, width, self.blur_sigma)
        return float(amap.max()), amap


class _ConvAE(nn.Module):
    def __init__(self, width: int = 32, bottleneck: int = 16):
        super().__init__()
        self.encode = nn.Sequential(
            nn.Conv2d(3, width, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(width, width * 2, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(width * 2, width * 4, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(width * 4, bottleneck, 3, 1, 1))
        self.decode = nn.Sequential(
            nn.Conv2d(bottleneck, width * 4, 3, 1, 1), nn.ReLU(),
            nn.ConvTranspose2d(width * 4, width * 2, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(width * 2, width, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(width, 3, 4, 2, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


class ConvAutoencoder(_ReconstructionBaseline):
    """A spatial bottleneck (16 channels at 16 x 16); MSE loss; Adam 1e-3."""

    name = "autoencoder"

    def __init__(self, steps: int = 200, **kwargs):
        super().__init__(steps, **kwargs)

    def _train(self, data, generator):
        self.model = _ConvAE()
        optimiser = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.model.train()
        for batch in self._batches(data, generator):
            loss = F.mse_loss(self.model(batch), batch)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()

    def _reconstruct(self, x):
        return self.model(x)


class _ConvVAE(nn.Module):
    """128 x 128 x 3 -> four stride-2 convolutions -> a `latent`-dimensional Gaussian -> the mirror image."""

    def __init__(self, width: int = 32, latent: int = 128):
        super().__init__()
        self.encode = nn.Sequential(
            nn.Conv2d(3, width, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(width, width * 2, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(width * 2, width * 4, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(width * 4, width * 4, 4, 2, 1), nn.ReLU(), nn.Flatten())
        flat = width * 4 * 8 * 8
        self.mu, self.log_var = nn.Linear(flat, latent), nn.Linear(flat, latent)
        self.expand = nn.Linear(latent, flat)
        self.decode = nn.Sequential(
            nn.ConvTranspose2d(width * 4, width * 4, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(width * 4, width * 2, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(width * 2, width, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(width, 3, 4, 2, 1), nn.Sigmoid())
        self.width = width

    def forward(self, x: torch.Tensor, sample: bool = True):
        """(B, 3, 128, 128) -> reconstruction (B, 3, 128, 128), mu (B, latent), log_var (B, latent); the decoder
        sees a sample while training, the mean when scoring."""
        h = self.encode(x)
        mu, log_var = self.mu(h), self.log_var(h).clamp(-10, 10)
        z = mu + torch.randn_like(mu) * (0.5 * log_var).exp() if sample else mu
        out = self.decode(self.expand(z).view(-1, self.width * 4, 8, 8))
        return out, mu, log_var


def vae_loss(x: torch.Tensor, reconstruction: torch.Tensor, mu: torch.Tensor, log_var: torch.Tensor,
             beta: float = 1.0) -> torch.Tensor:
    """The negative ELBO per image: summed squared error over (3, H, W) plus beta * KL(q(z|x) || N(0, I)),
    averaged over the batch. x, reconstruction (B, 3, H, W); mu, log_var (B, latent)."""
    reconstruction_term = ((reconstruction - x) ** 2).flatten(1).sum(1)
    kl = -0.5 * (1 + log_var - mu ** 2 - log_var.exp()).sum(1)
    return (reconstruction_term + beta * kl).mean()


class ConvVAE(_ReconstructionBaseline):
    """A variational autoencoder with a 128-d latent vector, width 16; loss `vae_loss`; Adam 1e-3. The default
    budget (80 steps of 16) is what fits 6 fits per category on 2 shared cores (about 15 s a fit)."""

    name = "vae"

    def __init__(self, steps: int = 80, beta: float = 1.0, width: int = 16, latent: int = 128, **kwargs):
        super().__init__(steps, **kwargs)
        self.beta, self.width, self.latent = beta, width, latent

    def _train(self, data, generator):
        self.model = _ConvVAE(self.width, self.latent)
        optimiser = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.model.train()
        for batch in self._batches(data, generator):
            out, mu, log_var = self.model(batch)
            loss = vae_loss(batch, out, mu, log_var, self.beta)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()

    def _reconstruct(self, x):
        return self.model(x, sample=False)[0]


def _dcgan_encoder(out_channels: int, width: int) -> nn.Sequential:
    """(B, 3, 128, 128) -> (B, out_channels, 1, 1): five stride-2 convolutions (to 4 x 4), then a 4 x 4 one."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2)]
    channels = width
    for _ in range(4):
        layers += [nn.Conv2d(channels, channels * 2, 4, 2, 1), nn.BatchNorm2d(channels * 2), nn.LeakyReLU(0.2)]
        channels *= 2
    return nn.Sequential(*layers, nn.Conv2d(channels, out_channels, 4, 1, 0))


def _dcgan_decoder(latent: int, width: int) -> nn.Sequential:
    """(B, latent, 1, 1) -> (B, 3, 128, 128) in [0, 1]."""
    channels = width * 16
    layers: list[nn.Module] = [nn.ConvTranspose2d(latent, channels, 4, 1, 0), nn.BatchNorm2d(channels), nn.ReLU()]
    for _ in range(4):
        layers += [nn.ConvTranspose2d(channels, channels // 2, 4, 2, 1), nn.BatchNorm2d(channels // 2), nn.ReLU()]
        channels //= 2
    return nn.Sequential(*layers, nn.ConvTranspose2d(channels, 3, 4, 2, 1), nn.Sigmoid())


class _GanomalyGenerator(nn.Module):
    """Encoder -> decoder -> encoder: x -> z -> x_hat -> z_hat."""

    def __init__(self, latent: int = 100, width: int = 16):
        super().__init__()
        self.encode, self.decode = _dcgan_encoder(latent, width), _dcgan_decoder(latent, width)
        self.encode_again = _dcgan_encoder(latent, width)

    def forward(self, x: torch.Tensor):
        z = self.encode(x)
        x_hat = self.decode(z)
        return x_hat, z, self.encode_again(x_hat)


class _Discriminator(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        encoder = _dcgan_encoder(1, width)
        self.features, self.classify = encoder[:-1], encoder[-1]

    def forward(self, x: torch.Tensor):
        """(B, 3, 128, 128) -> logits (B,), features (B, 16 * width, 4, 4)."""
        features = self.features(x)
        return self.classify(features).flatten(), features


def ganomaly_generator_loss(x, x_hat, z, z_hat, real_features, fake_features,
                            w_adv: float = 1.0, w_con: float = 50.0, w_enc: float = 1.0) -> torch.Tensor:
    """GANomaly's generator loss (Akcay et al. 2018, weights as anomalib's): feature matching on the
    discriminator's features + L1 reconstruction + L2 between the two latents."""
    return (w_adv * F.mse_loss(fake_features, real_features) + w_con * F.l1_loss(x_hat, x)
            + w_enc * F.mse_loss(z_hat, z))


class Ganomaly(_ReconstructionBaseline):
    """GANomaly with DCGAN-style nets (width 8, latent 100, batch norm); Adam 2e-4, betas (0.5, 0.999) for both;
    the discriminator re-initialised when its loss collapses below 1e-5, as the reference code does. Score: the
    mean squared distance between z and z_hat; map: the reconstruction error. The default budget (50 steps of 16)
    is what fits 6 fits per category on 2 shared cores (about 15 s a fit)."""

    name = "ganomaly"

    def __init__(self, steps: int = 50, latent: int = 100, width: int = 8, **kwargs):
        super().__init__(steps, **kwargs)
        self.latent, self.width = latent, width

    def _train(self, data, generator):
        self.model = _GanomalyGenerator(self.latent, self.width)
        critic = _Discriminator(self.width)
        opt_g = torch.optim.Adam(self.model.parameters(), lr=2e-4, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(critic.parameters(), lr=2e-4, betas=(0.5, 0.999))
        self.model.train()
        critic.train()
        for batch in self._batches(data, generator):
            x_hat, z, z_hat = self.model(batch)
            _, real_features = critic(batch)
            _, fake_features = critic(x_hat)
            loss_g = ganomaly_generator_loss(batch, x_hat, z, z_hat, real_features.detach(), fake_features)
            opt_g.zero_grad()
            loss_g.backward()
            opt_g.step()
            real_logits, _ = critic(batch)
            fake_logits, _ = critic(x_hat.detach())
            loss_d = 0.5 * (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
                            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()
            if loss_d.item() < 1e-5:
                critic = _Discriminator(self.width)
                opt_d = torch.optim.Adam(critic.parameters(), lr=2e-4, betas=(0.5, 0.999))

    @torch.inference_mode()
    def score(self, image: Path) -> tuple[float, np.ndarray]:
        x, height, width = self._prepared(image)
        x_hat, z, z_hat = self.model(x)
        return float(((z - z_hat) ** 2).mean()), error_map(x, x_hat, height, width, self.blur_sigma)
