"""Shared fixtures. Eight fake CPU devices are requested before JAX initialises (sharding tests)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation per distinct program for the whole run, shared by the xdist workers and inherited by the
# train.py / decode.py subprocesses: many tests build decoders and trainers over the same tiny models.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "clp_jax",
                                                                "test-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """The tests on the real demo backbone (and vLLM serving it) run on one xdist worker, one after another:
    they share its download and conversion, and two 2 GB models at once would only contend for the cores."""
    for item in items:
        if item.get_closest_marker("demo") or item.get_closest_marker("serve"):
            item.add_marker(pytest.mark.xdist_group("real_backbone"))


def tiny_hf_config(tied: bool, vocab_size: int = 128, **kw):
    from transformers import Qwen2Config

    fields = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=tied, rope_theta=10000.0, rms_norm_eps=1e-6)
    fields.update(kw)
    return Qwen2Config(**fields)


def make_tiny_hf_model(tmp_dir: str, tied: bool, seed: int = 0, **kw):
    """A random Qwen2ForCausalLM (GQA, non-zero q/k/v biases) saved with save_pretrained."""
    torch = pytest.importorskip("torch")
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(tiny_hf_config(tied, **kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.2)  # HF initialises biases to zero; make them matter
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_dir)
    return model


@pytest.fixture(scope="session", params=[True, False], ids=["tied", "untied"])
def tiny_hf(request, tmp_path_factory):
    """(torch model, checkpoint directory) for a tied and an untied tiny Qwen2."""
    d = str(tmp_path_factory.mktemp("tied" if request.param else "untied"))
    return make_tiny_hf_model(d, tied=request.param), d


@pytest.fixture
def rng():
    return np.random.RandomState(0)


@pytest.fixture(scope="session")
def model():
    """The decoder tests' tiny backbone (sharpened logits, so greedy decoding is not a coin toss)."""
    from helpers import scaled_random_model, tiny_config

    return scaled_random_model(tiny_config(), seed=3, logit_scale=4.0)


@pytest.fixture(scope="session")
def prompts():
    """Three prompts of different lengths (5, 11, 3 tokens) for the decoder tests."""
    rng = np.random.RandomState(7)
    return [rng.randint(0, 128, n).tolist() for n in (5, 11, 3)]
