"""Model families built from npdiffusion.nn modules: the UNet, the VAE and the CLIP text encoder."""
