"""ComfyUI node classes of the pack; `NODE_CLASS_MAPPINGS` and display names come from each class's TITLE."""

from .bagel_nodes import NODE_CLASSES as BAGEL_NODES
from .vae_nodes import NODE_CLASSES as VAE_NODES

NODE_CLASS_MAPPINGS = {**VAE_NODES, **BAGEL_NODES}
NODE_DISPLAY_NAME_MAPPINGS = {node_id: cls.TITLE for node_id, cls in NODE_CLASS_MAPPINGS.items()}
