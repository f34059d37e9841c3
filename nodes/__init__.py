"""ComfyUI nodes: adapter.py (the work, no ComfyUI import) and host.py (the V3 schemas, the only
module that imports ComfyUI)."""
