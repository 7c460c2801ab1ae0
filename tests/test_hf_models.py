"""Hugging Face transformers with attn_implementation="aule": same logits and greedy tokens as "sdpa".

Tiny models built from configs with seeded random weights; nothing is downloaded.
"""
import logging

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import aule  # noqa: E402
from aule import sdpa_core  # noqa: E402
from aule.integrations import huggingface  # noqa: E402
from attn_util import count_calls  # noqa: E402


@pytest.fixture(autouse=True)
def _registered():
    huggingface.register()
    yield
    aule.uninstall()


@pytest.fixture
def served(monkeypatch):
    calls = []
    real = sdpa_core.host_attention

    def spy(q, k, v, scale, left, right, backend, **kw):
        m = kw.get("attn_mask")
        calls.append((tuple(q.shape), tuple(k.shape), left, right, m is not None,
                      None if m is None else tuple(m.shape)))
        return real(q, k, v, scale, left, right, backend, **kw)

    monkeypatch.setattr(sdpa_core, "host_attention", spy)
    return calls


def _llama(**over):
    cfg = dict(vocab_size=96, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
               num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512)
    cfg.update(over)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()


def _mistral(window=16):
    cfg = transformers.MistralConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512,
                                     sliding_window=window)
    torch.manual_seed(1)
    return transformers.MistralForCausalLM(cfg).eval()


def _ids(batch, seq, vocab=96, seed=2):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model, impl, *args, **kw):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(*args, **kw).logits


def _generate(model, impl, ids, n, **kw):
    model.set_attn_implementation(impl)
    return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)


def test_registered_names():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert AttentionInterface._global_mapping["aule"] is huggingface.aule_attention_forward
    assert AttentionMaskInterface._global_mapping["aule"] is huggingface.aule_mask


def test_install_registers_when_transformers_is_loaded():
    from transformers import AttentionInterface

    AttentionInterface._global_mapping.pop("aule", None)
    aule.install()
    assert "aule" in AttentionInterface._global_mapping


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_llama_gqa_logits_match_sdpa(dtype, atol, served):
    model = _llama().to(dtype)
    ids = _ids(2, 37)
    want = _logits(model, "sdpa", ids)
    got = _logits(model, "aule", ids)
    assert model.config._attn_implementation == "aule"
    assert len(served) == 2, "each layer's attention goes through aule"
    assert served[0][0] == (2, 8, 37, 32) and served[0][1] == (2, 2, 37, 32), "K/V are not expanded"
    assert (got.float() - want.float()).abs().max() <= atol


def test_each_layer_call_is_validated_and_routed_once(monkeypatch, served):
    canonicalized = count_calls(monkeypatch, "aule.call", "canonicalize")
    routed = count_calls(monkeypatch, "aule.api", "route")
    model = _llama()
    want = _logits(model, "sdpa", _ids(1, 9))
    got = _logits(model, "aule", _ids(1, 9))
    assert len(served) == 2 and len(canonicalized) == 2 and len(routed) == 2
    assert (got - want).abs().max() <= 1e-4


def test_llama_generate_with_kv_cache_matches_sdpa(served):
    model = _llama()
    ids = _ids(2, 11)
    want = _generate(model, "sdpa", ids, 10)
    got = _generate(model, "aule", ids, 10)
    assert torch.equal(got, want)
    decode = [c for c in served if c[0][2] == 1]
    assert len(decode) >= 2 * 9 and decode[-1][1][2] == 20, "decode steps over the cache go through aule"


def test_llama_left_padded_batch_matches_sdpa(served, caplog):
    model = _llama()
    ids = _ids(2, 13)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    with caplog.at_level(logging.INFO, logger="aule"):
        want = _logits(model, "sdpa", ids, attention_mask=mask)
        got = _logits(model, "aule", ids, attention_mask=mask)
        assert torch.equal(_generate(model, "aule", ids, 6, attention_mask=mask),
                           _generate(model, "sdpa", ids, 6, attention_mask=mask))
    real = mask.bool()[:, :, None].expand_as(got)
    assert (got - want)[real].abs().max() <= 1e-4
    masked = [c for c in served if c[4]]
    assert masked and all(c[0][0] == 2 for c in masked), "the padded batch reaches aule with its mask"
    # Causal plus padding reaches aule as causal and a [B, 1, 1, kv] padding mask (key spans), not
    # as the materialised [B, 1, q, kv] mask.
    assert all(c[5] == (2, 1, 1, c[1][2]) and c[3] == 0 for c in masked)
    assert not any("transformers attention uses sdpa" in r.getMessage() for r in caplog.records)


def test_a_mask_that_is_not_window_and_padding_is_not_described_as_one():
    """The padded tag is set only where the materialised mask equals the window over the kept keys:
    an extra mask function (here hiding key 2 from every query) keeps the whole mask."""
    from transformers import masking_utils as mu

    pad = torch.ones(2, 9, dtype=torch.bool)
    pad[0, :3] = False
    plain = huggingface.aule_mask(2, 9, 9, attention_mask=pad, mask_function=mu.causal_mask_function)
    assert getattr(plain, huggingface._PADDED_TAG)[:2] == (-1, 0)
    assert torch.equal(getattr(plain, huggingface._PADDED_TAG)[2][:, 0, 0], pad)

    def hide_two(batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx != 2

    other = huggingface.aule_mask(2, 9, 9, attention_mask=pad,
                                  mask_function=mu.and_masks(mu.causal_mask_function, hide_two))
    assert other is not None and not hasattr(other, huggingface._PADDED_TAG)


def test_mistral_sliding_window_matches_sdpa(served):
    model = _mistral(window=16)
    ids = _ids(2, 45)
    want = _logits(model, "sdpa", ids)
    got = _logits(model, "aule", ids)
    assert (got - want).abs().max() <= 1e-4
    assert served and all(c[2:4] == (15, 0) for c in served), "aule ran the window itself, W=16 -> (15, 0)"


def test_mistral_sliding_window_is_real():
    """The window changes the answer here, so matching sdpa above means it was applied."""
    model = _mistral(window=16)
    ids = _ids(1, 45)
    windowed = _logits(model, "aule", ids)
    model.config.sliding_window = None
    full = _logits(model, "aule", ids)
    assert (windowed[:, 20:] - full[:, 20:]).abs().max() > 1e-3


def test_mistral_generate_across_the_window_matches_sdpa(served):
    model = _mistral(window=8)
    ids = _ids(2, 6)
    want = _generate(model, "sdpa", ids, 12)
    got = _generate(model, "aule", ids, 12)
    assert torch.equal(got, want)
    assert any(c[0][2] == 1 and c[2:4] == (7, 0) for c in served), "windowed decode went through aule"


def test_from_pretrained_with_aule(tmp_path, served):
    model = _llama()
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="aule").eval()
    assert loaded.config._attn_implementation == "aule"
    ids = _ids(1, 19)
    with torch.no_grad():
        got = loaded(ids).logits
    assert served
    assert (got - _logits(model, "sdpa", ids)).abs().max() <= 1e-4


def _bert():
    cfg = transformers.BertConfig(vocab_size=96, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=256, max_position_embeddings=128)
    torch.manual_seed(3)
    return transformers.BertModel(cfg).eval()


def test_bert_bidirectional_matches_sdpa(served):
    model = _bert()  # head_dim 64, non-causal
    ids = _ids(3, 29)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        want = model(ids).last_hidden_state
    model.set_attn_implementation("aule")
    with torch.no_grad():
        got = model(ids).last_hidden_state
    assert len(served) == 2 and all(c[2:4] == (-1, -1) for c in served)
    assert (got - want).abs().max() <= 1e-4


def test_bert_padding_matches_sdpa(served):
    model = _bert()
    ids = _ids(2, 21)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        want = model(ids, attention_mask=mask).last_hidden_state
    model.set_attn_implementation("aule")
    with torch.no_grad():
        got = model(ids, attention_mask=mask).last_hidden_state
    # Padded key positions are hidden from every query, so each row sees keys and matches SDPA.
    assert (got - want).abs().max() <= 1e-5
    assert served and all(c[4] for c in served), "the padded batch reaches aule with its mask"


def test_training_on_cpu_uses_sdpa_with_correct_gradients(served):
    model = _llama()
    model.train()
    ids = _ids(1, 17)
    grads = {}
    for impl in ("sdpa", "aule"):
        model.zero_grad()
        model.set_attn_implementation(impl)
        model(ids, labels=ids).loss.backward()
        grads[impl] = [p.grad.clone() for p in model.parameters()]
    assert not served
    for a, b in zip(grads["sdpa"], grads["aule"]):
        assert torch.allclose(a, b, atol=1e-6)


def test_sdpa_layers_under_install_keep_their_meaning(served):
    """Plain "sdpa" models route through the installed drop-in: decode uses is_causal=False."""
    model = _llama()
    ids = _ids(1, 9)
    want = _generate(model, "sdpa", ids, 5)
    with aule.installed():
        got = _generate(model, "sdpa", ids, 5)
    assert torch.equal(got, want) and served


def test_llama_on_vulkan_matches_sdpa(served):
    from aule import backends

    b = backends.get("vulkan")
    if not b.available:
        pytest.skip(f"Vulkan backend unavailable: {b.unavailable_reason}")
    model = _llama(num_hidden_layers=1)
    ids = _ids(1, 23)
    want = _logits(model, "sdpa", ids)
    with aule.installed(backend="vulkan"):
        got = _logits(model, "aule", ids)
    assert [c[2:5] for c in served] == [(-1, 0, False)]
    assert (got - want).abs().max() <= 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_llama_training_on_gpu_goes_through_triton():
    model = _llama().to("cuda", torch.bfloat16)
    model.train()
    ids = _ids(2, 300).cuda()
    grads, losses = {}, {}
    for impl in ("sdpa", "aule"):
        model.zero_grad()
        model.set_attn_implementation(impl)
        loss = model(ids, labels=ids).loss
        loss.backward()
        losses[impl] = loss.item()
        grads[impl] = torch.cat([p.grad.float().flatten() for p in model.parameters()])
    assert abs(losses["aule"] - losses["sdpa"]) <= 1e-2 * abs(losses["sdpa"])
    rel = (grads["aule"] - grads["sdpa"]).norm() / grads["sdpa"].norm()
    assert rel <= 5e-2, rel


@pytest.mark.parametrize("first", ["aule", "transformers"])
def test_attn_implementation_aule_works_in_either_import_order_without_install(first):
    """A fresh interpreter: no aule.install(), aule imported before or after transformers."""
    import subprocess
    import sys
    from pathlib import Path

    second = "transformers" if first == "aule" else "aule"
    code = f"""
import {first}, {second}
from transformers import LlamaConfig, LlamaForCausalLM
import torch
cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=100)
torch.manual_seed(0)
m = LlamaForCausalLM._from_config(cfg, attn_implementation="aule").eval()
ids = torch.randint(0, 100, (1, 12))
with torch.no_grad():
    a = m(ids).logits
    m.set_attn_implementation("sdpa")
    b = m(ids).logits
assert (a - b).abs().max() < 1e-4, (a - b).abs().max()
print("ok")
"""
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def _gemma2():
    cfg = transformers.Gemma2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    attn_logit_softcapping=2.0, final_logit_softcapping=None, sliding_window=8,
                                    max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:   # scores of several units, so the cap at 2 matters
            layer.self_attn.q_proj.weight.mul_(30)
            layer.self_attn.k_proj.weight.mul_(30)
    return model


def _gpt_oss():
    cfg = transformers.GptOssConfig(vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                    num_experts_per_tok=2, sliding_window=8, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.uniform_(-1.0, 3.0)   # learned logits that take a real share
    return model


@pytest.mark.parametrize("family", ["gemma2-softcap", "gpt-oss-sinks"])
def test_softcap_and_sinks_models_reach_aule_and_match_eager(family, served):
    model = _gemma2() if family == "gemma2-softcap" else _gpt_oss()
    ids = _ids(2, 13)
    want = _logits(model, "eager", ids)
    got = _logits(model, "aule", ids)
    assert served, "the attention went through aule"
    assert (got - want).abs().max() <= 1e-4
    assert torch.equal(_generate(model, "aule", ids, 6), _generate(model, "eager", ids, 6))
    # The feature matters on these inputs: without it eager gives other logits.
    for layer in model.model.layers:
        if family == "gemma2-softcap":
            layer.self_attn.attn_logit_softcapping = None
        else:
            layer.self_attn.sinks.data.fill_(-1e4)
    assert (_logits(model, "eager", ids) - want).abs().max() > 1e-3
