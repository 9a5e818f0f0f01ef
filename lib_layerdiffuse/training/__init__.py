"""Training side of LayerDiffuse (paper §3): data, distributed helpers and the stages.

Stage 1, the latent-transparency VAE (§3.1), is :mod:`.vae_stage`; the diffusion
fine-tune (§3.2) and the multi-layer LoRAs (§3.3) need the UNet side and come later.
Entry point: ``python -m lib_layerdiffuse.train`` (also under ``torchrun``).
"""
