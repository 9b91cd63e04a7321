"""Training checkpoints: an Orbax CheckpointManager over the heads' parameters and optimiser state.

Orbax writes each step into a temporary directory and renames it into place when the step is
complete, so a process killed at any moment (SIGKILL included, mid-save included) leaves the last
complete step readable; `latest_step` never returns a partial one.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from clp_jax.drafting.checkpoint import CheckpointError


class TrainCheckpoints:
    """Saves every `every` steps and at the end, keeps the last `keep`.

    A step is written only after it succeeded (non-finite losses raise before any save), so a broken
    state never overwrites a good checkpoint. `meta` (what a resumed run must share with the saved
    one) can be read on its own, before the state is restored onto arrays of a possibly other shape.
    """

    def __init__(self, directory: str, every: int, keep: int):
        # local paths are made absolute; URIs such as gs://bucket/run go to Orbax as they are
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every,
                                                                 create=True))

    def save(self, step: int, params, opt_state, meta: dict, force: bool = False) -> bool:
        if step in self.manager.all_steps():  # e.g. the final save right after an interval save
            return False
        saved = self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
            meta=ocp.args.JsonSave(meta)), force=force)
        self.manager.wait_until_finished()
        return saved

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def meta(self, step: int) -> dict:
        """The JSON meta saved with `step` (nothing else is read)."""
        try:
            return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:
            raise CheckpointError(f"Checkpoint step {step} in {self.directory} is unreadable ({e}).") from e

    def restore(self, step: int, params, opt_state):
        """(params, opt_state) of `step`, restored onto the given arrays' shapes and shardings."""
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": opt_state})
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        except Exception as e:
            raise CheckpointError(f"Could not restore step {step} from {self.directory} ({e}). Use a new "
                                  "run.out_dir, or restore the settings of that run.") from e
        return out.state["params"], out.state["opt_state"]

    def close(self):
        self.manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
