"""Glue for frameworks that reach attention through their own registries.

``huggingface``: ``"aule"`` as a transformers attention implementation; ``autoregister`` registers it
whenever transformers is (or becomes) imported.
``comfyui``: a ComfyUI custom-node module (``NODE_CLASS_MAPPINGS``) that installs aule as SDPA.
Each imports its framework only when used.
"""
