"""MuseTalk inference: audio windows + avatar latents -> generated 256x256 faces.

One forward pass per batch (MuseTalk is a single-step latent inpainting model,
arXiv 2410.10122): positional encoding on the (B, 50, d) audio tokens, the UNet at
timestep 0 on the (B, 8, 32, 32) masked+reference latents, division by the SD VAE
scaling factor, VAE decode to (B, 3, 256, 256) in [-1, 1], then uint8 BGR.

The engine is shared by every session of a server (one copy of the weights); a
single device thread runs the batches, merging the requests of sessions that are
due at the same time.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Sequence

import numpy as np
import torch
from torch import nn

# Stable Diffusion VAE latent scaling factor (sd-vae-ft-mse config / LDM paper).
VAE_SCALE = 0.18215


class ConstantTimeEmbedding(nn.Module):
    """Replaces a UNet's ``time_embedding`` with its precomputed value at t = 0.

    MuseTalk always runs the UNet at timestep 0, so the timestep MLP gives the same
    (1, C) vector for every frame; computing it once per engine takes it off the
    per-frame path. ``forward`` returns it expanded to the batch.
    """

    def __init__(self, embedding: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("embedding", embedding, persistent=False)

    def forward(self, t_emb: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        return self.embedding.expand(t_emb.shape[0], -1)


class MuseTalkEngine:
    """Renders faces for one prepared avatar, batching across sessions.

    Every session's inference thread calls :meth:`render` and waits; one device
    thread serves the requests: it takes the oldest, adds every other request
    already waiting (up to ``max_batch`` frames in all) and runs them as one UNet +
    VAE batch (continuous batching). Sessions that are due at the same time share
    a forward pass instead of queueing for the device one after another.

    The request queue holds at most one request per session (each inference
    thread waits for its answer), so it needs no other bound.

    Args:
        models: ``musetalk.models.MuseTalkModels`` (unet, vae, pe, device, dtype).
        avatar: ``musetalk.prepare.MuseTalkAvatar`` (per-frame latents, paste-back).
        max_batch: most frames in one forward pass.
    """

    def __init__(self, models, avatar, max_batch: int = 64) -> None:
        self.models = models
        self.avatar = avatar
        self.device = torch.device(models.device)
        self.dtype = models.dtype
        self.max_batch = max_batch
        self.batch_sizes: list[int] = []  # frames per forward pass, most recent last (bounded)
        unet = models.unet
        with torch.no_grad():
            t0 = torch.zeros(1, device=self.device, dtype=torch.long)
            t_emb = unet.get_time_embed(sample=torch.zeros(1, device=self.device, dtype=self.dtype), timestep=t0)
            embedding = unet.time_embedding(t_emb.to(self.dtype))
        unet.time_embedding = ConstantTimeEmbedding(embedding)
        self._timestep = t0
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="musetalk-device", daemon=True).start()

    def render(self, audio: np.ndarray, loop_indices: Sequence[int]) -> np.ndarray:
        """Generate the faces of a batch of frames (blocks until they are ready).

        Args:
            audio: float32 (B, 50, d) Whisper feature windows (one per frame).
            loop_indices: B avatar loop indices the frames are drawn on.
        Returns:
            uint8 (B, 256, 256, 3) BGR faces.
        Raises:
            whatever the forward pass raised (the caller falls back to idle frames).
        """
        done: Future = Future()
        self._requests.put((np.asarray(audio, np.float32), list(loop_indices), done))
        return done.result()

    def _serve(self) -> None:
        while True:
            group = [self._requests.get()]
            frames = len(group[0][1])
            while frames < self.max_batch:
                try:
                    request = self._requests.get_nowait()
                except queue.Empty:
                    break
                group.append(request)
                frames += len(request[1])
            try:
                faces = self._forward(
                    np.concatenate([audio for audio, _, _ in group]),
                    [i for _, indices, _ in group for i in indices],
                )
            except Exception as e:  # hand the error to every waiting session
                for _, _, done in group:
                    done.set_exception(e)
                continue
            self.batch_sizes = self.batch_sizes[-255:] + [len(faces)]
            start = 0
            for _, indices, done in group:
                done.set_result(faces[start : start + len(indices)])
                start += len(indices)

    @torch.no_grad()
    def _forward(self, audio: np.ndarray, loop_indices: list[int]) -> np.ndarray:
        """One batch: PE -> UNet(t=0) -> /0.18215 -> VAE decode -> uint8 BGR (B, 256, 256, 3)."""
        latents = self.avatar.loop_latents(loop_indices, self.device, self.dtype)
        tokens = torch.as_tensor(np.ascontiguousarray(audio)).to(self.device, self.dtype, non_blocking=True)
        tokens = self.models.pe(tokens)
        pred = self.models.unet(latents, self._timestep, encoder_hidden_states=tokens).sample
        image = self.models.vae.decode(pred / VAE_SCALE).sample
        image = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        rgb = image.permute(0, 2, 3, 1).cpu().numpy()
        return np.ascontiguousarray(rgb[..., ::-1])  # RGB -> BGR
