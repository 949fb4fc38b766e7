"""LoRA adapters: images equal to diffusers' (`load_lora_weights` through peft) with random
adapters in kohya-ss and diffusers/PEFT format on the tiny model, every spelling merging the
same weights, restoring bit for bit, and clean errors for files that cannot be used."""
from __future__ import annotations

import hashlib
import json
import math
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from sdq.core.errors import InvalidInput, NotFound
from sdq.sdmodel.lora import Adapters, Lora, canonical, diffusers_names, group_by_loras
from sdq.sdmodel.lora_files import a1111_lora_hashes, describe_lora, find_lora
from sdq.sdmodel.pipeline import Pipeline, Request, load_pipeline

from sdq.sdmodel.diffusers_reference import reference_pipeline

SETTINGS = dict(sampler="ddim", steps=4, width=64, height=64)
REQUESTS = [Request("a red cube on a table", "blurry", seed=11, cfg=7.5),
            Request("portrait of an old fisherman, oil", "", seed=5, cfg=7.5)]
PIXEL_TOL = 1
"""As sdq against diffusers without adapters (test_pipeline.py): one 8-bit level."""

Updates = dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]


def random_updates(pipe: Pipeline, seed: int, rank: int, strength: float, attention_only: bool = False) -> Updates:
    """A random (down, up) pair, fp16 as most published files are, for every linear and conv
    layer of the UNet (3x3 "LoCon" convs included; `attention_only`: the transformer blocks',
    as diffusers' training scripts make) and of the text encoder. `strength` scales `up`: 0.5
    at alpha/rank 1/2 moves the tiny model's images by ~16 levels on average."""
    generator = torch.Generator().manual_seed(seed)
    layers = [("unet", path, pipe.unet.get_submodule(path)) for path in diffusers_names(pipe.unet)
              if "transformer_blocks" in path or not attention_only]
    layers += [("text_encoder", path, module) for path, module in pipe.text_encoder.named_modules()
               if isinstance(module, torch.nn.Linear)]
    updates = {}
    for network, path, module in layers:
        shape = module.weight.shape
        down = torch.randn((rank, *shape[1:]), generator=generator) / math.sqrt(math.prod(shape[1:]))
        up = torch.randn((shape[0], rank, *[1] * (len(shape) - 2)), generator=generator) * strength
        updates[network, path] = (down.half(), up.half())
    return updates


def kohya_file(path: Path, pipe: Pipeline, updates: Updates, alpha: float, spelling: str) -> Path:
    """kohya-ss keys, with the UNet named as diffusers ("diffusers") or as LDM ("ldm") does."""
    unet_names = diffusers_names(pipe.unet) if spelling == "diffusers" else {p: p for p in diffusers_names(pipe.unet)}
    tensors = {}
    for (network, layer), (down, up) in updates.items():
        name = f"lora_unet_{unet_names[layer]}" if network == "unet" else f"lora_te_text_model.{layer}"
        stem = name.replace(".", "_")
        tensors.update({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
                        f"{stem}.alpha": torch.tensor(alpha, dtype=torch.float16)})
    save_file(tensors, str(path), metadata={"ss_output_name": path.stem})
    return path


def peft_file(path: Path, pipe: Pipeline, updates: Updates, metadata: dict | None,
              alpha_tensors: float | None = None) -> Path:
    """diffusers/PEFT keys (`unet.<diffusers name>.lora_A.weight`, `text_encoder.text_model...`),
    alpha from diffusers' `lora_adapter_metadata`, or from tensors (`.alpha` for the UNet's
    layers, `.network_alpha` for the text encoder's: both spellings are in use)."""
    unet_names = diffusers_names(pipe.unet)
    tensors = {}
    for (network, layer), (down, up) in updates.items():
        stem = f"unet.{unet_names[layer]}" if network == "unet" else f"text_encoder.text_model.{layer}"
        tensors.update({f"{stem}.lora_A.weight": down, f"{stem}.lora_B.weight": up})
        if alpha_tensors is not None:
            tensors[f"{stem}.{'alpha' if network == 'unet' else 'network_alpha'}"] = torch.tensor(alpha_tensors)
    extra = {"lora_adapter_metadata": json.dumps(metadata)} if metadata else None
    save_file(tensors, str(path), metadata=extra)
    return path


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, tiny_checkpoint) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    pipe = load_pipeline(tiny_checkpoint, device="cpu", dtype="fp32")
    first = random_updates(pipe, seed=1, rank=4, strength=0.5)
    kohya_file(folder / "kohya.safetensors", pipe, first, alpha=2.0, spelling="diffusers")
    kohya_file(folder / "kohya_ldm.safetensors", pipe, first, alpha=2.0, spelling="ldm")
    peft_file(folder / "peft_alpha.safetensors", pipe, first, None, alpha_tensors=2.0)
    second = random_updates(pipe, seed=2, rank=8, strength=0.4, attention_only=True)
    names = {"unet": diffusers_names(pipe.unet), "text_encoder": {}}
    # The LoraConfig fields diffusers writes per network; one layer of each has its own alpha.
    patterns = {"unet": {names["unet"]["input_blocks.1.1.transformer_blocks.0.attn2.to_k"]: 2.0},
                "text_encoder": {"encoder.layers.1.mlp.fc1": 16.0}}
    metadata = {}
    for network, pattern in patterns.items():
        targets = sorted(names[network].get(layer, layer) for net, layer in second if net == network)
        metadata.update({f"{network}.r": 8, f"{network}.lora_alpha": 4.0,
                         f"{network}.target_modules": targets, f"{network}.alpha_pattern": pattern})
    peft_file(folder / "peft.safetensors", pipe, second, metadata)
    return folder


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint, lora_dir) -> Pipeline:
    return load_pipeline(tiny_checkpoint, device="cpu", dtype="fp32", lora_dirs=[lora_dir])


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images]).astype(np.int16)


def diffusers_pixels(ref) -> np.ndarray:
    images = ref(
        prompt=[r.prompt for r in REQUESTS], negative_prompt=[r.negative_prompt for r in REQUESTS],
        generator=[torch.Generator("cpu").manual_seed(r.seed) for r in REQUESTS],
        num_inference_steps=SETTINGS["steps"], guidance_scale=REQUESTS[0].cfg,
        width=SETTINGS["width"], height=SETTINGS["height"], output_type="np",
    ).images
    return (images * 255).round().astype(np.int16)


@pytest.fixture(scope="module")
def reference(lora_dir, tiny_checkpoint):
    """diffusers with both adapters loaded through peft; tests pick their weights."""
    ref = reference_pipeline(tiny_checkpoint, sampler=SETTINGS["sampler"])
    for name in ("kohya", "peft"):
        ref.load_lora_weights(str(lora_dir), weight_name=f"{name}.safetensors", adapter_name=name)
    return ref


@pytest.fixture(scope="module")
def base_pixels(pipe) -> np.ndarray:
    return pixels(pipe.generate(REQUESTS, **SETTINGS))


@pytest.mark.parametrize("loras", [
    [("kohya", 0.8, None)],
    [("kohya", 1.0, None)],
    [("peft", 1.0, None), ("kohya", 0.8, None)],  # with per-layer alphas from diffusers' metadata
], ids=["kohya-0.8", "kohya-1.0", "kohya-0.8+peft-1.0"])
def test_images_match_diffusers(pipe, reference, base_pixels, loras):
    """Within one 8-bit level of diffusers; the adapters move the images by far more (so the
    parity means something), and by more at 1.0 than at 0.8."""
    reference.set_adapters([name for name, _, _ in loras], adapter_weights=[w for _, w, _ in loras])
    ours = pixels(pipe.generate(REQUESTS, loras=loras, **SETTINGS))
    assert np.abs(ours - diffusers_pixels(reference)).max() <= PIXEL_TOL
    assert np.abs(ours - base_pixels).mean() > 5


def parameters(pipe: Pipeline) -> dict[str, torch.Tensor]:
    """Every weight of both networks LoRAs touch, in its plain layout, copied."""
    return {f"{name}.{k}": v.detach().clone() for name, net in (("unet", pipe.unet), ("text", pipe.text_encoder))
            for k, v in net.state_dict().items()}


def test_every_spelling_and_format_merges_the_same_weights(pipe):
    """kohya with diffusers and with LDM UNet names, and PEFT with `.alpha` tensors, hold the
    same tensors: their merged weights must be identical (diffusers spelling is the one checked
    against diffusers; diffusers' own reader misplaces LDM-spelled SD 1.x UNet keys)."""
    merged = {}
    for name in ("kohya", "kohya_ldm", "peft_alpha"):
        pipe.adapters.apply([(name, 0.9, None)])
        merged[name] = parameters(pipe)
    pipe.adapters.restore()
    base = parameters(pipe)
    changed = [k for k in base if not torch.equal(base[k], merged["kohya"][k])]
    text_layers = sum(isinstance(m, torch.nn.Linear) for m in pipe.text_encoder.modules())
    assert len(changed) == len(diffusers_names(pipe.unet)) + text_layers == 282 + 12  # all of them
    for name in ("kohya_ldm", "peft_alpha"):
        assert all(torch.equal(merged["kohya"][k], merged[name][k]) for k in base), name


def test_merge_follows_the_formula(pipe, lora_dir):
    """W + weight * up @ down * alpha / rank: for a linear layer; for a 3x3 conv, the composition
    of its two convolutions (A1111's way of writing it); with PEFT's metadata, the alpha its
    alpha_pattern gives a layer, else its lora_alpha."""
    kohya = {k: v.float() for k, v in load_file(str(lora_dir / "kohya_ldm.safetensors")).items()}
    peft = {k: v.float() for k, v in load_file(str(lora_dir / "peft.safetensors")).items()}

    def kohya_case(layer: str) -> tuple:
        stem = "lora_unet_" + layer.replace(".", "_")
        return "unet", layer, kohya[f"{stem}.lora_down.weight"], kohya[f"{stem}.lora_up.weight"], kohya[f"{stem}.alpha"].item()

    def peft_case(layer: str, alpha: float) -> tuple:
        stem = f"text_encoder.text_model.{layer}"
        return "text_encoder", layer, peft[f"{stem}.lora_A.weight"], peft[f"{stem}.lora_B.weight"], alpha

    for name, weight, cases in (
        ("kohya_ldm", 0.7, [kohya_case("input_blocks.1.0.in_layers.2"),
                            kohya_case("input_blocks.1.1.transformer_blocks.0.attn2.to_v")]),
        ("peft", 0.5, [peft_case("encoder.layers.1.mlp.fc1", 16.0), peft_case("encoder.layers.0.mlp.fc1", 4.0)]),
    ):
        pipe.adapters.restore()
        layers = {(network, layer): getattr(pipe, network).get_submodule(layer) for network, layer, *_ in cases}
        before = {key: module.weight.detach().clone() for key, module in layers.items()}
        pipe.adapters.apply([(name, weight, None)])
        for network, layer, down, up, alpha in cases:
            conv = down.ndim == 4 and down.shape[-1] == 3
            product = F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3) if conv else up @ down
            expected = before[network, layer] + weight * alpha / down.shape[0] * product
            assert torch.allclose(layers[network, layer].weight, expected, rtol=0, atol=1e-6), layer
    pipe.adapters.restore()


@pytest.mark.parametrize(("dtype", "fast"), [("fp32", None), ("fp16", None), ("bf16", None),
                                             ("fp32", "default,+channels_last")])
def test_restore_is_bit_exact(pipe, tiny_checkpoint, lora_dir, dtype, fast):
    """Cycling three sets and back leaves every parameter as loaded; originals are copied once,
    so memory does not grow with the sets used. In fp32 the model also generates in between,
    which re-lays the CPU convs' weights out for oneDNN; channels_last is the CUDA layout."""
    if dtype != "fp32" or fast:
        pipe = load_pipeline(tiny_checkpoint, device="cpu", dtype=dtype, lora_dirs=[lora_dir], fast=fast)
    base = parameters(pipe)
    probe = "input_blocks.1.1.transformer_blocks.0.attn2.to_k"  # a layer all three sets change
    sets = [[("kohya", 1.0, None)], [("kohya", 0.8, None), ("peft", 1.0, None)], [("peft", 0.5, None)]]
    held = []
    for cycle in range(2):
        for loras in sets:
            pipe.adapters.apply(loras)
            assert not torch.equal(pipe.unet.get_submodule(probe).weight, base[f"unet.{probe}.weight"])
            if dtype == "fp32" and cycle == 0:
                pipe.generate(REQUESTS[:1], loras=loras, sampler="ddim", steps=1, width=64, height=64)
        held.append(pipe.adapters.memory_bytes()["originals"])
    pipe.adapters.apply([])
    after = parameters(pipe)
    assert all(torch.equal(after[k], base[k]) for k in base)
    assert held[0] == held[1] <= sum(t.nbytes for t in base.values())


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "after-generating"])
def test_switching_sets_merges_from_the_original_weights(pipe, packed):
    """A switch writes the next set straight over the last one (restoring only the layers the
    next set leaves alone): the weights are bit for bit those the set gets from the base
    model, whether the CPU convs hold their weights plain or laid out for oneDNN (as after
    generating); going back to the base model after that is exact too."""
    sets = [[("kohya", 1.0, None)], [("peft", 0.5, None)],  # peft: attention layers only
            [("peft", 1.0, None), ("kohya", 0.8, None)], [("kohya", 0.7, None)]]
    base = parameters(pipe)
    from_base = []
    for loras in sets:
        pipe.adapters.restore()
        pipe.adapters.apply(loras)
        from_base.append(parameters(pipe))
    pipe.adapters.restore()
    for loras, expected in zip(sets, from_base):
        pipe.adapters.apply(loras)
        if packed:
            pipe.generate(REQUESTS[:1], loras=loras, sampler="ddim", steps=1, width=64, height=64)
        assert all(torch.equal(v, expected[k]) for k, v in parameters(pipe).items())
    pipe.adapters.apply([])
    assert all(torch.equal(v, base[k]) for k, v in parameters(pipe).items())


def write_kohya(path: Path, pipe: Pipeline, change: dict[str, torch.Tensor | None]) -> Path:
    """A small valid kohya file (one layer) with keys replaced or dropped by `change`."""
    stem = "lora_unet_down_blocks_0_attentions_0_proj_in"
    conv = pipe.unet.get_submodule("input_blocks.1.1.proj_in")
    tensors = {f"{stem}.lora_down.weight": torch.zeros(2, conv.in_channels, 1, 1),
               f"{stem}.lora_up.weight": torch.zeros(conv.out_channels, 2, 1, 1)}
    for key, value in change.items():
        if value is None:
            tensors.pop(key)
        else:
            tensors[key] = value
    save_file(tensors, str(path))
    return path


STEM = "lora_unet_down_blocks_0_attentions_0_proj_in"
BAD_FILES = {
    "unknown_key": ({"lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 32, 1, 1),
                     "lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 2, 1, 1)},
                    "lora_unet_down_blocks_9_attentions_0_proj_in.* names no layer of this model's unet"),
    "wrong_shape": ({f"{STEM}.lora_down.weight": torch.zeros(2, 48, 1, 1)},
                    rf"{STEM}.lora_down.weight: down \(2, 48, 1, 1\) and up \(32, 2, 1, 1\) do not fit "
                    r"unet layer input_blocks.1.1.proj_in, weight \(32, 32, 1, 1\)"),
    "nan": ({f"{STEM}.lora_up.weight": torch.full((32, 2, 1, 1), float("nan"))},
            f"{STEM}.lora_up.weight: holds NaN or infinite values"),
    "lycoris": ({f"{STEM}.hada_w1_a": torch.zeros(2, 2)}, f"{STEM}.hada_w1_a: 'hada_w1_a' is not a LoRA weight"),
    "sdxl": ({"lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0)},
             "lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha: a second text encoder's weight"),
    "half": ({f"{STEM}.lora_up.weight": None}, f"{STEM}.lora_down.weight: its up weight is missing"),
    "foreign": ({"model.diffusion_model.out.2.weight": torch.zeros(1)},
                "model.diffusion_model.out.2.weight: not a LoRA key sdq reads"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_files_are_clean_errors(pipe, tmp_path, case):
    change, message = BAD_FILES[case]
    path = write_kohya(tmp_path / f"{case}.safetensors", pipe, change)
    adapters = Adapters(pipe.unet, pipe.text_encoder, dirs=[tmp_path])
    before = parameters(pipe)
    with pytest.raises(InvalidInput, match=message) as error:
        adapters.apply([(case, 1.0, None)])
    assert str(error.value).startswith(f"{path}: ") and "\n" not in str(error.value)
    assert adapters.current == () and all(torch.equal(v, before[k]) for k, v in parameters(pipe).items())


def test_pickles_and_non_safetensors_are_refused(pipe, tmp_path):
    (tmp_path / "fake.safetensors").write_bytes(b"\x00" * 64)
    with open(tmp_path / "evil.pt", "wb") as fh:
        pickle.dump({"lora_unet_conv_in.alpha": Path("/etc/passwd")}, fh, protocol=2)
    torch.save({f"{STEM}.lora_down.weight": torch.zeros(2, 32, 1, 1),
                f"{STEM}.lora_up.weight": torch.zeros(32, 2, 1, 1)}, tmp_path / "plain.pt")
    adapters = Adapters(pipe.unet, pipe.text_encoder, dirs=[tmp_path])
    with pytest.raises(InvalidInput, match=r"fake.safetensors: not a .safetensors file"):
        adapters.apply([("fake", 1.0, None)])
    with pytest.raises(InvalidInput, match=r"evil.pt: refused to unpickle"):
        adapters.apply([("evil", 1.0, None)])
    adapters.apply([("plain", 1.0, None)])  # a tensors-only .pt goes through the restricted loader
    assert adapters.current == (("plain", 1.0, None),)
    adapters.restore()


def test_a_changed_file_under_the_same_name_is_refused(pipe, lora_dir, tmp_path):
    """The worker's copy must be the file the job recorded, also once it was loaded before."""
    path = tmp_path / "x.safetensors"
    path.write_bytes((lora_dir / "kohya.safetensors").read_bytes())
    recorded = describe_lora(path).sha256
    adapters = Adapters(pipe.unet, pipe.text_encoder, dirs=[tmp_path])
    adapters.apply([("x", 1.0, recorded)])
    adapters.restore()
    path.write_bytes((lora_dir / "peft.safetensors").read_bytes())
    now = describe_lora(path).sha256
    with pytest.raises(InvalidInput, match=rf"lora x: {path} has sha256 {now[:12]}, "
                                           rf"not the {recorded[:12]} the job recorded"):
        adapters.apply([("x", 1.0, recorded)])
    assert adapters.current == ()
    with pytest.raises(NotFound, match=rf"lora: no detail.safetensors in {tmp_path}"):
        adapters.apply([("detail", 1.0, None)])


def test_loaded_files_are_bounded(pipe, lora_dir):
    adapters = Adapters(pipe.unet, pipe.text_encoder, dirs=[lora_dir], cache_files=2)
    loaded = [adapters.load(Lora(name)) for name in ("kohya", "kohya_ldm", "peft_alpha", "peft")]
    assert adapters.memory_bytes() == {"originals": 0, "files": loaded[2].nbytes + loaded[3].nbytes}


def test_find_lora_searches_the_folders_in_order(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    (second / "x.safetensors").write_bytes(b"")
    (second / "y.pt").write_bytes(b"")
    (first / "y.ckpt").write_bytes(b"")
    assert find_lora("x", [first, second]) == second / "x.safetensors"
    assert find_lora("y", [first, second]) == first / "y.ckpt"
    for bad in ("../x", "a/x", ""):
        with pytest.raises(InvalidInput, match="is not a LoRA name"):
            find_lora(bad, [first])
    with pytest.raises(NotFound, match="no LoRA folder"):
        find_lora("x", [])


def test_finding_and_hashing_import_no_torch():
    """`sdq submit` checks LoRA names and records hashes without loading the model stack."""
    code = "import sys, sdq.sdmodel.lora_files; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_hashes_are_sdqs_and_a1111s(lora_dir, tmp_path):
    """sha256 of the whole file; A1111's 12 digits: of the bytes after the safetensors header,
    unless the trainer wrote `sshs_model_hash`; of the whole file for a .pt."""
    path = lora_dir / "kohya.safetensors"
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    info = describe_lora(path, "kohya")
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert info.a1111_hash == hashlib.sha256(data[header:]).hexdigest()[:12]
    save_file(load_file(str(path)), str(tmp_path / "other.safetensors"), metadata={"note": "x" * 99})
    assert describe_lora(tmp_path / "other.safetensors").a1111_hash == info.a1111_hash
    save_file({"a": torch.zeros(1)}, str(tmp_path / "s.safetensors"), metadata={"sshs_model_hash": "f" * 64})
    assert describe_lora(tmp_path / "s.safetensors").a1111_hash == "f" * 12
    torch.save({"a": torch.zeros(1)}, tmp_path / "t.pt")
    whole = hashlib.sha256((tmp_path / "t.pt").read_bytes()).hexdigest()
    assert describe_lora(tmp_path / "t.pt").a1111_hash == whole[:12]
    assert a1111_lora_hashes([("de:tail,s", "abc"), ("x", "def")]) == "details: abc, x: def"


def test_groups_gather_each_set_once_in_order():
    a, b = [("a", 1.0, "h1")], [("b", 0.5, "h2"), ("a", 1.0, "h1")]
    items = [(0, a), (1, b), (2, []), (3, a), (4, list(reversed(b))), (5, [])]
    groups = group_by_loras(items, lambda item: item[1])
    assert [[i for i, _ in members] for _, members in groups] == [[0, 3], [1, 4], [2, 5]]
    assert groups[1][0] == canonical(b) == (("a", 1.0, "h1"), ("b", 0.5, "h2"))
    first = group_by_loras(items, lambda item: item[1], first=[])
    assert [[i for i, _ in members] for _, members in first] == [[2, 5], [0, 3], [1, 4]]
