"""bagel-vae-pp: Distributed VAE Decode / Encode and BAGEL-7B-MoT nodes for ComfyUI.

ComfyUI imports this file under a path-derived module name, so everything below is relative. Outside
ComfyUI (tests, the CLI) nothing is registered.
"""

try:
    import comfy.model_management  # noqa: F401  (present only inside ComfyUI)
except ImportError:
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}
else:
    from .bagel_vae_pp.pool import shutdown_all
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, host, routes

    host.register_model_folders()
    host.hook_unload(shutdown_all)
    routes.register_with_server()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
