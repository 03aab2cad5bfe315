"""bagel-vae-pp engine: an exact multi-process VAE decode/encode and a compact BAGEL-7B-MoT.

Importable without ComfyUI. See `pool.get_pool` for the worker pool, `autoencoder` for the model.
"""

__version__ = "0.1.0"
