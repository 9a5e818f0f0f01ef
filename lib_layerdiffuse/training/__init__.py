"""Training side of LayerDiffuse (paper §3): data, distributed helpers and the stages.

Stage 1, the latent-transparency VAE (§3.1), is :mod:`.vae_stage`; stage 2, the UNet
fine-tune on adjusted latents (§3.2, SDXL patch-file export), is :mod:`.diffusion_stage`;
stage 3, the per-frame LoRAs with attention sharing (§3.3, SD1.5 attention-sharing
export), is :mod:`.layers_stage`. Stages 2 and 3 share :mod:`.unet_training`; all three
run in the one loop of :mod:`.runner`. ``--checkpoint`` (single-file SD1.5/SDXL) is
:mod:`.base_checkpoint` with the plain-torch models of :mod:`.sd_models` and the CLIP BPE
of :mod:`.tokenizer`.
Entry point: :mod:`.cli` (``python -m lib_layerdiffuse.training``, also under ``torchrun``).
"""
