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

import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Sequence

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

# Stable Diffusion VAE latent scaling factor (sd-vae-ft-mse config / LDM paper).
VAE_SCALE = 0.18215
# Batch sizes a compiled engine runs at (a batch is padded up to the next one): a
# static shape per size lets torch.compile specialise and capture CUDA graphs once
# per size; the steps keep the padding waste under 50 % (our choice).
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


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


def freeze_time_embedding(unet: nn.Module, device: torch.device | str, dtype: torch.dtype) -> None:
    """Replace ``unet.time_embedding`` (in place) with :class:`ConstantTimeEmbedding` of its
    value at timestep 0, computed on ``device`` in ``dtype`` (the UNet's own). The UNet
    must then only be called at t = 0, as MuseTalk always is."""
    with torch.no_grad():
        t0 = torch.zeros(1, device=device, dtype=torch.long)
        t_emb = unet.get_time_embed(sample=torch.zeros(1, device=device, dtype=dtype), timestep=t0)
        embedding = unet.time_embedding(t_emb.to(dtype))
    unet.time_embedding = ConstantTimeEmbedding(embedding)


class MuseTalkEngine:
    """Renders faces for one prepared avatar, batching across sessions.

    Every session's inference thread calls :meth:`render` and waits; one device
    thread serves the requests: it takes the oldest, adds the other requests
    already waiting while they fit in ``max_batch`` frames, and runs them as one UNet +
    VAE batch (continuous batching). Sessions that are due at the same time share
    a forward pass instead of queueing for the device one after another.

    The request queue holds at most one request per session (each inference
    thread waits for its answer), so it needs no other bound.

    Args:
        models: ``musetalk.models.MuseTalkModels`` (unet, vae, pe, device, dtype).
        avatar: ``musetalk.prepare.MuseTalkAvatar`` (per-frame latents, paste-back).
        max_batch: most frames in one forward pass.
        compile_mode: None (eager), or a ``torch.compile`` mode for the UNet + VAE
            step: "default", "reduce-overhead" (CUDA graphs) or "max-autotune".
            Every bucket size up to ``max_batch`` is compiled by :meth:`warmup`.
        buckets: batch sizes to pad batches up to (default: :data:`BATCH_BUCKETS`
            when compiling, none otherwise); a batch above the largest bucket is
            run in chunks of that size.
        compile_backend: ``torch.compile`` backend (tests use "eager").
    Raises:
        ValueError: an unknown compile mode or a non-positive bucket.
    """

    def __init__(
        self,
        models,
        avatar,
        max_batch: int = 64,
        compile_mode: str | None = None,
        buckets: Sequence[int] | None = None,
        compile_backend: str = "inductor",
    ) -> None:
        if compile_mode is not None and compile_mode not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {compile_mode!r}: use one of {COMPILE_MODES}")
        if buckets is None:
            buckets = BATCH_BUCKETS if compile_mode else ()
        if any(b < 1 for b in buckets):
            raise ValueError(f"bucket sizes must be >= 1, got {tuple(buckets)}")
        self.models = models
        self.avatar = avatar
        self.device = torch.device(models.device)
        self.dtype = models.dtype
        self.max_batch = max_batch
        self.buckets = tuple(sorted(set(buckets)))
        self.compile_mode = compile_mode
        self.batch_sizes: list[int] = []  # frames per forward pass, most recent last (bounded)
        freeze_time_embedding(models.unet, self.device, self.dtype)
        self._timestep = torch.zeros(1, device=self.device, dtype=torch.long)
        self._step = self._faces
        if compile_mode is not None:
            self._step = torch.compile(self._faces, mode=compile_mode, dynamic=False, backend=compile_backend)
        self._cuda_graphs = compile_mode in ("reduce-overhead", "max-autotune") and self.device.type == "cuda"
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="musetalk-device", daemon=True).start()

    def warmup(self) -> None:
        """Run every bucket size up to ``max_batch`` once, so that compilation (and
        CUDA-graph capture) happens now rather than in the first sessions' batches."""
        if not self.buckets:
            return
        d = self.models.pe.d_model
        for size in self.buckets:
            if size > self._bucket(self.max_batch):
                break
            start = time.perf_counter()
            self.render(np.zeros((size, 50, d), np.float32), [0] * size)
            log.info("MuseTalk batch of %d ready in %.1f s", size, time.perf_counter() - start)

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
        held = None  # a request that did not fit the last pass: first in the next
        while True:
            group = [held or self._requests.get()]
            held = None
            frames = len(group[0][1])
            while frames < self.max_batch:
                try:
                    request = self._requests.get_nowait()
                except queue.Empty:
                    break
                if frames + len(request[1]) > self.max_batch:
                    held = request
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

    def _bucket(self, n: int) -> int:
        """The batch size ``n`` frames run at: the next bucket up (``n`` without buckets)."""
        for size in self.buckets:
            if size >= n:
                return size
        return n

    @torch.no_grad()
    def _forward(self, audio: np.ndarray, loop_indices: list[int]) -> np.ndarray:
        """One batch -> uint8 BGR (B, 256, 256, 3), padded to its bucket (repeating
        the last frame) or split into chunks of the largest bucket."""
        n = len(loop_indices)
        largest = self.buckets[-1] if self.buckets else n
        if n > largest:
            return np.concatenate([self._forward(audio[i : i + largest], loop_indices[i : i + largest])
                                   for i in range(0, n, largest)])
        size = self._bucket(n)
        if size > n:
            audio = np.concatenate([audio, np.repeat(audio[-1:], size - n, axis=0)])
            loop_indices = loop_indices + [loop_indices[-1]] * (size - n)
        latents = self.avatar.loop_latents(loop_indices, self.device, self.dtype)
        tokens = torch.as_tensor(np.ascontiguousarray(audio)).to(self.device, self.dtype, non_blocking=True)
        if self._cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous replay's output is consumed
        return self._step(latents, tokens)[:n].cpu().numpy()

    def _faces(self, latents: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """PE -> UNet(t=0) -> /0.18215 -> VAE decode -> uint8 BGR (B, 256, 256, 3) on the device."""
        pred = self.models.unet(latents, self._timestep, encoder_hidden_states=self.models.pe(tokens)).sample
        image = self.models.vae.decode(pred / VAE_SCALE).sample
        image = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).flip(1)  # RGB -> BGR
        return image.permute(0, 2, 3, 1).contiguous()  # one copy, made on the device
