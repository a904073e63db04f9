"""The model contract, for every registered architecture, and what each architecture promises."""

import math

import pytest
import torch

from charloom.config import ConfigError, ModelConfig, TrainConfig, from_dict
from charloom.models import MODELS, build_model, model_class
from charloom.models.base import Dropout, tree_map

ARCHS = sorted(MODELS)


def build(arch, vocab=11, **kw):
    """A small model; context 8 so a 30-token input makes the transformer slide (others ignore it)."""
    settings = dict(model=arch, layers=2, hidden=24, embedding_dim=8, dropout=0.0, heads=2, context=8)
    settings.update(kw)
    cfg = ModelConfig(**settings)
    try:
        model_class(arch).check_config(cfg)
    except ConfigError as exc:
        pytest.skip(f"{arch} does not take these settings: {exc}")
    torch.manual_seed(0)
    return build_model(cfg, vocab).eval()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", [dict(), dict(input="onehot"), dict(tie_weights=True), dict(positions="rotary")])
def test_step_by_step_equals_full_forward(arch, variant):
    model = build(arch, **variant)
    idx = torch.randint(0, 11, (3, 30))
    with torch.no_grad():
        full, _ = model(idx)
        assert full.shape == (3, 30, 11)
        state, steps = None, []
        for t in range(idx.shape[1]):
            logits, state = model(idx[:, t:t + 1], state)
            steps.append(logits)
        state, chunks = None, []
        for t in range(0, 30, 7):  # uneven pieces, as evaluation and prefill cut them
            logits, state = model(idx[:, t:t + 7], state)
            chunks.append(logits)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    assert torch.allclose(torch.cat(chunks, 1), full, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_select_state_reorders_rows(arch):
    model = build(arch, vocab=7, layers=1, hidden=16)
    idx = torch.randint(0, 7, (3, 5))
    with torch.no_grad():
        _, state = model(idx)
        order = torch.tensor([2, 0, 0])
        picked = model.select_state(state, order)
        nxt = torch.randint(0, 7, (3, 1))
        a, _ = model(nxt, picked)
        b, _ = model(nxt, model(idx[order])[1])
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_detach_state_cuts_the_graph(arch):
    model = build(arch).train()
    _, state = model(torch.randint(0, 11, (2, 6)))
    before, after = [], []
    tree_map(lambda t: before.append(t) or t, state)
    tree_map(lambda t: after.append(t) or t, model.detach_state(state))
    assert any(t.requires_grad for t in before) and after and not any(t.requires_grad for t in after)


@pytest.mark.parametrize("arch", ARCHS)
def test_tied_weights_share_one_matrix(arch):
    untied, tied = build(arch, embedding_dim=24), build(arch, embedding_dim=24, tie_weights=True)
    embedding = next(m for m in tied.modules() if isinstance(m, torch.nn.Embedding) and m.num_embeddings == 11)
    assert tied.head.weight is embedding.weight
    assert untied.num_parameters() - tied.num_parameters() == 11 * 24  # the V x E matrix, counted once


def test_keras_init_sets_forget_bias():
    model = build_model(ModelConfig(model="lstm", layers=1, hidden=8, input="onehot", init="keras", dropout=0.0), 5)
    bias = model.rnn.bias_ih_l0.detach()
    assert torch.equal(bias[8:16], torch.ones(8)) and bias[:8].abs().sum() == 0


def test_default_lstm_is_unchanged():
    """The default recipe's network: the parameter names and count of the core LSTM (no tying, no projection)."""
    model = build_model(ModelConfig(), 60)
    h, e, v = 512, 64, 60
    lstm = 4 * h * (e + h) + 8 * h + 4 * h * (h + h) + 8 * h
    assert model.num_parameters() == v * e + lstm + h * v + v
    assert sorted(model.state_dict()) == sorted(
        ["embed.weight", "head.weight", "head.bias"] + [f"rnn.{w}_l{i}" for i in (0, 1) for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")])


def test_old_checkpoint_config_with_arch_still_loads():
    assert from_dict(ModelConfig, {"arch": "gru", "hidden": 8}).model == "gru"


def test_conv_receptive_field_is_exact():
    """Output t depends on input t - RF + 1 and not on input t - RF (independent of the step test)."""
    model = build("conv", layers=4, kernel_size=2)  # dilations 1, 2, 4, 8 -> RF = 16
    assert model.receptive_field == 16
    idx = torch.randint(0, 11, (1, 40))
    t = 35
    with torch.no_grad():
        base = model(idx)[0][0, t]
        far, near = idx.clone(), idx.clone()
        far[0, t - 16] = (far[0, t - 16] + 1) % 11
        near[0, t - 15] = (near[0, t - 15] + 1) % 11
        assert torch.equal(model(far)[0][0, t], base)
        assert not torch.allclose(model(near)[0][0, t], base)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_transformer_slides_by_rebuilding_the_newest_half(positions):
    """After the cache fills (context 8), token 8 sees tokens 4..7 re-read from scratch: check against a fresh pass."""
    model = build("transformer", positions=positions)
    idx = torch.randint(0, 11, (2, 9))
    with torch.no_grad():
        full, state = model(idx)
        fresh, _ = model(idx[:, 4:9])  # a new model call that only ever saw tokens 4..8
    assert torch.allclose(full[:, :8], model(idx[:, :8])[0], atol=1e-6)
    assert torch.allclose(full[:, 8], fresh[:, -1], atol=1e-5)
    assert state["ids"].shape[1] == 5 and state["k"][0].shape[2] == 5


def test_transformer_attention_matches_a_written_out_head():
    """One block, one head, no cache: the logits equal attention computed by hand with softmax."""
    model = build("transformer", layers=1, heads=1, hidden=8, context=16)
    idx = torch.randint(0, 11, (1, 6))
    blk = model.blocks[0]
    with torch.no_grad():
        x = model.wte(idx) + model.wpe(torch.arange(6))
        q, k, v = blk.qkv(blk.ln1(x)).split(8, dim=-1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(8)
        scores = scores.masked_fill(torch.triu(torch.ones(6, 6, dtype=torch.bool), 1), float("-inf"))
        x = x + blk.out(scores.softmax(-1) @ v)
        x = x + blk.mlp(blk.ln2(x))
        expected = model.head(model.ln_f(x))
        got, _ = model(idx)
    assert torch.allclose(got, expected, atol=1e-5)


def test_architectures_declare_their_needs():
    transformer = model_class("transformer")
    assert not transformer.carries_state and model_class("conv").carries_state and model_class("lstm").carries_state
    assert transformer.preset(500_000)["train"]["batching"] == "windows"
    with pytest.raises(ConfigError, match="--batching windows"):
        transformer.check_config(ModelConfig(model="transformer", hidden=32, context=128), TrainConfig(batching="stream"))
    with pytest.raises(ConfigError, match="longer than"):
        transformer.check_config(ModelConfig(model="transformer", hidden=32, context=64), TrainConfig(batching="windows", seq_len=128))
    with pytest.raises(ConfigError, match="multiple of"):
        transformer.check_config(ModelConfig(model="transformer", hidden=30, heads=4))
    with pytest.raises(ConfigError, match="embedding"):
        model_class("gru").check_config(ModelConfig(model="gru", input="onehot", tie_weights=True))


def test_dropout_keeps_the_share_and_the_expectation_and_passes_its_mask_back():
    torch.manual_seed(0)
    x = (torch.rand(64, 50, 40) + 0.5).requires_grad_()  # no zeros of its own
    drop = Dropout(0.3)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.005  # 128,000 draws
    scale = 32768 / (32768 - round(0.3 * 32768))
    torch.testing.assert_close(y[kept], x[kept] * scale)
    assert abs(y.mean().item() / x.mean().item() - 1) < 0.01
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() * scale)
    assert not torch.equal(drop(x), y)  # a fresh mask each call
    drop.eval()
    assert drop(x) is x
    assert Dropout(0.0).train()(x) is x


def test_adamw_is_fused_on_a_cpu_and_decays_only_matrices_outside_the_embedding():
    from charloom.training.trainer import make_optimizer

    net = build_model(ModelConfig(layers=1, hidden=16, embedding_dim=8), 11)
    opt = make_optimizer(net, TrainConfig(weight_decay=0.05))
    assert opt.defaults["fused"] is True  # torch's default on a CPU loops over the parameters (~10x slower)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.05 and opt.param_groups[1]["weight_decay"] == 0.0
    for name, p in net.named_parameters():
        assert (id(p) in decayed) == (p.dim() >= 2 and "embed" not in name), name
