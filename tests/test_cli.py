"""The console entry point, config overrides and their one-line errors."""

import subprocess
import sys
import textwrap

import pytest

from ldm_jax import configlib
from ldm_jax.types import ConfigError


@pytest.fixture()
def config_file(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text(textwrap.dedent("""
        from ldm_jax.configlib import base_config
        def get_config(arg=None):
            c = base_config()
            if arg == "tiny":
                c.train.num_steps = 3
            return c
    """))
    return str(path)


def _run(*args):
    return subprocess.run([sys.executable, "-m", "ldm_jax", *args], capture_output=True, text=True, timeout=120)


def test_variant_and_overrides_apply(config_file):
    cfg = configlib.load_config(config_file + ":tiny")
    assert cfg.train.num_steps == 3
    configlib.check_overrides([f"--config={config_file}:tiny", "--config.optimizer.lr=3e-4",
                               "--config.train.num_steps", "12", "--config.train.remat=true",
                               "--config.sample.prompts=('a', 'b')"])


def test_misspelled_key_names_nearest(config_file):
    with pytest.raises(ConfigError, match=r"unknown config key 'config.optimizer.lrr'.*'config.optimizer.lr'"):
        configlib.check_overrides([f"--config={config_file}", "--config.optimizer.lrr=3e-4"])
    with pytest.raises(ConfigError, match=r"'config.trian.num_steps'.*'config.train.num_steps'"):
        configlib.check_overrides([f"--config={config_file}", "--config.trian.num_steps=3"])


@pytest.mark.parametrize("override, kind", [("train.num_steps=ten", "integer"), ("optimizer.lr=fast", "number"),
                                            ("train.remat=maybe", "boolean"), ("mesh=3", "section")])
def test_wrong_type_is_one_line(config_file, override, kind):
    with pytest.raises(ConfigError, match=kind) as err:
        configlib.check_overrides([f"--config={config_file}", f"--config.{override}"])
    assert "\n" not in str(err.value)


def test_cli_help_and_errors(config_file, tmp_path):
    top = _run("--help")
    assert top.returncode == 0 and all(c in top.stdout for c in ("train", "sample", "evaluate", "convert"))
    helped = _run("train", "--help")
    assert helped.returncode == 0 and "--workdir" in helped.stdout and "--config" in helped.stdout
    bad = _run("train", f"--config={config_file}", f"--workdir={tmp_path}", "--config.optimizer.lrr=1")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "error: unknown config key 'config.optimizer.lrr' (did you mean 'config.optimizer.lr'?)"]
    typo = _run("trian")
    assert typo.returncode == 2 and "did you mean 'train'" in typo.stderr


def test_frozen_config_boundary():
    import dataclasses

    from ldm_jax.types import FrozenConfig

    @dataclasses.dataclass(frozen=True)
    class Cfg(FrozenConfig):
        channels: tuple = (32, 64)
        heads: int = 4

    cfg = Cfg.from_config({"channels": [8, 16]})
    assert cfg.channels == (8, 16) and hash(cfg) == hash(Cfg(channels=(8, 16)))
    with pytest.raises(ConfigError, match="unknown field 'head'.*'heads'"):
        Cfg.from_config({"head": 2})
