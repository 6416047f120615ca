"""Sampling for FID streams: samples reach the Inception statistics batch by batch, and the
host never holds more than one batch beyond the samples a user asked to save."""

import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import evaluate, experiment, generate, plotting
from diffusion.metrics import fid, inception
from diffusion.parallel import data_mesh
from experiments import digits
from tests.helpers import random_params

SAMPLE_BATCH, FID_BATCH, FID_SAMPLES = 4, 8, 24
pytestmark = pytest.mark.xdist_group("streaming")     # one worker: the sampler compiles once


@pytest.fixture(scope="module")
def digits_exp():
    config = digits.get_config("smoke")
    config.sampling.method, config.sampling.steps = "ddim", 2
    config.sampling.batch_size = SAMPLE_BATCH
    config.eval.fid_num_samples = FID_SAMPLES
    config.eval.fid_batch_size = FID_BATCH
    config.eval.fid_ref_max_examples = 16
    exp = experiment.build(config)
    params = random_params(exp.net, jnp.zeros((1, 8, 8, 1)), jnp.ones((1,)))
    return exp, params


def test_fid_evaluation_hands_sample_batches_to_inception_as_they_come(digits_exp, tmp_path,
                                                                        monkeypatch):
    """Would fail if evaluation drew all FID samples before extracting features (e.g. through
    draw_samples), or held more than one sampler batch plus one Inception batch of them."""
    exp, params = digits_exp
    produced = {"images": 0, "started": False}
    real_sample_batches = evaluate.sample_batches

    def counting_sample_batches(*args, **kwargs):
        produced["started"] = True
        for x, nfe in real_sample_batches(*args, **kwargs):
            produced["images"] += len(x)
            yield x, nfe

    class RecordingExtractor(fid.InceptionExtractor):
        def __init__(self, weights_path):     # no network: features are a fixed projection
            self.weights_path, self.batch_size, self.sharding = weights_path, FID_BATCH, None
            self.has_logits, self.calls = False, []
            self.proj = np.random.default_rng(0).normal(size=(64, inception.FEATURE_DIM))

        def __call__(self, images):
            if produced["started"]:   # generated images, not the reference statistics
                self.calls.append((produced["images"], len(images)))
            return images.reshape(len(images), -1) @ self.proj / 255.0, None

    seen = {}

    def fake_sample_quality(gen, ref, *args):
        seen["n"], seen["ref_n"] = gen.n, ref.n
        return {"fid": 0.0}

    weights = tmp_path / "weights.npz"
    weights.write_bytes(b"not used")
    monkeypatch.setattr(evaluate, "sample_batches", counting_sample_batches)
    monkeypatch.setattr(evaluate.metrics, "sample_quality", fake_sample_quality)
    extractor = RecordingExtractor(str(weights))
    out = evaluate.eval_sample_quality(exp, params, data_mesh(), str(tmp_path), extractor)

    assert seen == {"n": FID_SAMPLES, "ref_n": 16} and out["fid_num_samples"] == FID_SAMPLES
    assert [n for _, n in extractor.calls] == [FID_BATCH] * (FID_SAMPLES // FID_BATCH)
    consumed = 0
    for produced_then, n in extractor.calls:
        # The sampler had made these images, and at most one Inception batch plus one sampler
        # batch more: the statistics take each batch as it comes, nothing accumulates.
        assert consumed + n <= produced_then <= consumed + FID_BATCH + SAMPLE_BATCH
        consumed += n
    assert extractor.calls[0][0] < FID_SAMPLES      # features began before sampling ended


def test_draw_samples_equals_the_batches_it_streams(digits_exp):
    exp, params = digits_exp
    mesh, key = data_mesh(), exp.key("sample")
    batches = list(generate.sample_batches(exp, params, mesh, 10, key))
    samples, nfe = generate.draw_samples(exp, params, mesh, 10, key)
    assert [len(x) for x, _ in batches] == [4, 4, 2]
    np.testing.assert_array_equal(samples, np.concatenate([x for x, _ in batches]))
    assert samples.dtype == batches[0][0].dtype and nfe == max(n for _, n in batches)


@pytest.mark.parametrize("centered", [True, False])
def test_image_grid_image_by_image_equals_the_whole_array_formula(centered):
    """The grid fills image by image (no float copies of all images); pixels as before: the
    inverse scaler, clip to [0, 1], round(255 x), white padding."""
    rng = np.random.default_rng(0)
    images = rng.uniform(-1.3, 1.3, size=(7, 5, 4, 3)).astype(np.float32)
    transform = (lambda x: (x + 1.0) / 2.0) if centered else None
    grid = plotting.image_grid(images, ncol=3, transform=transform)
    whole = np.clip(transform(images) if centered else images, 0.0, 1.0)
    expected = np.ones((3 * 6 + 1, 3 * 5 + 1, 3), np.float32)
    for i, img in enumerate(whole):
        r, k = divmod(i, 3)
        expected[1 + r * 6:1 + r * 6 + 5, 1 + k * 5:1 + k * 5 + 4] = img
    np.testing.assert_array_equal(grid, np.round(expected * 255).astype(np.uint8))
