"""The loss options of a ``diffusion`` config section (the model itself comes from ``ldm_jax.ldm.build``)."""

from __future__ import annotations


def weighting_kwargs(section) -> dict:
    d = section.to_dict() if hasattr(section, "to_dict") else dict(section or {})
    return {"gamma": float(d.get("min_snr_gamma", 5.0))} if d.get("weighting") == "min_snr" else {}
