"""The inpaint branch beside the rest of a ComfyUI graph: PowerPaint-v2 task prompts, LoRA, ControlNet and
ComfyUI's low-VRAM (partial) loading, on the shallow SD1.5 harness UNet of test_branch_graph.
"""
import pytest
import torch

from test_branch_graph import LEVELS, _changed, branch_files, counter, tiny_sdxl, unet_ckpt  # noqa: F401 (fixtures)

BRUSHNET, POWERPAINT, PAINTERNET = ("brushnet_sd15_test.safetensors", "powerpaint_test.safetensors",
                                    "painternet_sd15_test.safetensors")
# token ids whose embedding rows stand in for the learned task vectors (any 10 ids of the vocabulary)
TASK_IDS = {"P_obj": list(range(320, 330)), "P_ctxt": list(range(400, 410)), "P_shape": list(range(500, 510))}
# LoRA targets inside the output blocks the branch object-patches (an upsampler's conv, the last block's conv)
LORA_TARGETS = {"output_blocks_1_2_conv": (640, 640), "output_blocks_3_0_out_layers_3": (320, 320)}


# -- files ------------------------------------------------------------------------------------------------
def _checkpoint_clip(comfy, ckpt):
    from safetensors import safe_open
    prefix = "cond_stage_model.transformer."
    with safe_open(comfy.folder_paths.get_full_path("checkpoints", ckpt), framework="pt") as f:
        return {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def task_files(comfy, comfy_models, unet_ckpt):
    """PowerPaint_Brushnet/pytorch_model.bin in the authors' layout (wrapped token embedding + trainable task
    vectors), its encoder = the harness checkpoint's CLIP-L; and a file with the task vectors only."""
    clip = _checkpoint_clip(comfy, unet_ckpt)
    table = clip["text_model.embeddings.token_embedding.weight"]
    vectors = {f"text_model.embeddings.token_embedding.trainable_embeddings.{w}": table[ids].clone()
               for w, ids in TASK_IDS.items()}
    full = {k.replace("token_embedding.weight", "token_embedding.wrapped.weight"): v for k, v in clip.items()}
    full.update(vectors)
    spec = {"kind": "powerpaint_text_encoder", "ckpt": unet_ckpt}
    return dict(
        full=comfy_models.provide("inpaint_branch", "ppt_pytorch_model.bin", dict(spec, part="full"),
                                  lambda p: torch.save(full, p)),
        vectors=comfy_models.provide("inpaint_branch", "ppt_vectors_only.bin", dict(spec, part="vectors"),
                                     lambda p: torch.save(vectors, p)))


@pytest.fixture(scope="module")
def lora_file(comfy_models):
    def write(path):
        from safetensors.torch import save_file
        g, sd = torch.Generator().manual_seed(11), {}
        for name, (cout, cin) in LORA_TARGETS.items():
            sd[f"lora_unet_{name}.lora_down.weight"] = torch.randn(4, cin, 3, 3, generator=g) * 0.05
            sd[f"lora_unet_{name}.lora_up.weight"] = torch.randn(cout, 4, 1, 1, generator=g) * 0.05
            sd[f"lora_unet_{name}.alpha"] = torch.tensor(4.0)
        save_file(sd, str(path))
    return comfy_models.provide("loras", "ci-branch-lora.safetensors", {"targets": sorted(LORA_TARGETS)}, write)


@pytest.fixture(scope="module")
def controlnet_file(comfy_models):
    return comfy_models.sd15_controlnet(levels=LEVELS)


@pytest.fixture(scope="module")
def spy(model_node):
    """CITestBranchSpy: logs every branch-network call: (rows, text context rows, cond_or_uncond, whether the
    branch and the UNet are in ComfyUI's low-VRAM mode at that moment)."""
    log = []

    def patch(m):
        for models in m.additional_models.values():
            for p in models:
                if getattr(p.model, "_ci_spied", False):     # one loader output can feed several nodes
                    continue
                p.model._ci_spied = True

                def hook(mod, args, unet=m.model):
                    x, _, ctx, _, to = args
                    log.append(dict(rows=x.shape[0], ctx=None if ctx is None else ctx.detach().clone(),
                                    chunks=list(to.get("cond_or_uncond") or []),
                                    branch_lowvram=getattr(mod, "model_lowvram", False),
                                    unet_lowvram=getattr(unet, "model_lowvram", False)))
                p.model.register_forward_pre_hook(hook)
        return m

    model_node("CITestBranchSpy", patch)
    return log


# -- graph pieces -----------------------------------------------------------------------------------------
def _base(g, ckpt):
    ck = g.node("CheckpointLoaderSimple", ckpt_name=ckpt)
    return dict(ck=ck, image=g.node("CITestNoiseImage", width=64, height=64, batch_size=1, seed=1),
                mask=g.node("CITestRectMask", width=64, height=64, x=16, y=8, w=24, h=40),
                pos=g.node("CLIPTextEncode", text="a red apple", clip=ck.out(1)),
                neg=g.node("CLIPTextEncode", text="", clip=ck.out(1)))


def _apply(g, b, model, branch, scale=1.0, task=None):
    loader = g.node("ConsistentInpaintBranchLoader", branch=branch, dtype="float32")
    extra = {} if task is None else dict(branch_positive=task.out(0), branch_negative=task.out(1))
    return g.node("ConsistentInpaintApplyBranch", model=model, vae=b["ck"].out(2), image=b["image"].out(0),
                  mask=b["mask"].out(0), branch=loader.out(0), positive=b["pos"].out(0), negative=b["neg"].out(0),
                  scale=scale, start_percent=0.0, end_percent=1.0, **extra)


def _sample(g, model, positive, negative, latent, steps=2):
    s = g.node("KSampler", model=model, seed=0, steps=steps, cfg=3.0, sampler_name="euler", scheduler="normal",
               positive=positive, negative=negative, latent_image=latent, denoise=1.0)
    g.node("CITestCapture", value=s.out(0))
    return s


def _samples(r, node):
    return r.output(node.id, 0)["samples"]


# -- PowerPaint task prompts ----------------------------------------------------------------------------------
def _reference(clip, ids):
    """The task prompt with the placeholder's 10 tokens as ordinary token ids (no inserted vectors)."""
    row = clip.tokenize("")["l"][0]
    return clip.encode_from_tokens({"l": [[row[0]] + [(i, 1.0) for i in ids] + list(row[1:len(row) - len(ids)])]},
                                   return_pooled=True)


def test_task_prompts_put_the_learned_vectors_in_place_of_the_task_word(comfy, run_prompt, graph, unet_ckpt,
                                                                         task_files):
    ck = graph.node("CheckpointLoaderSimple", ckpt_name=unet_ckpt)
    graph.node("CITestCapture", value=ck.out(1))
    nodes = {}
    for task, f in (("text-guided", 1.0), ("object-removal", 1.0), ("shape-guided", 0.3)):
        n = graph.node("ConsistentInpaintPowerPaintTaskPrompt", task_embeddings=task_files["full"], task=task,
                       fitting_degree=f)
        graph.node("CITestCapture", value=n.out(0))
        graph.node("CITestCapture", value=n.out(1))
        nodes[task] = n
    # a file with the task vectors only takes the text encoder from the CLIP input
    only = graph.node("ConsistentInpaintPowerPaintTaskPrompt", task_embeddings=task_files["vectors"],
                      task="object-removal", fitting_degree=1.0, clip=ck.out(1))
    graph.node("CITestCapture", value=only.out(0))
    graph.node("CITestCapture", value=only.out(1))
    r = run_prompt(graph)
    clip = r.output(ck.id, 1)
    ref = {w: _reference(clip, ids) for w, ids in TASK_IDS.items()}

    def check(node, idx, want_tokens, want_pooled):
        (cond, extra), = r.output(node.id, idx)
        assert cond.shape == (1, 77, 768)
        torch.testing.assert_close(cond, want_tokens, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(extra["pooled_output"], want_pooled, atol=1e-5, rtol=1e-5)

    check(nodes["text-guided"], 0, *ref["P_obj"])
    check(nodes["text-guided"], 1, *ref["P_obj"])
    for n in (nodes["object-removal"], only):
        check(n, 0, *ref["P_ctxt"])
        check(n, 1, *ref["P_obj"])
    mix = [0.3 * a + 0.7 * b for a, b in zip(ref["P_shape"], ref["P_ctxt"])]
    check(nodes["shape-guided"], 0, *mix)
    check(nodes["shape-guided"], 1, *mix)
    assert not torch.allclose(ref["P_ctxt"][0], ref["P_obj"][0])       # the tasks really differ


def test_task_vectors_alone_need_a_clip(comfy, run_prompt, graph, task_files):
    n = graph.node("ConsistentInpaintPowerPaintTaskPrompt", task_embeddings=task_files["vectors"],
                   task="text-guided", fitting_degree=1.0)
    graph.node("CITestCapture", value=n.out(0))
    with pytest.raises(comfy.PromptError, match="Connect the SD1.5 CLIP"):
        run_prompt(graph)


def test_powerpaint_branch_reads_its_task_prompt_per_cfg_row(comfy, run_prompt, graph, unet_ckpt, branch_files,
                                                           task_files, spy):
    b = _base(graph, unet_ckpt)
    runs = {}
    for task in ("object-removal", "text-guided"):
        t = graph.node("ConsistentInpaintPowerPaintTaskPrompt", task_embeddings=task_files["full"], task=task,
                       fitting_degree=1.0)
        a = _apply(graph, b, b["ck"].out(0), POWERPAINT, task=t)
        m = graph.node("CITestBranchSpy", model=a.out(0))
        _sample(graph, m.out(0), a.out(1), a.out(2), a.out(3))
        runs[task] = t
    spy.clear()
    r = run_prompt(graph)
    removal = {c: r.output(runs["object-removal"].id, c)[0][0] for c in (0, 1)}
    calls = [e for e in spy if e["rows"] == 2]
    single = [e for e in spy if e["rows"] == 1]
    assert len(calls) == 2 and len(single) == 2 and len(spy) == 4      # 2 steps per graph
    for e in calls:
        # P_ctxt on the positive row and P_obj on the negative one, wherever ComfyUI put them in the batch
        assert sorted(e["chunks"]) == [0, 1]
        for i, c in enumerate(e["chunks"]):
            torch.testing.assert_close(e["ctx"][i:i + 1], removal[c].to(e["ctx"].dtype))
    # text-guided: both rows read P_obj, so one branch row serves the positive and the negative row
    for e in single:
        torch.testing.assert_close(e["ctx"], r.output(runs["text-guided"].id, 0)[0][0])


# -- LoRA, ControlNet, low VRAM --------------------------------------------------------------------------------
def test_lora_reaches_the_blocks_the_branch_patches_in_either_order(comfy, run_prompt, graph, unet_ckpt,
                                                                    branch_files, lora_file):
    b = _base(graph, unet_ckpt)
    model = b["ck"].out(0)

    def lora(m):
        return graph.node("LoraLoaderModelOnly", model=m, lora_name=lora_file, strength_model=1.0).out(0)

    a1 = _apply(graph, b, lora(model), BRUSHNET)
    lora_then_branch = _sample(graph, a1.out(0), a1.out(1), a1.out(2), a1.out(3))
    a2 = _apply(graph, b, model, BRUSHNET)
    branch_then_lora = _sample(graph, lora(a2.out(0)), a2.out(1), a2.out(2), a2.out(3))
    branch_only = _sample(graph, a2.out(0), a2.out(1), a2.out(2), a2.out(3))
    a0 = _apply(graph, b, lora(model), BRUSHNET, scale=0.0)
    lora_branch_off = _sample(graph, a0.out(0), a0.out(1), a0.out(2), a0.out(3))
    lora_only = _sample(graph, lora(model), b["pos"].out(0), b["neg"].out(0), a0.out(3))
    r = run_prompt(graph)
    assert torch.equal(_samples(r, lora_then_branch), _samples(r, branch_then_lora))
    # the LoRA only touches layers inside the object-patched output blocks, and it still changes the result
    assert not torch.allclose(_samples(r, lora_then_branch), _samples(r, branch_only))
    assert torch.equal(_samples(r, lora_branch_off), _samples(r, lora_only))


def test_controlnet_and_branch_both_act(comfy, run_prompt, graph, unet_ckpt, branch_files, controlnet_file,
                                       counter):
    b = _base(graph, unet_ckpt)
    cn = graph.node("ControlNetLoader", control_net_name=controlnet_file)
    hint = graph.node("CITestNoiseImage", width=64, height=64, batch_size=1, seed=9)

    def control(pos, neg):
        c = graph.node("ControlNetApplyAdvanced", positive=pos, negative=neg, control_net=cn.out(0),
                       image=hint.out(0), strength=1.0, start_percent=0.0, end_percent=1.0)
        return c.out(0), c.out(1)

    a = _apply(graph, b, b["ck"].out(0), PAINTERNET)
    counted = graph.node("CITestBranchCounter", model=a.out(0))
    both = _sample(graph, counted.out(0), *control(a.out(1), a.out(2)), a.out(3))
    branch_only = _sample(graph, a.out(0), a.out(1), a.out(2), a.out(3))
    off = _apply(graph, b, b["ck"].out(0), PAINTERNET, scale=0.0)
    cn_branch_off = _sample(graph, off.out(0), *control(off.out(1), off.out(2)), off.out(3))
    cn_only = _sample(graph, b["ck"].out(0), *control(b["pos"].out(0), b["neg"].out(0)), off.out(3))
    counter.clear()
    r = run_prompt(graph)
    assert not torch.allclose(_samples(r, both), _samples(r, branch_only))      # the ControlNet acts
    assert torch.equal(_samples(r, cn_branch_off), _samples(r, cn_only))
    assert not torch.allclose(_samples(r, both), _samples(r, cn_only))          # and so does the branch
    steps = {s for *_, s, _ in counter if s is not None}
    for kind in ("input_block_patch", "output_block_patch", "adder", "attn2_output_patch"):
        assert set(_changed(counter, kind)) == steps, kind


@pytest.fixture
def low_vram(comfy, monkeypatch):
    """ComfyUI's partial loading as with --lowvram on a small GPU: every model is loaded with a 1 MiB
    budget, so its layers cast their weights (and LoRA patches) per call. On the CPU ComfyUI never chooses
    this by itself; the test forces the budget where LoadedModel asks for it."""
    mm = comfy.model_management
    original = mm.LoadedModel.model_load

    def model_load(self, lowvram_model_memory=0, force_patch_weights=False):
        return original(self, lowvram_model_memory=1024 * 1024, force_patch_weights=force_patch_weights)

    comfy.unload_all()
    monkeypatch.setattr(mm.LoadedModel, "model_load", model_load)
    yield
    monkeypatch.undo()
    comfy.unload_all()


def _lowvram_graph(g, ckpt, lora_file):
    b = _base(g, ckpt)
    m = g.node("LoraLoaderModelOnly", model=b["ck"].out(0), lora_name=lora_file, strength_model=1.0)
    a = _apply(g, b, m.out(0), PAINTERNET)
    s = g.node("CITestBranchSpy", model=a.out(0))
    return _sample(g, s.out(0), a.out(1), a.out(2), a.out(3))


def test_low_vram_loading_gives_the_same_result(comfy, run_prompt, unet_ckpt, branch_files, lora_file, spy, request):
    comfy.unload_all()
    g = comfy.graph()
    s = _lowvram_graph(g, unet_ckpt, lora_file)
    spy.clear()
    full = _samples(run_prompt(g), s)
    assert spy and not any(e["branch_lowvram"] or e["unet_lowvram"] for e in spy)
    request.getfixturevalue("low_vram")
    g = comfy.graph()
    s = _lowvram_graph(g, unet_ckpt, lora_file)
    spy.clear()
    low = _samples(run_prompt(g), s)
    assert spy and all(e["branch_lowvram"] and e["unet_lowvram"] for e in spy)
    torch.testing.assert_close(low, full, atol=1e-4, rtol=1e-4)


# -- ComfyUI running the CFG rows in separate model calls ---------------------------------------------------
@pytest.fixture(scope="module")
def calls(model_node):
    """CITestCallLog: logs cond_or_uncond of every model call (a model-function wrapper)."""
    log = []

    def patch(m):
        def wrap(apply, args):
            log.append(list(args["cond_or_uncond"]))
            return apply(args["input"], args["timestep"], **args["c"])
        m.set_model_unet_function_wrapper(wrap)
        return m

    model_node("CITestCallLog", patch)
    return log


@pytest.mark.parametrize("branch,task", [(BRUSHNET, None), (POWERPAINT, "text-guided")])
def test_rows_run_in_separate_calls_share_one_branch_pass_per_step(comfy, run_prompt, unet_ckpt, branch_files,
                                                                   task_files, spy, calls, monkeypatch, branch, task):
    def build():
        g = comfy.graph()
        b = _base(g, unet_ckpt)
        t = None if task is None else g.node("ConsistentInpaintPowerPaintTaskPrompt",
                                             task_embeddings=task_files["full"], task=task, fitting_degree=1.0)
        a = _apply(g, b, b["ck"].out(0), branch, task=t)
        m = g.node("CITestCallLog", model=g.node("CITestBranchSpy", model=a.out(0)).out(0))
        return g, _sample(g, m.out(0), a.out(1), a.out(2), a.out(3), steps=3)

    g, s = build()
    spy.clear(), calls.clear()
    batched = _samples(run_prompt(g), s)
    assert calls == [[1, 0]] * 3 and [e["rows"] for e in spy] == [1] * 3
    # too little free memory to batch: ComfyUI calls the model once per row; the branch still runs once a step
    real = comfy.model_management.get_free_memory

    def tight(dev=None, torch_free_too=False):       # the sampler's batching question only; attention keeps its
        return real(dev, torch_free_too) if torch_free_too else 1     # own (tuple) query
    monkeypatch.setattr(comfy.model_management, "get_free_memory", tight)
    g, s = build()
    spy.clear(), calls.clear()
    separate = _samples(run_prompt(g), s)
    assert len(calls) == 6 and all(len(c) == 1 for c in calls)
    assert [e["rows"] for e in spy] == [1] * 3
    # the same separate calls with the sharing switched off (the branch recomputed in every call): identical
    import sys
    pack_branch = sys.modules[comfy.nodes.NODE_CLASS_MAPPINGS["ConsistentInpaintApplyBranch"].__module__]
    monkeypatch.setattr(pack_branch._RunState, "lookup", lambda self, *a: None)
    g, s = build()
    spy.clear(), calls.clear()
    recomputed = _samples(run_prompt(g), s)
    assert [e["rows"] for e in spy] == [1] * 6
    assert torch.equal(separate, recomputed)
    # and batched vs separate calls differ only by the UNet's batch-size rounding, amplified by CFG
    torch.testing.assert_close(separate, batched, atol=2e-3, rtol=1e-2)


def test_two_branches_on_one_model_both_run_every_step(comfy, run_prompt, graph, unet_ckpt, branch_files, spy):
    b = _base(graph, unet_ckpt)
    first = _apply(graph, b, b["ck"].out(0), BRUSHNET)
    second = _apply(graph, b, first.out(0), PAINTERNET)
    m = graph.node("CITestBranchSpy", model=second.out(0))
    _sample(graph, m.out(0), second.out(1), second.out(2), second.out(3), steps=3)
    spy.clear()
    run_prompt(graph)
    # BrushNet SD1.5: one row for both CFG rows; PainterNet: both rows; each once per step
    assert sorted(e["rows"] for e in spy) == [1, 1, 1, 2, 2, 2]
