"""LAR-Gen training in real ComfyUI on small SDXL-structured networks (the UNet of ``largen_layouts.SMALL``: 64
channels, two levels; ComfyUI's SDXL text encoders with three layers each; a two-layer 128-wide CLIP vision model of
ComfyUI's own class; the full SD VAE) and three synthetic (image, object mask, local prompt) triples.

Both stages: the loss goes down on a fixed batch (fixed timesteps and noise), only the parameters the paper trains
get gradients and change, gradient checkpointing gives the same loss and gradients, prompt dropout draws text and
image independently at the configured rates and uses the empty prompt / zero image, bad configurations fail clearly,
the command line trains, samples, saves and resumes, and the files it writes load in Load LAR-Gen / Load LAR-Gen
RefineNet in a graph and change what KSampler makes.

The command line runs in a subprocess as ``python <this file> largen --config …``: ``train.main`` exactly as
``python train.py largen`` runs it, except that the text encoders and the CLIP vision model are built at their small
test depth before their weights are read from the configured files (ComfyUI's own loaders only build the full-size
SDXL text encoders / ViT-H, far too slow for the CPU).
"""
import dataclasses
import importlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import test_largen_graph
from test_largen_graph import _graph
from training_support import fit, loss_rows, mixed_precision_losses, run_train_py
from training_support import pack as _pack, write_data, install_output

ROOT = Path(__file__).resolve().parents[2]
CLIP_W = 128                       # the small CLIP vision width (ViT-H's is 1280)
TE_LAYERS = {"clip_l_model_config": {"num_hidden_layers": 3}, "clip_g_model_config": {"num_hidden_layers": 3}}


# -- small encoders (also used by the command-line subprocess below) ------------------------------------------
def small_sdxl_clip(seed=0, path=None):
    """ComfyUI's SDXL text encoders (CLIP-L + CLIP-G, real tokenizers) with three layers each: random (seeded) or the
    weights of ``path`` (a state dict of such a model)."""
    import comfy.sd
    import comfy.sdxl_clip
    import comfy.supported_models_base
    import comfy.utils
    target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    clip = comfy.sd.CLIP(target, model_options=TE_LAYERS)
    if path is not None:
        missing, unexpected = clip.load_sd(comfy.utils.load_torch_file(str(path), safe_load=True), full_model=True)
        assert not unexpected and all("logit_scale" in k or "text_projection" in k for k in missing), missing
        return clip
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in clip.cond_stage_model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.02 * r if "norm" in name and name.endswith("weight") else 0.02 * r)
    return clip


def small_clip_vision(comfy_path, folder, seed=0, path=None):
    """ComfyUI's ClipVisionModel (the ViT-H config at width 128, two layers), as the CITestClipVision node builds it
    (same seeded weights), or with the weights of ``path``."""
    import comfy.clip_vision as cv
    import comfy.utils
    cfg = dict(json.loads((Path(comfy_path) / "comfy" / "clip_vision_config_h.json").read_text()),
               hidden_size=CLIP_W, intermediate_size=4 * CLIP_W, num_attention_heads=CLIP_W // 64,
               num_hidden_layers=2, projection_dim=64)
    cfg_path = Path(folder) / f"vit_{CLIP_W}.json"
    cfg_path.write_text(json.dumps(cfg))
    model = cv.ClipVisionModel(str(cfg_path))
    if path is not None:
        missing, _ = model.load_sd(comfy.utils.load_torch_file(str(path), safe_load=True))
        assert not missing, missing
        return model
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.model.named_parameters():
            p.copy_(1 + 0.02 * torch.randn(p.shape, generator=g) if "norm" in name and "weight" in name
                    else 0.02 * torch.randn(p.shape, generator=g))
    return model


def _cli_main(argv):
    """``python train.py largen …`` with the small encoders' architectures (their weights come from the files)."""
    # the log set up before ComfyUI is imported (which installs its own handler), as train.py does
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sys.path.insert(0, str(ROOT))
    import train
    train.import_pack()
    train.METHODS.setdefault("largen", "training.largen")
    mod = importlib.import_module(f"{train.PACKAGE}.training.largen")
    import comfy.sd
    import comfy.utils

    def load_encoders(cfg):
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(cfg.vae, safe_load=True))
        return small_sdxl_clip(path=cfg.clip), vae

    mod.load_encoders = load_encoders
    mod.load_clip_vision = lambda path: small_clip_vision(train._comfyui_path(), Path(path).parent, path=path)
    train.main(argv)


# -- fixtures --------------------------------------------------------------------------------------------------
clip_vision_node = test_largen_graph.clip_vision_node      # registers CITestClipVision (the graphs' CLIP vision)


def input_files(comfy, comfy_models, d: Path) -> dict:
    """Every input file of a run, written to ``d``: the SDXL-inpainting base UNet, the IP-Adapter-Plus resampler, a
    LAR-Gen checkpoint (stage 2's main model, carrying its resampler), the text encoders, the CLIP vision model and
    the VAE -> {name: path}, and ``objects``: the text encoders and CLIP vision model the files were written from."""
    import largen_layouts as L
    from safetensors.torch import save_file
    res = dict(embedding_dim=CLIP_W)
    save_file(L.largen_checkpoint(drop_ip=99), str(d / "sdxl_inpaint_base.safetensors"))
    save_file(L.largen_checkpoint(in_channels=4, drop_ip=99), str(d / "sdxl_text2img.safetensors"))
    torch.save(L.image_proj(**res), d / "ip_plus.bin")
    main = {k: v for k, v in L.largen_checkpoint(seed=3, conditioner=True, clip_width=CLIP_W, resampler=res).items()
            if not k.startswith("conditioner.embedders.0.")}
    for k in main:              # decoder self-attention values and outputs that matter, so the RefineNet's tokens do
        if ".output_blocks." in k and (".attn1.to_v." in k or ".attn1.to_out.0.weight" in k):
            main[k] = main[k] * 8
    save_file(main, str(d / "largen_main.safetensors"))
    clip = small_sdxl_clip(seed=0)
    save_file({k: v.contiguous() for k, v in clip.cond_stage_model.state_dict().items()},
              str(d / "clip_small.safetensors"))
    cv = small_clip_vision(comfy.path, d, seed=0)
    save_file({k: v.contiguous() for k, v in cv.model.state_dict().items()}, str(d / "clip_vision_small.safetensors"))
    vae_name = comfy_models.sd15_vae()                # the SDXL VAE has the same architecture
    return dict(dir=d, base=d / "sdxl_inpaint_base.safetensors", text2img=d / "sdxl_text2img.safetensors",
                image_proj=d / "ip_plus.bin", largen=d / "largen_main.safetensors", clip=d / "clip_small.safetensors",
                clip_vision=d / "clip_vision_small.safetensors", vae=comfy.folder_paths.get_full_path("vae", vae_name),
                objects=dict(clip=clip, clip_vision=cv))


@pytest.fixture(scope="module")
def files(comfy, comfy_models, tmp_path_factory):
    """:func:`input_files`, with the VAE among the ``objects`` the in-process trainers take."""
    from comfy.sd import VAE
    from comfy.utils import load_torch_file
    out = input_files(comfy, comfy_models, tmp_path_factory.mktemp("largen_train_files"))
    out["objects"]["vae"] = VAE(sd=load_torch_file(out["vae"], safe_load=True))
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("largen_data"), ["a red apple", "a small wooden boat",
                                                                "a green cup on a table"],
                      box=lambda i: (16, 44, 20 + 8 * i, 52 + 4 * i))


def _trainer(comfy, files, data_dir, out, stage=1, **kw):
    mod = _pack(comfy, "training.largen")
    args = dict(stage=stage, clip_vision=str(files["clip_vision"]), data=str(data_dir), output=str(out),
                clip=str(files["clip"]), vae=str(files["vae"]), resolution=64, drop_text=0.0, drop_image=0.0)
    if stage == 1:
        args.update(base=str(files["base"]), image_proj=str(files["image_proj"]))
    else:
        args.update(largen=str(files["largen"]))
    args.update(kw)
    o = files["objects"]
    trainer = mod.LARGenTrainer(mod.LARGenConfig(**args), clip=o["clip"], vae=o["vae"], clip_vision=o["clip_vision"])
    return trainer, trainer.dataset()


def _grads(trainer, b):
    trainer.optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    trainer.losses(b)["loss"].backward()


# -- stage 1 ---------------------------------------------------------------------------------------------------
def test_stage1_loss_goes_down_and_trains_the_unet_and_subject_projections(comfy, files, data_dir, tmp_path):
    trainer, data = _trainer(comfy, files, data_dir, tmp_path, lr=2e-4)
    assert trainer.beta == 1.0
    b = trainer.batch(data, [0, 1], dropout=False)
    _grads(trainer, b)
    adapter, unet = trainer.adapter, trainer.unet
    for name, p in adapter.named_parameters():
        if name.startswith(("to_k_ip", "to_v_ip")):            # every cross-attention's W_k', W_v'
            assert p.grad is not None and p.grad.abs().max() > 0, name
        else:                                                  # the resampler is frozen (paper)
            assert p.grad is None and not p.requires_grad, name
    with_grad = [n for n, p in unet.named_parameters() if p.grad is not None and p.grad.abs().max() > 0]
    assert len(with_grad) > 0.9 * len(list(unet.parameters()))
    assert sorted(trainer.named) == sorted(f"adapter.{n}" for n, _ in adapter.named_parameters()
                                           if n.startswith("to_")) + sorted(f"unet.{n}" for n, _ in
                                                                             unet.named_parameters())
    resampler = {k: v.clone() for k, v in adapter.resampler.state_dict().items()}
    before, after = fit(trainer, b, 4)
    print(f"stage 1 fixed-batch loss {before:.4f} -> {after:.4f}")
    assert after < 0.9 * before, (before, after)
    assert all(torch.equal(v, adapter.resampler.state_dict()[k]) for k, v in resampler.items())


def test_stage1_subject_only_leaves_the_unet_alone(comfy, files, data_dir, tmp_path):
    trainer, data = _trainer(comfy, files, data_dir, tmp_path, train="subject", lr=1e-3)
    b = trainer.batch(data, [0, 2], dropout=False)
    unet = {k: v.clone() for k, v in trainer.unet.state_dict().items()}
    ip = trainer.adapter.to_k_ip["middle_0_0"].weight.detach().clone()
    _grads(trainer, b)
    assert all(p.grad is None for p in trainer.unet.parameters())
    assert all(k.startswith("adapter.to_") for k in trainer.named)
    trainer.train_step(b)
    assert all(torch.equal(v, trainer.unet.state_dict()[k]) for k, v in unet.items())
    assert not torch.equal(ip, trainer.adapter.to_k_ip["middle_0_0"].weight)


def test_initial_subject_projections_copy_the_text_projections(comfy, files, data_dir, tmp_path):
    trainer, _ = _trainer(comfy, files, data_dir, tmp_path)
    sites = _pack(comfy, "nodes.branch_unet").transformer_sites(trainer.unet)
    assert sorted(trainer.adapter.sites) == sorted(sites) and len(sites) == 4
    for site, tb in sites.items():
        name = "_".join(map(str, site))
        assert torch.equal(trainer.adapter.to_k_ip[name].weight, tb.attn2.to_k.weight)
        assert torch.equal(trainer.adapter.to_v_ip[name].weight, tb.attn2.to_v.weight)


# -- stage 2 ---------------------------------------------------------------------------------------------------
def test_stage2_trains_only_the_refinenet_cross_attention_and_projector(comfy, files, data_dir, tmp_path):
    trainer, data = _trainer(comfy, files, data_dir, tmp_path, stage=2, lr=1e-3)
    assert trainer.beta == 0.3
    net = trainer.refine.net
    b = trainer.batch(data, [0, 1], dropout=False)
    _grads(trainer, b)
    assert all(p.grad is None for p in trainer.unet.parameters())
    assert all(p.grad is None for p in trainer.adapter.parameters())
    moved = {n for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
    assert moved and all(".attn2." in n or n.startswith("projector.") for n in moved)
    assert {"projector.weight", "projector.bias"} <= moved
    assert any(".attn2.to_k." in n for n in moved) and any(".attn2.to_q." in n for n in moved)
    frozen_ref = {k: v.clone() for k, v in net.state_dict().items() if ".attn2." not in k and "projector" not in k}
    main = {k: v.clone() for k, v in trainer.unet.state_dict().items()}
    before, after = fit(trainer, b, 3)
    print(f"stage 2 fixed-batch loss {before:.4f} -> {after:.4f}")
    assert after < 0.9 * before, (before, after)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in frozen_ref.items())
    assert all(torch.equal(v, trainer.unet.state_dict()[k]) for k, v in main.items())


def test_refinenet_starts_as_a_copy_of_the_main_unet(comfy, files, data_dir, tmp_path):
    trainer, _ = _trainer(comfy, files, data_dir, tmp_path, stage=2)
    ref, main = trainer.refine.net.state_dict(), trainer.unet.state_dict()
    assert torch.equal(ref["input_blocks.0.0.weight"], main["input_blocks.0.0.weight"][:, :4])
    same = [k for k in ref if not k.startswith(("projector.", "input_blocks.0.0.weight"))]
    assert same and all(torch.equal(ref[k], main[k]) for k in same)
    assert ref["projector.weight"].shape == (2048, CLIP_W)
    ref["output_blocks.0.1.transformer_blocks.0.attn2.to_q.weight"].add_(1)      # not the main UNet's storage
    assert not torch.equal(ref["output_blocks.0.1.transformer_blocks.0.attn2.to_q.weight"],
                           main["output_blocks.0.1.transformer_blocks.0.attn2.to_q.weight"])


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(comfy, files, data_dir, tmp_path, checkpoint_calls):
    calls = checkpoint_calls
    results = []
    trainer, data = _trainer(comfy, files, data_dir, tmp_path, stage=2)
    b = trainer.batch(data, [0, 1], dropout=False)
    n_unet = sum(1 for m in trainer.unet.modules() if m in set(trainer.checkpointed_modules()))
    for checkpointing in (False, True):
        calls.clear()
        trainer.cfg = dataclasses.replace(trainer.cfg, gradient_checkpointing=checkpointing)
        trainer.optimizer.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        loss = trainer.losses(b)["loss"]
        loss.backward()
        if checkpointing:      # every res block / transformer the UNet and the RefineNet ran (the RefineNet stops
            assert n_unet < len(calls) <= len(trainer.checkpointed_modules())   # after its last decoder transformer)
        else:
            assert not calls
        results.append((loss.detach(), {n: p.grad.clone() for n, p in trainer.named.items() if p.grad is not None}))
        assert all("forward" not in m.__dict__ for m in trainer.checkpointed_modules())   # the UNet as it was
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    assert results[0][1].keys() == results[1][1].keys() and results[0][1]
    for n in results[0][1]:
        torch.testing.assert_close(results[0][1][n], results[1][1][n], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("stage", [1, 2])
def test_mixed_precision_steps(comfy, files, data_dir, tmp_path, stage):
    """bf16 / fp16 autocast (fp16 with loss scaling): the loss is float32's to half precision, and a step leaves
    finite float32 weights that moved."""
    losses = mixed_precision_losses(
        lambda mp: _trainer(comfy, files, data_dir, tmp_path / mp, stage=stage, mixed_precision=mp, lr=1e-4)[0],
        lambda trainer: trainer.batch(trainer.dataset(), [0, 1], dropout=False),
        lambda trainer: trainer.named.items())
    for mp in set(losses) - {"no"}:
        assert losses[mp] == pytest.approx(losses["no"], rel=0.05) and losses[mp] != losses["no"], (mp, losses)


# -- prompt dropout ----------------------------------------------------------------------------------------------
def test_prompt_dropout_is_independent_at_the_configured_rates_and_uses_the_null_prompts(comfy, files, data_dir,
                                                                                         tmp_path):
    trainer, data = _trainer(comfy, files, data_dir, tmp_path, drop_text=0.3, drop_image=0.5)
    text, image = trainer.dropout(20000, torch.Generator().manual_seed(1))
    assert abs(float(text.float().mean()) - 0.3) < 0.02
    assert abs(float(image.float().mean()) - 0.5) < 0.02
    assert abs(float((text & image).float().mean()) - 0.15) < 0.015          # independent: p_text * p_image
    again = trainer.dropout(20000, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], text) and torch.equal(again[1], image)          # the seed decides
    rows = [0, 1, 2, 0, 1, 2]
    b = trainer.batch(data, rows, torch.Generator().manual_seed(3))
    dt, di = b["drop_text"], b["drop_image"]
    assert dt.any() and (~dt).any() and di.any() and (~di).any() and not torch.equal(dt, di)
    empty, empty_pooled, _ = trainer.encode_text("")
    prompts = [data[i][2] for i in rows]
    for r in range(len(rows)):
        ctx, pooled = (empty, empty_pooled) if dt[r] else trainer.encode_text(prompts[r])[:2]
        assert torch.equal(b["context"][r], ctx[0]) and torch.equal(b["pooled"][r], pooled[0])
        is_zero = torch.equal(b["tokens"][r], trainer.zero_tokens[0])
        assert is_zero == bool(di[r])
    assert not torch.equal(trainer.encode_text(prompts[0])[0], empty)
    trainer.cfg = dataclasses.replace(trainer.cfg, drop_text=0.0, drop_image=0.0)
    t0, i0 = trainer.dropout(1000, torch.Generator().manual_seed(1))
    assert not t0.any() and not i0.any()


# -- bad configurations ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case,match", [
    ("stage2_without_model", "stage 2 trains the RefineNet on a trained main model"),
    ("resolution", "resolution must be a multiple of 8"),
    ("text2img_base", "expected an SDXL UNet .* 9 input channels"),
    ("no_image_proj", "carries no IP-Adapter-Plus resampler: set image_proj"),
    ("drop", "drop_text is a probability"),
    ("missing_mask", "have no name.mask.png beside them: img9.png"),
])
def test_bad_configurations_give_clear_errors(comfy, files, data_dir, tmp_path, case, match):
    kw, stage = {}, 1
    if case == "stage2_without_model":
        stage, kw = 2, dict(largen="")
    elif case == "resolution":
        kw = dict(resolution=100)
    elif case == "text2img_base":
        kw = dict(base=str(files["text2img"]))
    elif case == "no_image_proj":
        kw = dict(image_proj="")
    elif case == "drop":
        kw = dict(drop_text=1.5)
    elif case == "missing_mask":
        d = tmp_path / "data"
        shutil.copytree(data_dir, d)
        Image.new("RGB", (32, 32)).save(d / "img9.png")
        kw = dict(data=str(d))
    with pytest.raises(Exception, match=match):
        trainer, _ = _trainer(comfy, files, data_dir, tmp_path, stage=stage, **kw)
        trainer.run()


# -- the command line, and the files in the loader nodes -----------------------------------------------------------
def _train_cli(comfy, files, data_dir, out, steps):
    cfg = out.parent / "largen.toml"
    cfg.write_text(f'base = "{files["base"]}"\nimage_proj = "{files["image_proj"]}"\nclip = "{files["clip"]}"\n'
                   f'vae = "{files["vae"]}"\nclip_vision = "{files["clip_vision"]}"\ndata = "{data_dir}"\n'
                   f'output = "{out}"\nresolution = 64\nbatch_size = 2\nlog_every = 1\nsave_every = 1\n'
                   "sample_every = 2\nsample_steps = 2\nlr = 1e-4\n")
    return run_train_py(comfy, "largen", "--stage", "1", "--config", str(cfg), "--steps", str(steps),
                        script=Path(__file__), env=dict(PYTHONPATH=os.pathsep.join(
                            [str(ROOT / "tests" / "unit"), str(ROOT / "tests" / "integration")])))


def _largen_graphs(comfy, run_prompt, vae_name, variants):
    """One prompt with a KSampler per variant (keyword sets of test_largen_graph._graph) -> their latents."""
    g = comfy.graph()
    nodes = [_graph(g, vae_name, counter=False, steps=2, **kw) for kw in variants]
    r = run_prompt(g)
    return [r.output(n["sampler"].id, 0)["samples"] for n in nodes]


@pytest.fixture(scope="module")
def vae_name(comfy_models):
    return comfy_models.sd15_vae()


@pytest.mark.usefixtures("clip_vision_node")
def test_command_line_trains_samples_saves_and_resumes_and_the_file_loads(
        comfy, run_prompt, files, data_dir, tmp_path, vae_name):
    out = tmp_path / "run"
    _train_cli(comfy, files, data_dir, out, 2)
    assert (out / "samples" / "step_0000002.png").exists()
    assert Image.open(out / "samples" / "step_0000002.png").size == (3 * 64, 64)
    assert torch.load(out / "state.pt", weights_only=True)["step"] == 2
    _train_cli(comfy, files, data_dir, out, 3)                  # resumes at step 2
    rows = loss_rows(out)
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(np.isfinite(float(r["loss"])) and float(r["loss"]) > 0 for r in rows)
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["step"] == 3

    folder = comfy.models_dir / "largen"
    folder.mkdir(parents=True, exist_ok=True)
    install_output(out / "largen_stage1.safetensors", folder, "largen_trained_test.safetensors")
    init, _ = _trainer(comfy, files, data_dir, tmp_path / "init")
    init.save(folder / "largen_init_test.safetensors")
    comfy.folder_paths.filename_list_cache.clear()

    nodes = _pack(comfy, "nodes.largen")
    model, adapter = nodes.load_largen(str(folder / "largen_trained_test.safetensors"), None, "float32")
    w = state["trainable"]["module.adapter__to_k_ip__middle_0_0__weight"]   # the engine's wrapper: module.
    assert torch.equal(adapter.patcher.model.to_k_ip["middle_0_0"].weight, w)     # the file holds the trained state
    assert not torch.equal(w, init.adapter.to_k_ip["middle_0_0"].weight)

    kw = dict(ip="from checkpoint", clip_width=CLIP_W)
    trained, untrained, plain = _largen_graphs(comfy, run_prompt, vae_name, [
        dict(ckpt="largen_trained_test.safetensors", **kw), dict(ckpt="largen_init_test.safetensors", **kw),
        dict(ckpt="largen_trained_test.safetensors", subject=False, **kw)])
    assert torch.isfinite(trained).all()
    assert not torch.allclose(trained, untrained)
    assert not torch.allclose(trained, plain)


@pytest.mark.usefixtures("clip_vision_node")
def test_stage2_file_loads_in_the_refinenet_loader_and_changes_the_result(
        comfy, run_prompt, files, data_dir, tmp_path, vae_name):
    trainer, data = _trainer(comfy, files, data_dir, tmp_path, stage=2, lr=1e-3)
    folder = comfy.models_dir / "largen"
    folder.mkdir(parents=True, exist_ok=True)
    trainer.save(folder / "refinenet_init_test.safetensors")
    b = trainer.batch(data, [0, 1], dropout=False)
    for _ in range(2):
        trainer.train_step(b)
    trainer.save(folder / "refinenet_trained_test.safetensors")
    install_output(files["largen"], folder, "largen_stage2_main_test.safetensors")
    comfy.folder_paths.filename_list_cache.clear()
    loaded = _pack(comfy, "nodes.largen").load_refinenet(str(folder / "refinenet_trained_test.safetensors"), "float32")
    mine = trainer.refine.net.state_dict()
    assert all(torch.equal(v, mine[k]) for k, v in loaded.net.state_dict().items())

    kw = dict(ckpt="largen_stage2_main_test.safetensors", ip="from checkpoint", clip_width=CLIP_W, weight=0.3)
    trained, untrained, plain = _largen_graphs(comfy, run_prompt, vae_name, [
        dict(refine=True, refinenet="refinenet_trained_test.safetensors", **kw),
        dict(refine=True, refinenet="refinenet_init_test.safetensors", **kw), kw])
    assert torch.isfinite(trained).all()
    assert not torch.allclose(trained, untrained)
    assert not torch.allclose(trained, plain)


if __name__ == "__main__":
    _cli_main(sys.argv[1:])
