"""LoRA files: parity with diffusers + PEFT (unfused and fused), export back to diffusers, kohya, strictness.

The reference is a tiny random diffusers U-Net (SD1 layout: 1x1-conv projections) and a transformers
CLIPTextModel, each given a PEFT adapter with random non-zero A and B, per-module ranks/alphas (U-Net) and
rsLoRA scaling (text encoder), saved with ``StableDiffusionPipeline.save_lora_weights``.
"""

import contextlib
import copy
import importlib.metadata
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from packaging.version import Version

from ldm_jax import models
from ldm_jax.convert import diffusers as dconv
from ldm_jax.convert import hf
from ldm_jax.convert import lora as lconv
from ldm_jax.convert.common import ConversionError, read_safetensors, write_safetensors
from ldm_jax.models import lora

UNET_KW = dict(  # one level keeps the compile short; resnet convs, 1x1-conv projections, both attentions
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16,), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
    attention_head_dim=2, cross_attention_dim=8, norm_num_groups=8,
)
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
IDS = np.array([[62, 5, 9, 63, 63, 63], [62, 1, 2, 3, 4, 63]], np.int64)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@contextlib.contextmanager
def transformers_accepts_installed_peft():
    """transformers 5.24 asks for peft >= 0.22 in add_adapter / load_adapter; the newest peft on the package index
    here is 0.21.2, whose LoRA layers are the same. Lower that floor to the installed version for these tests."""
    import transformers.integrations.peft as tp

    installed = importlib.metadata.version("peft")
    with pytest.MonkeyPatch.context() as mp:
        if Version(installed) < Version(tp.MIN_PEFT_VERSION):
            mp.setattr(tp, "MIN_PEFT_VERSION", installed)
        yield


class LoraPipe:
    """The LoRA half of a StableDiffusionPipeline: load_lora_weights / fuse_lora on a U-Net and a text encoder."""

    hf_device_map = None

    def __init__(self, unet, text_encoder):
        self.unet, self.text_encoder = unet, text_encoder

    @property
    def components(self):
        return {"unet": self.unet, "text_encoder": self.text_encoder}


def make_pipe(unet, text_encoder):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    cls = type("TinyLoraPipe", (LoraPipe, StableDiffusionLoraLoaderMixin), {})
    return cls(unet, text_encoder)


def torch_outputs(unet, text_encoder):
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    with torch.no_grad():
        u = unet(x, torch.tensor([5.0, 800.0]), ctx).sample.numpy().transpose(0, 2, 3, 1)
        t = text_encoder(torch.from_numpy(IDS)).last_hidden_state.numpy()
    return u, t, (x.numpy().transpose(0, 2, 3, 1), np.array([5.0, 800.0], np.float32), ctx.numpy())


def randomize_lora(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(0.3 * torch.randn_like(p))


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """Base models (ours and theirs), the adapted diffusers outputs (unfused, fused) and the diffusers file."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_KW).eval()
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=8, eos_token_id=63, bos_token_id=62, pad_token_id=63)).eval()
    with torch.no_grad():
        for p in [*unet.parameters(), *text.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    base_unet, base_text = copy.deepcopy(unet), copy.deepcopy(text)
    base_out = torch_outputs(base_unet, base_text)[:2]
    unet_cfg = dconv.unet_config_from_diffusers(dict(unet.config))
    text_cfg = hf.clip_text_config_from_hf(text.config.to_dict())
    unet_params = dconv.unet_params_from_state_dict({k: v.numpy() for k, v in unet.state_dict().items()}, unet_cfg)
    text_params = hf.clip_text_params_from_state_dict({k: v.numpy() for k, v in text.state_dict().items()}, text_cfg)

    with transformers_accepts_installed_peft():
        unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS,
                                    rank_pattern={"attn2.to_k": 2}, alpha_pattern={"attn2.to_k": 3}))
        text.add_adapter(LoraConfig(r=2, lora_alpha=5, use_rslora=True, target_modules=TEXT_TARGETS))
    randomize_lora(unet, 1)
    randomize_lora(text, 2)
    unet_out, text_out, inputs = torch_outputs(unet, text)
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(text),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=text.peft_config["default"].to_dict())
    kohya = kohya_file_from_peft(unet, text, folder / "kohya.safetensors")
    pipe = make_pipe(unet, text)
    pipe.fuse_lora()
    fused_unet, fused_text, _ = torch_outputs(unet, text)
    return dict(unet_cfg=unet_cfg, text_cfg=text_cfg, unet_params=unet_params, text_params=text_params,
                base=(base_unet, base_text), base_out=base_out, unet_out=unet_out, text_out=text_out, inputs=inputs,
                fused=(fused_unet, fused_text), file=folder / lconv.WEIGHT_NAME, kohya=kohya)


def kohya_file_from_peft(unet, text, path):
    """A kohya file written straight from the PEFT modules: lora_unet_/lora_te_text_model_ names with '.' -> '_',
    lora_down = lora_A, lora_up = lora_B, alpha = scaling * r (rsLoRA's alpha / sqrt(r) scale included)."""
    tensors = {}
    for prefix, model in (("lora_unet_", unet), ("lora_te_text_model_", text)):
        for name, module in model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                stem = prefix + name.replace(".", "_")
                r = module.r["default"]
                tensors[f"{stem}.lora_down.weight"] = module.lora_A["default"].weight.detach().numpy()
                tensors[f"{stem}.lora_up.weight"] = module.lora_B["default"].weight.detach().numpy()
                tensors[f"{stem}.alpha"] = np.asarray(module.scaling["default"] * r, np.float32)
    write_safetensors(path, tensors, {"ss_network_module": "networks.lora"})
    return path


@pytest.fixture(scope="module")
def ours(ref):
    unet_cfg, text_cfg = ref["unet_cfg"], ref["text_cfg"]
    unet = jax.jit(lambda p, x, t, c: models.UNet(unet_cfg).apply({"params": p}, x, t, c))
    text = jax.jit(lambda p, ids: models.CLIPTextEncoder(text_cfg).apply({"params": p}, ids))
    unet_lora = jax.jit(lambda p, a, x, t, c: unet(lora.apply_lora(p, [(a, 1.0)]), x, t, c))
    text_lora = jax.jit(lambda p, a, ids: text(lora.apply_lora(p, [(a, 1.0)]), ids))
    ids = jnp.asarray(IDS, jnp.int32)

    def outputs(unet_adapter, text_adapter, fused=False):
        if fused:
            return (unet(lora.merge(ref["unet_params"], [(unet_adapter, 1.0)]), *ref["inputs"]),
                    text(lora.merge(ref["text_params"], [(text_adapter, 1.0)]), ids))
        return (unet_lora(ref["unet_params"], unet_adapter, *ref["inputs"]),
                text_lora(ref["text_params"], text_adapter, ids))

    return outputs


def assert_matches(got, want, tol=1e-4):
    for g, w, what in zip(got, want, ("U-Net", "text encoder")):
        err = rel_err(g, w)
        assert err < tol, f"{what}: relative error {err:.2e}"


def test_diffusers_file_matches_diffusers_unfused_and_fused(ref, ours):
    unet_a, text_a, meta = lconv.load_lora(ref["file"], ref["unet_cfg"], ref["text_cfg"])
    assert meta["format"] == "diffusers" and meta["alpha_source"] == "metadata"
    assert json.loads(meta["header"]["lora_adapter_metadata"])["unet.alpha_pattern"] == {"attn2.to_k": 3}
    assert len(unet_a.layers()) == 4 * (2 * 4 + 2) + 5  # 4 transformers x (2 attentions x 4, proj_in, ff) + 5 conv1
    k2 = "down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k"
    assert unet_a.layers()[k2][0].shape == (8, 2) and unet_a.scales()[k2] == 1.5
    assert text_a.scales()["layers_0/attn/query"] == pytest.approx(5 / np.sqrt(2))  # rsLoRA: alpha / sqrt(r)
    assert min(rel_err(b, a) for b, a in zip(ref["base_out"], (ref["unet_out"], ref["text_out"]))) > 0.05
    assert_matches(ours(unet_a, text_a), (ref["unet_out"], ref["text_out"]))
    assert_matches(ours(unet_a, text_a, fused=True), ref["fused"])


def uniform_alpha(adapter, alpha):
    """The same update with one alpha for every layer (each layer's own alpha / alpha folded into up)."""
    scales = adapter.scales()
    return lora.LoraAdapter.from_layers(
        {p: (d, u * scales[p] * d.shape[-1] / alpha) for p, (d, u) in adapter.layers().items()},
        {p: alpha for p in scales})


def test_export_loads_back_into_diffusers(ref, tmp_path):
    unet_a, text_a, _ = lconv.load_lora(ref["file"], ref["unet_cfg"], ref["text_cfg"])
    # diffusers' kohya reader mis-names per-module alphas of attention layers (it looks them up as
    # '...attn2.processor.to_k_lora.down.weight' and warns that they match nothing), so the kohya file it reads
    # here has one alpha for every layer; kohya files with per-layer alphas are checked against ours below.
    for fmt, adapter in (("diffusers", unet_a), ("kohya", uniform_alpha(unet_a, 8.0))):
        file = lconv.save_lora(tmp_path / fmt, adapter, text_a, unet_cfg=ref["unet_cfg"], format=fmt)
        unet, text = (copy.deepcopy(m) for m in ref["base"])
        with transformers_accepts_installed_peft():
            make_pipe(unet, text).load_lora_weights(str(file))
        assert_matches(torch_outputs(unet, text)[:2], (ref["unet_out"], ref["text_out"]))
        again = lconv.load_lora(file, ref["unet_cfg"], ref["text_cfg"])
        for a, b in zip(again[:2], (adapter, text_a)):
            assert a.scales() == pytest.approx(b.scales())
            jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), a.params, b.params)


def test_kohya_file_loads_to_the_same_outputs(ref, ours):
    unet_a, text_a, meta = lconv.load_lora(ref["kohya"], ref["unet_cfg"], ref["text_cfg"])
    assert meta["format"] == "kohya" and meta["alpha_source"] == "keys"
    assert_matches(ours(unet_a, text_a), (ref["unet_out"], ref["text_out"]))


def test_older_diffusers_spellings_alpha_keys_and_bake(ref, tmp_path):
    """lora.down / lora_linear_layer / processor.to_q_lora / to_q_lora names and '<module>.alpha' scalars (no
    metadata) load like lora_A / lora_B with the metadata's alphas; a baked export is the same update."""
    from diffusers.utils import convert_state_dict_to_diffusers

    want = lconv.load_lora(ref["file"], ref["unet_cfg"], ref["text_cfg"])
    old = convert_state_dict_to_diffusers({k: torch.from_numpy(v) for k, v in read_safetensors(ref["file"]).items()})
    renames = ((".attn1.to_q.lora.", ".attn1.processor.to_q_lora."), (".q_proj.lora_linear_layer.", ".to_q_lora."))
    for a, b in renames:
        old = {k.replace(a, b): v for k, v in old.items()}
    old = {k: v.numpy() for k, v in old.items()}
    assert any(".processor.to_q_lora.down." in k for k in old) and any("lora_linear_layer" in k for k in old)
    for comp, prefix, adapter in (("unet", "unet.", want[0]), ("text", "text_encoder.", want[1])):
        table = lconv.unet_lora_layers(ref["unet_cfg"]) if comp == "unet" else lconv.clip_lora_layers(ref["text_cfg"])
        names = {layer.path: name for name, layer in table.items()}
        old.update({f"{prefix}{names[p]}.alpha": np.asarray(a, np.float32) for p, a in adapter.alphas})
    write_safetensors(tmp_path / "old.safetensors", old)
    got = lconv.load_lora(tmp_path / "old.safetensors", ref["unet_cfg"], ref["text_cfg"])
    assert got[2]["alpha_source"] == "keys"
    for a, b in zip(got[:2], want[:2]):
        assert dict(a.alphas) == pytest.approx(dict(b.alphas))
        jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
    baked = lconv.save_lora(tmp_path / "baked.safetensors", want[0], want[1], unet_cfg=ref["unet_cfg"],
                            alpha="bake")
    b_unet, b_text, meta = lconv.load_lora(baked, ref["unet_cfg"], ref["text_cfg"])
    assert meta["alpha_source"] == "rank" and "lora_adapter_metadata" not in meta["header"]
    for a, b, base in ((b_unet, want[0], ref["unet_params"]), (b_text, want[1], ref["text_params"])):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7),
                     lora.merge(base, [(a, 1.0)]), lora.merge(base, [(b, 1.0)]))


def test_stray_key_is_named_in_one_line(ref, tmp_path):
    tensors = read_safetensors(ref["file"])
    stray = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn3.to_q.lora_A.weight"
    write_safetensors(tmp_path / "stray.safetensors", {**tensors, stray: np.zeros((4, 16), np.float32)})
    with pytest.raises(ConversionError) as err:
        lconv.load_lora(tmp_path / "stray.safetensors", ref["unet_cfg"], ref["text_cfg"])
    assert stray in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConversionError, match="so pass its config"):
        lconv.load_lora(ref["file"], ref["unet_cfg"])  # the text encoder layers need text_cfg
    dora = {**tensors, "unet.down_blocks.0.attentions.0.proj_in.lora_magnitude_vector": np.ones(16, np.float32)}
    write_safetensors(tmp_path / "dora.safetensors", dora)
    with pytest.raises(ConversionError, match="proj_in.lora_magnitude_vector' belongs to DoRA"):
        lconv.load_lora(tmp_path / "dora.safetensors", ref["unet_cfg"], ref["text_cfg"])
