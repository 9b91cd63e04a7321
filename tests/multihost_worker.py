"""One process of a multi-process test job: train.py's main, optionally killed right after a save.

With CLP_TEST_KILL_AFTER_SAVE=S this process SIGKILLs itself as soon as the training checkpoint of
step S is written (a pre-empted pod host); the test kills the other processes then.
"""

import os
import signal
import sys

kill_at = int(os.environ.get("CLP_TEST_KILL_AFTER_SAVE", "0"))
if kill_at:
    from clp_jax.train.checkpoints import TrainCheckpoints

    _save = TrainCheckpoints.save

    def save(self, step, *args, **kw):
        saved = _save(self, step, *args, **kw)
        if saved and step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return saved

    TrainCheckpoints.save = save

import train  # noqa: E402  (the repository root is on PYTHONPATH)

sys.exit(train.main(sys.argv[1:]))
