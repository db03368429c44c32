"""MuseTalk: single-step latent inpainting lip sync (TMElyralab, arXiv 2410.10122).

A diffusers ``UNet2DConditionModel`` redraws the lower half of a 256x256 face crop
in the latent space of the Stable Diffusion VAE (``sd-vae-ft-mse``), conditioned on
a window of Whisper-tiny encoder features: one UNet forward at timestep 0, then a
VAE decode. ``musetalk.models`` loads the released weights (see
``scripts/download_weights.sh``); the other modules build features, prepare
avatars and run inference on top of it.

Importing this package is cheap: torch and diffusers load only with the
submodules that need them.
"""
