"""Sample-quality measures: FID / KID / Inception Score with the FID Inception network (pure JAX),
and sliced Wasserstein / MMD for low-dimensional data.

Modules: `fid` (the measures, streaming statistics, `InceptionExtractor`), `inception` (the
network), `inception_weights` (converting and loading its weights; `ensure_weights` converts
them on first use), `torchscript` (the torch-free reader of the export), `distances`.
"""

from diffusion.metrics import fid as fid
from diffusion.metrics import inception as inception
from diffusion.metrics import inception_weights as inception_weights
from diffusion.metrics.distances import mmd_rbf as mmd_rbf
from diffusion.metrics.distances import sliced_wasserstein as sliced_wasserstein
from diffusion.metrics.fid import FeatureStats as FeatureStats
from diffusion.metrics.fid import InceptionExtractor as InceptionExtractor
from diffusion.metrics.fid import frechet_distance as frechet_distance
from diffusion.metrics.fid import inception_features as inception_features
from diffusion.metrics.fid import inception_score as inception_score
from diffusion.metrics.fid import kid as kid
from diffusion.metrics.fid import sample_quality as sample_quality
