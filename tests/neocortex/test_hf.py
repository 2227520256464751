"""The Hugging Face neocortex on tiny random-init models of five layouts, loaded through from_pretrained.

No hub access: each model is built from a config, saved to a temporary directory once per module and
loaded back through ``build_neocortex`` (the real ``from_pretrained`` path).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_hf_configs import tiny_configs
from torch import nn
from transformers import (
    AutoModelForCausalLM,
)

from biollm_cls.config.schema import ConfigError, ExpertsConfig, ModelConfig
from biollm_cls.hippocampus import Hippocampus
from biollm_cls.neocortex import build_neocortex, full_logits
from biollm_cls.neocortex import hf as hf_module
from biollm_cls.neocortex.hf import HFNeocortex, hf_split_layer_path, split_point

V, H, L = 128, 32, 4
CPU = torch.device("cpu")
CONFIGS = tiny_configs(V, H, L)
ARCHS = list(CONFIGS)
EXPECTED_PATH = {"gpt2": "transformer.h", "llama": "model.layers", "qwen2": "model.layers",
                 "gpt_neox": "gpt_neox.layers", "opt": "model.decoder.layers"}


class Zoo:
    """Saved tiny models plus a cache of adapters and reference models, built once per module."""

    def __init__(self, root: Path):
        self.dirs: dict[str, Path] = {}
        for name, make in CONFIGS.items():
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(make()).save_pretrained(root / name)
            self.dirs[name] = root / name
        self._cache: dict[tuple, nn.Module] = {}

    def cfg(self, arch: str, **overrides) -> ModelConfig:
        base = {"provider": "hf", "hf_model_name": str(self.dirs[arch]), "hf_local_files_only": True,
                "vocab_size": 0, "hf_injection_fraction": 0.5}
        return ModelConfig(**{**base, **overrides})

    def neo(self, arch: str, trains_base: bool = True, **overrides) -> HFNeocortex:
        key = (arch, trains_base, tuple(sorted(overrides.items())))
        if key not in self._cache:
            self._cache[key] = build_neocortex(self.cfg(arch, **overrides), device=CPU, trains_base=trains_base)
        return self._cache[key]

    def ref(self, arch: str) -> nn.Module:
        key = ("ref", arch)
        if key not in self._cache:
            self._cache[key] = AutoModelForCausalLM.from_pretrained(self.dirs[arch], dtype=torch.float32)
        return self._cache[key]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("hf_models"))


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [2, 8] and mask [2, 8] (row 1 has 3 pads)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (2, 8), generator=g)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    ids[1, 5:] = 0
    return ids, mask


def const_delta(source: torch.Tensor) -> Callable:
    return lambda h, m: source.to(h.dtype).expand_as(h)  # (B, T, H)


class CallCounter:
    """Forward hooks on every decoder layer (and a wrapped injection) counting calls."""

    def __init__(self, layers: nn.ModuleList):
        self.layers = [0] * len(layers)
        self.handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(layers)]
        self.injections = 0

    def _hook(self, i: int) -> Callable:
        def hook(module, args, output):
            self.layers[i] += 1
        return hook

    def wrap(self, inject: Callable) -> Callable:
        def counted(h, m):
            self.injections += 1
            return inject(h, m)
        return counted

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


# ---- split resolution --------------------------------------------------------------------------------
def test_split_point_rounds_and_clamps():
    assert split_point(24, 0.7) == 17  # Qwen2.5-0.5B: injection after layer 16 (the reference's example)
    assert split_point(4, 0.5) == 2
    assert split_point(4, 0.1) == 1  # clamped: at least one layer below
    assert split_point(4, 0.95) == 3  # clamped: at least one layer above
    assert split_point(2, 0.5) == 1


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_path_resolves(zoo, arch):
    neo = zoo.neo(arch)
    path, layers = hf_split_layer_path(neo.model)
    assert path == EXPECTED_PATH[arch] and len(layers) == L
    info = neo.runtime_info()
    assert info["hf_injection_mode"] == "decoder_split"
    assert info["hf_num_decoder_layers"] == L == neo.num_layers
    assert info["hf_injection_layer_idx"] == 1  # round(4 * 0.5) - 1
    assert neo.hidden_size == H and neo.vocab_size == V


@pytest.mark.parametrize(("fraction", "idx"), [(0.1, 0), (0.7, 2), (0.95, 2)])
def test_injection_layer_for_fraction(zoo, fraction, idx):
    neo = zoo.neo("llama", hf_injection_fraction=fraction)
    assert neo.runtime_info()["hf_injection_layer_idx"] == idx
    assert neo.runtime_info()["hf_injection_fraction"] == fraction


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_delta_is_added_to_the_split_layer_output(zoo, batch, arch):
    neo, (ids, mask) = zoo.neo(arch), batch
    _, layers = hf_split_layer_path(neo.model)
    outputs = {}
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o))
               for i, layer in enumerate(layers)]
    seen = {}
    with torch.no_grad():
        neo.hidden(ids, mask)  # base forward: records every layer's output
        neo.hidden(ids, mask, inject=lambda h, m: seen.setdefault("h", h).new_zeros(h.shape))
    for handle in handles:
        handle.remove()
    assert torch.equal(seen["h"], outputs[neo.injection_layer_idx])


# ---- system forward ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_zero_delta_equals_base_exactly(zoo, batch, arch):
    neo, (ids, mask) = zoo.neo(arch), batch
    with torch.no_grad():
        base = neo.hidden(ids, mask)  # (B, T, H)
        system = neo.hidden(ids, mask, inject=lambda h, m: torch.zeros_like(h))
    assert base.shape == (2, 8, H)
    assert torch.equal(system, base)


@pytest.mark.parametrize("arch", ARCHS)
def test_nonzero_delta_changes_output_and_gets_gradients(zoo, batch, arch):
    neo, (ids, mask) = zoo.neo(arch), batch
    source = nn.Parameter(0.5 * torch.randn(H, generator=torch.Generator().manual_seed(2)))
    logits = full_logits(neo, ids, mask, inject=const_delta(source))  # (B, T, V)
    with torch.no_grad():
        base_logits = full_logits(neo, ids, mask)
    assert not torch.allclose(logits, base_logits)
    logits.square().mean().backward(inputs=[source])
    assert source.grad is not None and torch.isfinite(source.grad).all() and source.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_base_forward_matches_automodel(zoo, batch, arch):
    neo, ref, (ids, mask) = zoo.neo(arch), zoo.ref(arch), batch
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        got = full_logits(neo, ids, mask)
    real = mask.bool()  # pure-causal attention (the default) leaves the real positions as they were
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_vocab_cap_slices_the_head(zoo, batch, arch):
    neo, ref, (ids, mask) = zoo.neo(arch, vocab_size=50), zoo.ref(arch), batch
    assert neo.vocab_size == 50 and neo.runtime_info()["hf_model_vocab_size"] == V
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).logits[..., :50]
        hidden = neo.hidden(ids, mask)  # (B, T, H)
        got = neo.logits(hidden)  # (B, T, 50)
        selected = neo.logits(hidden[mask.bool()])  # (n_real, 50): only what it is given
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=1e-5)
    assert selected.shape == (int(mask.sum()), 50)


def test_vocab_cap_larger_than_model_is_an_error(zoo):
    with pytest.raises(ConfigError, match="model.vocab_size"):
        build_neocortex(zoo.cfg("llama", vocab_size=V + 1), device=CPU)


@pytest.mark.parametrize("arch", ARCHS)
def test_mask_elision_keeps_real_positions(zoo, batch, arch):
    """pass_attention_mask=False (the default: pure-causal model, mask only to inject) changes no real position."""
    neo, (ids, mask) = zoo.neo(arch), batch
    assert neo.pass_attention_mask is False  # model.hf_pass_attention_mask's default
    seen = []
    source = torch.full((H,), 0.3)

    def inject(h, m):
        seen.append(m)
        return const_delta(source)(h, m)

    with torch.no_grad():
        elided = neo.hidden(ids, mask, inject)
        neo.pass_attention_mask = True
        try:
            masked = neo.hidden(ids, mask, inject)
        finally:
            neo.pass_attention_mask = False
    real = mask.bool()
    torch.testing.assert_close(elided[real], masked[real], atol=1e-5, rtol=1e-5)
    assert seen[0] is mask and seen[1] is mask  # the hippocampus still sees the padding


def test_bool_and_long_masks_agree(zoo, batch):
    neo, (ids, mask) = zoo.neo("llama"), batch
    with torch.no_grad():
        assert torch.equal(neo.hidden(ids, mask.bool()), neo.hidden(ids, mask))


# ---- one pass ------------------------------------------------------------------------------------
def _count_one_system_step(neo: HFNeocortex, ids, mask) -> tuple[CallCounter, torch.Tensor, int]:
    """One system forward + backward in train mode; returns call counts, the delta source's grad and the
    number of tensors autograd saved outside checkpoints."""
    _, layers = hf_split_layer_path(neo.model)
    counter = CallCounter(layers)
    source = nn.Parameter(0.1 * torch.ones(H))
    saved = [0]

    def pack(t):
        saved[0] += 1
        return t

    neo.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = full_logits(neo, ids, mask, inject=counter.wrap(const_delta(source)))
        logits.float().square().mean().backward(inputs=[source])
    finally:
        neo.eval()
        counter.remove()
    return counter, source.grad, saved[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_each_layer_runs_once_with_and_without_checkpointing(zoo, batch, arch):
    ids, mask = batch
    plain, _, saved_plain = _count_one_system_step(zoo.neo(arch), ids, mask)
    ckpt_neo = zoo.neo(arch, hf_gradient_checkpointing=True)
    assert ckpt_neo.runtime_info()["hf_gradient_checkpointing"] is True
    ckpt, ckpt_grad, saved_ckpt = _count_one_system_step(ckpt_neo, ids, mask)
    for counter in (plain, ckpt):
        assert counter.layers == [1] * L, counter.layers  # each layer once, even after the backward
        assert counter.injections == 1
    assert saved_ckpt < saved_plain  # checkpointing really held activations back
    _, plain_grad, _ = _count_one_system_step(zoo.neo(arch), ids, mask)
    torch.testing.assert_close(ckpt_grad, plain_grad)  # and the recompute gives the same gradients


def test_split_layer_left_unchecked_where_checkpoint_would_replay_hooks(zoo, batch, monkeypatch):
    """transformers 5.17 checkpoints a layer's __call__ (hooks included): the split layer then opts out."""
    monkeypatch.setattr(hf_module, "_hooks_outside_checkpoint", lambda layer: False)
    neo = build_neocortex(zoo.cfg("llama", hf_gradient_checkpointing=True), device=CPU)
    _, layers = hf_split_layer_path(neo.model)
    assert [layer.gradient_checkpointing for layer in layers] == [i != neo.injection_layer_idx for i in range(L)]
    counter, grad, _ = _count_one_system_step(neo, *batch)
    assert counter.layers == [1] * L and counter.injections == 1 and grad.abs().sum() > 0


def test_deepcopy_gets_its_own_hook(zoo, batch):
    neo, (ids, mask) = zoo.neo("gpt2"), batch
    twin = copy.deepcopy(neo)
    assert twin._hook is not neo._hook
    delta = const_delta(torch.full((H,), 0.2))
    with torch.no_grad():
        assert torch.equal(twin.hidden(ids, mask, delta), neo.hidden(ids, mask, delta))
        twin.model.get_input_embeddings().weight.add_(1.0)
        assert not torch.equal(twin.hidden(ids, mask), neo.hidden(ids, mask))


# ---- precision and modes -------------------------------------------------------------------------
def test_trained_base_keeps_fp32_master_weights(zoo):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no half-precision warning on the safe path
        neo = zoo.neo("llama", trains_base=True, hf_torch_dtype="bf16")
    assert {p.dtype for p in neo.parameters()} == {torch.float32}
    frozen = zoo.neo("llama", trains_base=False, hf_torch_dtype="bf16")
    assert {p.dtype for p in frozen.parameters()} == {torch.bfloat16}
    assert frozen.runtime_info()["hf_dtype"] == "bfloat16"


def test_half_precision_base_when_allowed_warns(zoo):
    with pytest.warns(UserWarning, match="hf_allow_half_precision_base"):
        neo = build_neocortex(zoo.cfg("llama", hf_torch_dtype="bf16", hf_allow_half_precision_base=True),
                              device=CPU, trains_base=True)
    assert {p.dtype for p in neo.parameters()} == {torch.bfloat16}


def test_loads_in_eval_mode_and_never_flips_modes(zoo, batch):
    neo, (ids, mask) = zoo.neo("gpt2"), batch
    assert not any(m.training for m in neo.modules())
    with torch.no_grad():
        neo.hidden(ids, mask, inject=lambda h, m: torch.zeros_like(h))
    assert not any(m.training for m in neo.modules())
    neo.train()
    try:
        with torch.no_grad():
            neo.hidden(ids, mask)
        assert all(m.training for m in neo.modules())
    finally:
        neo.eval()


def test_runtime_info_and_state_dict(zoo):
    neo = zoo.neo("qwen2")
    info = neo.runtime_info()
    for key in ("hf_injection_mode", "hf_injection_layer_idx", "hf_num_decoder_layers", "hf_injection_fraction",
                "hf_model_name", "hf_dtype", "hf_parameters", "hf_gradient_checkpointing"):
        assert key in info
    assert info["hf_parameters"] == sum(p.numel() for p in neo.parameters())
    assert all(k.startswith("model.") for k in neo.state_dict())  # no part registered twice


# ---- legacy fallback -----------------------------------------------------------------------------
class Opaque(nn.Module):
    """Hides a causal LM's decoder stack behind an attribute name no known path resolves."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def get_output_embeddings(self) -> nn.Module:
        return self.inner.get_output_embeddings()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


@pytest.fixture
def opaque_loader(monkeypatch):
    real = hf_module.load_causal_lm
    monkeypatch.setattr(hf_module, "load_causal_lm", lambda cfg, dtype: Opaque(real(cfg, dtype)))


def test_legacy_fallback_on_unknown_layout(zoo, batch, opaque_loader):
    ids, mask = batch
    with pytest.warns(UserWarning, match="legacy head-only injection"):
        neo = build_neocortex(zoo.cfg("llama"), device=CPU)
    info = neo.runtime_info()
    assert info["hf_injection_mode"] == "legacy_head_only" and info["hf_injection_layer_idx"] == -1
    delta = torch.full((H,), 0.25)
    with torch.no_grad():
        base = neo.hidden(ids, mask)  # (B, T, H), final-normed
        real = mask.bool()
        torch.testing.assert_close(neo.logits(base)[real],
                                   zoo.ref("llama")(input_ids=ids, attention_mask=mask).logits[real],
                                   atol=1e-5, rtol=1e-5)
        assert torch.equal(neo.hidden(ids, mask, inject=const_delta(delta)), base + delta)


def test_legacy_fallback_disabled_is_an_error(zoo, opaque_loader):
    with pytest.raises(ConfigError, match="hf_allow_legacy_injection_fallback"):
        build_neocortex(zoo.cfg("llama", hf_allow_legacy_injection_fallback=False), device=CPU)


# ---- with the real hippocampus ---------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_hippocampus_trains_through_the_upper_layers(zoo, batch, arch):
    neo, (ids, mask) = zoo.neo(arch), batch
    torch.manual_seed(3)
    hippo = Hippocampus(neo.hidden_size, ExpertsConfig(num_experts=4, expert_hidden=16, top_k=2))
    params = list(hippo.parameters())
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    hidden = neo.hidden(ids, mask, inject=lambda h, m: hippo(h, m)[0])  # (B, T, H)
    real = mask[:, 1:].bool()
    logits = neo.logits(hidden[:, :-1][real])  # (n, V): only supervised positions
    loss = F.cross_entropy(logits, ids[:, 1:][real])
    loss.backward(inputs=params)
    assert torch.isfinite(loss)
    assert hippo.w_out.grad.abs().sum() > 0  # zero-initialised output layer still gets a gradient
    opt.step()
    assert any(not torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert not any(p.grad is not None for p in neo.parameters())  # the base was not touched


# ---- resuming from the injection point (perf path of wake's teacher and refresh) ---------------------
# Rotary models resume exactly; GPT-2 and OPT add position embeddings to `inputs_embeds`, so a resumed pass
# would add them twice: the load-time check must find that and switch resuming off.
RESUMES = {"llama": True, "qwen2": True, "gpt_neox": True, "gpt2": False, "opt": False}


@pytest.mark.parametrize("arch", ARCHS)
def test_resume_reproduces_the_system_pass_or_is_switched_off(zoo, batch, arch):
    neo = zoo.neo(arch)
    assert neo.can_resume is RESUMES[arch]
    ids, mask = batch
    source = torch.randn(neo.hidden_size, generator=torch.Generator().manual_seed(5))
    kept: list[torch.Tensor] = []

    def inject(h, m):
        kept.append(h)
        return const_delta(source)(h, m)

    with torch.no_grad():
        full = neo.hidden(ids, mask, inject=inject)  # (B, T, H)
        if not neo.can_resume:
            with pytest.raises(RuntimeError, match="can_resume"):
                neo.resume(kept[0], mask)
            return
        resumed = neo.resume(kept[0] + source.expand_as(kept[0]), mask)
    real = mask.bool()
    torch.testing.assert_close(resumed[real], full[real], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(full, neo.hidden(ids, mask)), "the delta must matter for this check to mean anything"


def test_resume_leaves_the_stack_in_place(zoo, batch):
    neo = zoo.neo("qwen2")
    ids, mask = batch
    keys = list(neo.state_dict())
    with torch.no_grad():
        neo.resume(torch.randn(2, 8, neo.hidden_size), mask)
    assert list(neo.state_dict()) == keys
    real = mask.bool()
    torch.testing.assert_close(neo.hidden(ids, mask)[real],
                               zoo.ref("qwen2").model(ids, attention_mask=mask).last_hidden_state[real])


@pytest.mark.parametrize("scope", ["trunk", "layers"])
def test_compiled_neocortex_gives_the_eager_output_without_recompiling_per_call(zoo, batch, scope):
    """train.compile_model, traced by dynamo with the eager backend (no C++ build on the CI machine): the same
    numbers (base view, system view, resume), a bounded set of graphs over base/system, train/eval,
    grad/no-grad, and for the whole trunk no graph break (the injection and the hippocampus are traced in)."""
    import torch._dynamo

    torch._dynamo.reset()
    neo = build_neocortex(zoo.cfg("qwen2"), device=CPU)
    ids, mask = batch
    hip = Hippocampus(neo.hidden_size, ExpertsConfig(num_experts=4, expert_hidden=8, top_k=2))
    with torch.no_grad():
        hip.w_out.normal_()
    inject = lambda h, m: hip(h, m)[0]  # noqa: E731
    split = torch.randn(2, 8, neo.hidden_size)
    with torch.no_grad():
        eager = [neo.hidden(ids, mask), neo.hidden(ids, mask, inject=inject), neo.resume(split, mask)]
    from biollm_cls.train import compile_neocortex

    compile_neocortex(neo, scope, backend="eager")
    from torch._dynamo.utils import counters

    counters.clear()
    for _ in range(3):
        with torch.no_grad():
            compiled = [neo.hidden(ids, mask), neo.hidden(ids, mask, inject=inject), neo.resume(split, mask)]
        neo.train()
        neo.hidden(ids, mask, inject=inject).sum().backward()
        neo.eval()
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b)
    graphs = counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= 6, graphs  # the variants above (and dynamo's split variants), not one per call
    if scope == "trunk":
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert graphs <= 4, graphs  # base, system, resume (no grad), system (train, grad): one graph each
    torch._dynamo.reset()


def test_maskless_sdpa_runs_the_causal_implementation_with_the_same_hidden_states(tmp_path):
    """hf_pass_attention_mask=false switches SDPA to `biollm_causal_sdpa`: transformers prepares no mask for it (no
    host sync per forward, the same path while a CUDA graph is captured), and the hidden states are unchanged."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from biollm_cls.neocortex.hf import CAUSAL_SDPA, _use_causal_sdpa

    torch.manual_seed(0)
    sizes = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2}
    model = AutoModelForCausalLM.from_config(Qwen2Config(**sizes), attn_implementation="sdpa").eval()
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        before = model.model(input_ids=ids).last_hidden_state
        _use_causal_sdpa(model)
        after = model.model(input_ids=ids).last_hidden_state
    assert model.config._attn_implementation == CAUSAL_SDPA
    torch.testing.assert_close(after, before)
    windowed = Qwen2Config(**sizes, use_sliding_window=True, sliding_window=4, max_window_layers=0)
    sliding = AutoModelForCausalLM.from_config(windowed, attn_implementation="sdpa")
    _use_causal_sdpa(sliding)  # a sliding-window layer's mask is not plain causal: left as it was
    assert sliding.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("autocast", [False, True])
def test_tied_embedding_gradient_in_place_has_autograds_values(batch, arch, autocast, tmp_path):
    """A tied embedding/head (embedding_grad.py) gets the gradient autograd gives, also under bf16 autocast."""
    ids, mask = batch
    torch.manual_seed(0)
    config = CONFIGS[arch]()
    config.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / arch)
    cfg = ModelConfig(provider="hf", hf_model_name=str(tmp_path / arch), hf_local_files_only=True, vocab_size=V // 2)
    neo = build_neocortex(cfg, device=CPU, trains_base=True)
    assert neo.embedding_grad_in_place
    ref = copy.deepcopy(neo)
    ref.embedding_grad_in_place = False
    del vars(ref.model.get_input_embeddings())["forward"]  # back to autograd's backward
    grads = []
    for m in (neo, ref):
        for _ in range(2):  # the second backward accumulates onto existing gradients
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                logits = m.logits(m.hidden(ids, mask)[:, :-1])  # (B, T-1, V/2)
            targets = ids[:, 1:].clamp(max=V // 2 - 1)
            F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[1].items():
        torch.testing.assert_close(grads[0][name], g, msg=name)
    assert not build_neocortex(cfg, device=CPU, trains_base=False).embedding_grad_in_place
