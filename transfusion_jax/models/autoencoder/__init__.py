"""The frozen autoencoder between pixels and latents (paper 4.1): the VAE / VQ-VAE module
(`model`), its training losses (`losses`, `lpips`), the codec that turns pixels into the
transformer's normalised latents and back (`codec`), loading a trained one from its workdir
(`loader`), and importing Stable Diffusion's VAE weights (`sd_import`, `weight_files`)."""
