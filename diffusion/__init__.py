"""Score-based generative models in continuous time, in JAX/Flax.

The public modules, imported explicitly (no import side effects, no registries):

    from diffusion import sde as sde_lib       # VPSDE, SubVPSDE, VESDE, CosineVPSDE, RectifiedFlow
                                               # (any Interpolant), get_sde
    from diffusion import models               # get_model, MLP, UNet, make_score_model
    from diffusion import losses               # make_dsm_loss, make_flow_matching_loss, ...
    from diffusion import sampling             # pc_sample
    from diffusion import data, metrics      # data.load_dataset, data.batch_at, ...; FID
    from diffusion import experiment           # build(config) -> Experiment (the config reader)
    from diffusion import train                # train_and_evaluate, evaluate, sample

`diffusion.experiment`, `train`, `evaluate` and `generate` (the loops, with orbax and
TensorBoard) are not imported here, so that using the SDEs, networks and samplers does not pull
in the training stack.
"""

from diffusion import data as data
from diffusion import losses as losses
from diffusion import metrics as metrics
from diffusion import models as models
from diffusion import sampling as sampling
from diffusion import sde as sde
from diffusion.sde import SDE as SDE
from diffusion.sde import VESDE as VESDE
from diffusion.sde import VPSDE as VPSDE
from diffusion.sde import CosineVPSDE as CosineVPSDE
from diffusion.sde import RectifiedFlow as RectifiedFlow
from diffusion.sde import SubVPSDE as SubVPSDE
from diffusion.sde import get_sde as get_sde

datasets = data   # the name of `data` in earlier versions: datasets.get_dataset(config)

__version__ = "0.1.0"
