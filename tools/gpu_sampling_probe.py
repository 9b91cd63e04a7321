import sys; sys.path.insert(0, "tests")
import numpy as np, jax, jax.numpy as jnp
from helpers import scaled_random_model, tiny_config
from clp_jax.decoding import Decoder, DecodeConfig
from clp_jax.sampling import SamplingConfig, probs
model = scaled_random_model(tiny_config(), seed=3, logit_scale=4.0)
rng = np.random.RandomState(7)
prompts = [rng.randint(0, 128, n).tolist() for n in (5, 11, 3)]
toks = jnp.asarray([prompts[1]])
h, _ = model(toks, jnp.arange(toks.shape[1])[None])
lg = model.logits(h)[0, -1]
print("logits finite", bool(jnp.all(jnp.isfinite(lg))), "max", float(lg.max()))
p = probs(lg, SamplingConfig(temperature=1.0, top_p=0.9)); print("p sum", float(p.sum()), "nnz", int((p > 0).sum()))
for sc in (SamplingConfig(temperature=1.0), SamplingConfig(temperature=1.0, top_p=0.9)):
    dec = Decoder(model, None, DecodeConfig(mode="ar", max_new_tokens=12, sampling=sc))
    outs = [dec.generate(prompts, seed=s).tokens for s in (0, 0, 1)]
    print(sc, outs[0][1], outs[1][1], outs[2][1])
k = jax.random.key(0)
print([int(jax.random.categorical(k, jnp.log(p))) for _ in range(3)])
