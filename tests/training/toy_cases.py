"""The toy run shared by the loop, resume and distributed tests (and by their subprocesses' config file)."""

from ldm_jax.training import toy

NUM_STEPS = 16
EVERY = 4


def config(data=1, fsdp=1, **toy_overrides):
    c = toy.toy_config()
    c.train.num_steps = NUM_STEPS
    c.train.log_every_steps = 1
    c.checkpoint.every_steps = EVERY
    c.checkpoint.keep = 3
    c.toy.extra = True
    c.toy.update(toy_overrides)
    c.mesh.data, c.mesh.fsdp = data, fsdp
    return c


def get_config(arg=None):
    """Config-file entry point: ``--config=tests/training/toy_cases.py[:data,fsdp]``."""
    if not arg:
        return config()
    data, fsdp = (int(x) for x in arg.split(","))
    return config(data, fsdp)
