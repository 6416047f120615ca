"""Samplers: each takes (key, sde, score_fn, shape, ...) and returns (samples, nfe).

- `pc_sample`: predictor-corrector sampling of the reverse SDE (pc.py).
- `ode_sample`: the probability-flow ODE with an adaptive solver; `encode` / `decode` map data to
  latents and back (ode.py); a failed solve raises `ODESolverError` (NaN under jit).
- `ddim_sample`, `dpm_solver_sample`, `edm_sample`: few-step solvers (solvers.py).
- `ddpm_sample`: DDPM's ancestral sampler on the discrete chain, respaced, with learned
  variances (ddpm.py).
- `consistency_sample`: multistep consistency sampling, one denoiser evaluation per time
  (consistency.py).
"""

from diffusion.sampling.consistency import consistency_sample as consistency_sample
from diffusion.sampling.ddpm import ddpm_sample as ddpm_sample
from diffusion.sampling.ode import ODESolverError as ODESolverError
from diffusion.sampling.ode import decode as decode
from diffusion.sampling.ode import encode as encode
from diffusion.sampling.ode import ode_sample as ode_sample
from diffusion.sampling.pc import CORRECTORS as CORRECTORS
from diffusion.sampling.pc import PREDICTORS as PREDICTORS
from diffusion.sampling.pc import pc_sample as pc_sample
from diffusion.sampling.pc import pc_step_fn as pc_step_fn
from diffusion.sampling.registry import SAMPLERS as SAMPLERS
from diffusion.sampling.registry import get_sampler as get_sampler
from diffusion.sampling.solvers import ddim_sample as ddim_sample
from diffusion.sampling.solvers import dpm_solver_sample as dpm_solver_sample
from diffusion.sampling.solvers import edm_sample as edm_sample
