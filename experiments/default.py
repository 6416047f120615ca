"""The shared defaults of every experiment: `diffusion/defaults.py` documents each key.

Experiments start from `get_default_config()` and override only what differs.
"""

from diffusion.defaults import get_default_config as get_default_config
