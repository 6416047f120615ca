"""Sample-quality measures (FID / KID / IS come with the Inception network)."""

from diffusion.metrics.sample_quality import mmd_rbf as mmd_rbf
from diffusion.metrics.sample_quality import sliced_wasserstein as sliced_wasserstein
