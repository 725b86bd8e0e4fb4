"""SamplerSpec: one record per sampler; its facts against the rules sampling used to spell out by name."""

import inspect
import itertools

import jax
import jax.numpy as jnp
import pytest

from ldm_jax import diffusion
from ldm_jax.diffusion import samplers as samplers_lib
from ldm_jax.types import ConfigError

NAMES = ("ddpm", "ddim", "euler", "euler_ancestral", "heun", "flow_heun", "dpmpp_2m", "dpmpp_2m_sde", "unipc")
# The tables the specs replace (samplers.STYLE, sampling._STOCHASTIC and _check_noise_options).
OLD_STYLE = dict(ddpm="ddim", ddim="ddim", euler="euler", euler_ancestral="euler", heun="euler", flow_heun="euler",
                 dpmpp_2m="multistep", dpmpp_2m_sde="multistep", unipc="multistep")
OLD_STOCHASTIC = ("ddpm", "euler_ancestral", "dpmpp_2m_sde")


def old_eta(sampler, eta):
    return (1.0 if sampler == "euler_ancestral" else 0.0) if eta is None else eta


def test_one_spec_per_sampler_and_option_names():
    assert diffusion.SAMPLERS == samplers_lib.SAMPLERS == tuple(diffusion.SAMPLER_SPECS) == NAMES
    for name, spec in diffusion.SAMPLER_SPECS.items():
        assert spec.name == name and diffusion.sampler_spec(name) is spec
        assert spec.grid_style == OLD_STYLE[name]
        assert set(spec.options) <= set(diffusion.SAMPLER_OPTIONS)
    assert diffusion.SAMPLER_OPTIONS == ("eta", "churn", "s_tmin", "s_tmax", "s_noise", "variance")
    assert diffusion.sampler_spec("euler_ancestral").default_eta == 1.0
    keywords = inspect.signature(diffusion.sample).parameters
    assert set(diffusion.GRID_OPTIONS + diffusion.SAMPLER_OPTIONS) <= set(keywords)
    grid_kw = [p.name for p in inspect.signature(diffusion.time_grid).parameters.values() if p.kind == p.KEYWORD_ONLY]
    assert set(diffusion.GRID_OPTIONS) == set(grid_kw) - {"style"} | {"spacing"}


def test_old_rules_lower_order_final_and_logsnr_floor():
    for name, spec in diffusion.SAMPLER_SPECS.items():
        for prediction in diffusion.PREDICTIONS:
            # flow_heun never divides by alpha: like ddim/ddpm, only an eps network needs the floor
            assert spec.floors_logsnr(prediction) == (name not in ("ddim", "ddpm", "flow_heun") or prediction == "eps")
        if spec.grid_style == "multistep":  # the single-step samplers ignore lower_order_final
            for final, n in itertools.product(("zero", "sigma_min"), (5, 14, 15, 30)):
                old = True if name == "unipc" else (final == "zero" or n < 15)
                assert spec.lower_order_final(final, n) == old, (name, final, n)


@pytest.mark.parametrize("eta", [None, 0.0, 0.5])
@pytest.mark.parametrize("churn", [0.0, 2.0])
def test_is_stochastic_and_option_checks_match_the_old_rules(eta, churn):
    for name, spec in diffusion.SAMPLER_SPECS.items():
        e = old_eta(name, eta)
        assert spec.is_stochastic(eta, churn) == (name in OLD_STOCHASTIC or e > 0 or churn > 0), name
        assert spec.eta(eta) == e
        old_invalid = (e != 0 and name not in ("ddim", "euler_ancestral")) or (
            churn != 0 and name not in ("euler", "heun")
        )
        if old_invalid:
            with pytest.raises(ConfigError, match="does not take"):
                samplers_lib.check_sampler_options(name, eta=eta, churn=churn)
        else:
            samplers_lib.check_sampler_options(name, eta=eta, churn=churn)


def test_option_errors_are_one_line():
    for name in NAMES:  # sample() passes every keyword; the neutral values fit every sampler
        samplers_lib.check_sampler_options(
            name, eta=None, churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0, variance="small"
        )
    with pytest.raises(ConfigError, match="eta=0.5: eta is for ddim and euler_ancestral") as err:
        samplers_lib.check_sampler_options("dpmpp_2m", eta=0.5, churn=0.0)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="churn is for euler and heun"):
        samplers_lib.check_sampler_options("ddim", eta=0.0, churn=1.0)
    with pytest.raises(ConfigError, match="variance is for ddpm"):
        samplers_lib.check_sampler_options("ddim", variance="large")
    samplers_lib.check_sampler_options("ddpm", variance="large")
    samplers_lib.check_sampler_options("heun", churn=1.0, s_noise=1.003, s_tmin=0.05)
    with pytest.raises(ConfigError, match="did you mean 'churn'"):
        samplers_lib.check_sampler_options("heun", chrun=1.0)
    with pytest.raises(ConfigError, match="did you mean 'dpmpp_2m'"):
        diffusion.sampler_spec("dpm++")
    with pytest.raises(ConfigError, match="did you mean 'euler_ancestral'"):
        diffusion.sampler_spec("euler_ancestal")
    with pytest.raises(ConfigError, match="NFE"):
        diffusion.sampler_spec("heun").steps_for_nfe(0)


def test_nfe_and_steps_for_nfe():
    for spec, final in itertools.product(diffusion.SAMPLER_SPECS.values(), ("zero", "sigma_min")):
        for n in range(1, 41):
            steps = spec.steps_for_nfe(n, final)
            assert steps >= 1
            if n >= spec.nfe(1, final):
                assert spec.nfe(steps, final) <= n < spec.nfe(steps + 1, final), (spec.name, final, n)
    heun = diffusion.sampler_spec("heun")
    for n in range(1, 41):
        assert heun.steps_for_nfe(n) == max(1, (n + 1) // 2)  # what the sweeps used
        assert heun.nfe(n) == 2 * n - 1 and heun.nfe(n, "sigma_min") == 2 * n
        assert diffusion.sampler_spec("unipc").nfe(n) == diffusion.sampler_spec("ddim").steps_for_nfe(n) == n


@pytest.mark.parametrize("final,schedule", [("zero", "cosine"), ("sigma_min", "scaled_linear")])
def test_nfe_counts_network_calls(final, schedule):
    """The network is called spec.nfe(steps) times: heun's lax.cond skips the correction into sigma = 0."""
    s = diffusion.get_schedule(schedule)
    x = jnp.ones((1, 2))
    for name in ("heun", "euler", "unipc"):
        calls = []

        def net(x, t, calls=calls):
            jax.debug.callback(lambda: calls.append(1))
            return 0.1 * x

        out = diffusion.sample(net, x, schedule=s, sampler=name, num_steps=3, final=final)
        jax.block_until_ready(out)
        jax.effects_barrier()
        assert len(calls) == diffusion.sampler_spec(name).nfe(3, final), (name, final, len(calls))
