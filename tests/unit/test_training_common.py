"""What every trainer shares (training/common.py), in plain torch: configuration and its help, prompt cache, gradient
checkpointing of blocks, eval mode for samples. The engine and the data streams: tests/unit/test_training_engine.py."""
import csv
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from training import common


@dataclasses.dataclass
class Cfg:
    """A config."""
    data: str
    steps: int = 10
    lr: float = 1e-4
    flag: bool = False
    name: str = "x"


def test_parse_config_file_then_flags(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('data = "/d"\nsteps = 5\nflag = true\n')
    cfg = common.parse_config(Cfg, ["--config", str(f), "--steps", "7", "--lr", "0.5"])
    assert cfg == Cfg(data="/d", steps=7, lr=0.5, flag=True, name="x")
    assert common.parse_config(Cfg, ["--data", "/e", "--flag", "no"]) == Cfg(data="/e", flag=False)


def test_parse_config_refuses_unknown_and_missing_options(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('data = "/d"\nstepz = 5\n')
    with pytest.raises(SystemExit, match="unknown option.*stepz"):
        common.parse_config(Cfg, ["--config", str(f)])
    with pytest.raises(SystemExit, match="missing required option.*data"):
        common.parse_config(Cfg, ["--steps", "3"])


@dataclasses.dataclass
class Method(common.TrainOptions):
    """A method's config: its own required option first, the shared ones keyword-only."""
    data: str


def test_shared_options_are_checked_when_the_config_is_made():
    assert Method("/d").save_every == 500 and Method("/d", seed=3).seed == 3
    assert [f.name for f in dataclasses.fields(Method)][-1] == "data"
    with pytest.raises(ValueError, match="log_every and save_every must be >= 1"):
        Method("/d", save_every=0)
    with pytest.raises(ValueError, match="sample_every >= 0"):
        Method("/d", sample_every=-1)
    with pytest.raises(ValueError, match="mixed_precision must be no, fp16 or bf16; got 'fp8'"):
        Method("/d", mixed_precision="fp8")


class FakeClip:
    """Two tokenizers' worth of 77-token chunks (token, weight); encodes to the token ids themselves."""

    def __init__(self):
        self.encoded = []

    def tokenize(self, prompt):
        ids = [49406] + [1000 + len(w) for w in prompt.split()] + [49407]
        chunks = [ids[i:i + 77] for i in range(0, max(len(ids), 1), 77)]
        chunks = [c + [49407] * (77 - len(c)) for c in chunks]
        tok = [[(t, 1.0) for t in c] for c in chunks]
        return {"l": tok, "g": tok}

    def encode_from_tokens(self, tokens, return_pooled=False):
        self.encoded.append(tokens)
        ids = torch.tensor([[t for t, _ in c] for c in tokens["l"]], dtype=torch.float64)
        return ids[..., None].expand(-1, -1, 3).reshape(1, -1, 3), ids[:, :2].reshape(1, -1)


def test_prompt_encoder_keeps_the_first_chunk_and_caches_the_latest():
    clip = FakeClip()
    enc = common.PromptEncoder(clip, limit=2)
    long = " ".join(["word"] * 100)                          # two chunks
    p = enc(long)
    assert p.context.shape == (1, 77, 3) and p.context.dtype == torch.float32
    assert p.ids.shape == (1, 77) and int(p.ids[0, 0]) == 49406
    assert len(clip.encoded[0]["l"]) == 1 and len(clip.encoded[0]["g"]) == 1      # one chunk went in
    assert enc(long) is p and len(clip.encoded) == 1          # cached
    enc("a"), enc("bb")                                       # the limit pushes the oldest out
    enc(long)
    assert len(clip.encoded) == 4
    context, pooled = enc.batch(["a", "bb", "a"])
    assert context.shape == (3, 77, 3) and pooled.shape == (3, 2)
    assert torch.equal(context[0], context[2]) and not torch.equal(context[0], context[1])


class Block(nn.Module):
    """A block reading a dict its caller moves on between blocks, as ComfyUI's UNet does with the transformer
    options ("block", "transformer_index"); what it writes there itself is its own (as "block_index")."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, options):
        options["own"] = options["scale"] * 2
        return torch.tanh(self.lin(x) * options["own"])        # tanh saves its output: recomputed in backward


def _run(blocks, x):
    options = {"scale": 1.0}
    for b in blocks:
        x = b(x, options)
        options["scale"] += 1.0
    return x.square().sum()


def test_checkpointed_blocks_recompute_with_the_same_result_and_leave_the_blocks_as_they_were(checkpoint_calls):
    torch.manual_seed(0)
    blocks = [Block() for _ in range(3)]
    x = torch.randn(2, 4)
    loss = _run(blocks, x)
    loss.backward()
    plain = [b.lin.weight.grad.clone() for b in blocks]
    for b in blocks:
        b.lin.weight.grad = None
    calls = checkpoint_calls
    with common.checkpointed_blocks(blocks):
        again = _run(blocks, x)
        with pytest.raises(RuntimeError, match="would stack"):
            with common.checkpointed_blocks(blocks[:1]):
                pass
    again.backward()                 # the recomputation sees the options as the first pass did
    assert len(calls) == 3
    torch.testing.assert_close(again, loss)
    for g, b in zip(plain, blocks):
        torch.testing.assert_close(b.lin.weight.grad, g)
    assert all("forward" not in b.__dict__ for b in blocks)
    with torch.no_grad(), common.checkpointed_blocks(blocks):
        _run(blocks, x)
    assert len(calls) == 3           # nothing to recompute without gradients


def test_evaluating():
    net = nn.Sequential(nn.Linear(3, 1), nn.Dropout(0.5))
    net.train()
    with common.evaluating(net):
        assert not net.training
    assert net.training
    net.eval()
    with pytest.raises(KeyError):
        with common.evaluating(net):
            raise KeyError
    assert not net.training


def test_image_folder_pairs_masks_and_prompts(tmp_path):
    Image.fromarray(np.full((20, 40, 3), 200, np.uint8)).save(tmp_path / "a.png")
    m = np.zeros((20, 40), np.uint8)
    m[:, 20:] = 255
    Image.fromarray(m).save(tmp_path / "a.mask.png")
    (tmp_path / "a.txt").write_text(" a cat \n")
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(tmp_path / "b.jpg")
    data = common.ImageFolder(str(tmp_path), 16)
    assert [p.name for p in data.items] == ["a.png", "b.jpg"]
    pixels, mask, prompt = data[0]
    assert pixels.shape == (3, 16, 16) and prompt == "a cat"
    assert mask.shape == (16, 16) and mask[:, :7].max() == 0 and mask[:, 9:].min() == 1   # centre crop of the halves
    assert data[1][1] is None and data[1][2] == ""
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        common.ImageFolder(str(tmp_path / "empty"), 16)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        common.ImageFolder(str(tmp_path / "missing"), 16)


def test_cosine_lr():
    assert common.cosine_lr(1.0, 0, 100) == 1.0
    assert common.cosine_lr(1.0, 50, 100) == pytest.approx(0.5)
    assert common.cosine_lr(1.0, 100, 100) == pytest.approx(0.0) == common.cosine_lr(1.0, 300, 100)
