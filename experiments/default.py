"""The shared defaults of every experiment: `diffusion/defaults.py` documents each key.

Experiments start from `get_default_config()` and override only what differs.
"""

from diffusion.defaults import get_default_config as get_default_config


def use_network(config, name: str, **fields) -> None:
    """Switches `config.model` to the network `name` with `fields`: the previous network's own
    fields are removed (the shared keys, `diffusion.models.SHARED_KEYS` and `OPTIONAL_FIELDS`,
    stay), so that the config names only fields the new network takes."""
    from diffusion import models

    old = models.network_fields(models.NETWORKS[config.model.name])
    for key in old - set(models.SHARED_KEYS) - set(models.OPTIONAL_FIELDS):
        if key in config.model:
            del config.model[key]
    config.model.name = name
    config.model.update(fields)
