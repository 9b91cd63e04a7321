"""`python -m clp_jax.bench`: every decoding mode and its peers side by side in one run."""

from clp_jax.bench.run import main

if __name__ == "__main__":
    raise SystemExit(main())
