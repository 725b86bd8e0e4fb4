"""The learned (VDM) noise schedule; it lives in `schedules.py` beside the other schedules (so that
`get_schedule("learned", ...)` needs no import back into this module). Kept as a module name for
``from ldm_jax.diffusion.learned import LearnedSchedule, learned_schedule_init``.
"""

from ldm_jax.diffusion.schedules import LearnedSchedule, learned_schedule_init

__all__ = ["LearnedSchedule", "learned_schedule_init"]
