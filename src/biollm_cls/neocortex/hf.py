"""A Hugging Face causal LM as the neocortex, with the hippocampal delta injected mid-stack in one pass.

The split. The decoder stack of ``L`` layers is cut after ``pre = clamp(round(L * f), 1, L - 1)`` layers
(``f = model.hf_injection_fraction``; Python's ``round``, as in the reference: ``L=24, f=0.7`` gives
``pre=17``), so the injection follows layer index ``pre - 1``. The stack is found at the first of
``model.layers`` (Llama, Qwen2, Mistral, ...), ``transformer.h`` (GPT-2, GPT-J, Bloom, Falcon),
``model.decoder.layers`` (OPT) or ``gpt_neox.layers`` (Pythia, NeoX) that holds at least two layers.

Why single pass. The reference ran the whole model (all layers plus full-vocabulary logits) to reach the
split, then ran it *again* from the input ids with a hook that overwrote layer ``pre - 1``'s output:
about 3x the necessary compute (REFERENCE.md §7.3.1). Here a permanent forward hook on layer ``pre - 1``
adds ``inject(h, attention_mask)`` to that layer's output *during* the one forward of the inner base
model (``model.model``, ``model.transformer``, ``model.model.decoder`` or ``model.gpt_neox``). Nothing
else changes: embeddings, rotary/absolute positions, masks and the final norm are the model's own code,
so every architecture with a known layout works without re-implementing it. Each decoder layer runs
once per forward, and ``hidden`` stops at the final norm: ``logits`` projects only what it is given
onto the first ``vocab_size`` rows of the LM head (a weight slice, never full-vocabulary logits).
The base forward is the same pass with ``inject=None`` (the hook is then a no-op).

Gradient checkpointing (non-reentrant). Recent transformers (5.23) checkpoint a layer's ``forward``, not
``__call__``, so module hooks run outside the checkpoint: the injection runs once in the forward and is
not replayed in the backward recompute. Where a layer's checkpoint wraps its hooks (transformers 5.17
and older), the split layer alone is left un-checkpointed instead; either way the hook runs once.

Precision. A base that trains (sleep, or wake with ``wake_base_lr_scale > 0``) keeps fp32 master weights
whatever ``hf_torch_dtype`` says; the trainer's ``torch.autocast`` does the bf16/fp16 compute. With
half-precision weights the reference's fp16 base went NaN after one AdamW step and its bf16 base barely
moved at lr 1e-6 (REFERENCE.md §7.1.8); ``hf_allow_half_precision_base`` opts back in, with a warning.

Modes. The model is loaded in eval mode (``from_pretrained``'s default) and this adapter never calls
``train()``/``eval()`` itself: the trainer owns the mode (REFERENCE.md §7.1.7).

Unknown layouts fall back to the legacy head-only injection (the delta is added to the final hidden
state, right before the LM head) with one warning, or raise ``ConfigError`` when
``hf_allow_legacy_injection_fallback`` is false.
"""

from __future__ import annotations

import inspect
import logging
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM

from biollm_cls.config.schema import ConfigError, ModelConfig
from biollm_cls.neocortex.base import Injection
from biollm_cls.neocortex.embedding_grad import accumulate_embedding_grad_in_place, head_logits

log = logging.getLogger(__name__)

# Attribute paths of the decoder-layer stack, most common first.
LAYER_PATHS = ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_HALF = (torch.float16, torch.bfloat16)


# ---- split resolution -------------------------------------------------------------------------------
def _getattr_path(obj: object, dotted: str) -> object | None:
    for name in dotted.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def hf_split_layer_path(model: nn.Module) -> tuple[str | None, nn.ModuleList | None]:
    """(path, layers) of the first known decoder stack with >= 2 layers, or (None, None)."""
    for path in LAYER_PATHS:
        layers = _getattr_path(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) >= 2:
            return path, layers
    return None, None


def split_point(num_layers: int, fraction: float) -> int:
    """Number of layers below the injection: clamp(round(L * f), 1, L - 1); injection after index pre - 1."""
    return min(max(round(num_layers * fraction), 1), num_layers - 1)


# ---- loading ----------------------------------------------------------------------------------------
def resolve_load_dtype(cfg: ModelConfig, trains_base: bool) -> torch.dtype | str:
    """fp32 master weights for a base that trains (unless half precision is allowed); else hf_torch_dtype."""
    if trains_base and not cfg.hf_allow_half_precision_base:
        if cfg.hf_torch_dtype in ("bf16", "fp16"):
            log.info("model.hf_torch_dtype=%s: keeping fp32 master weights for a base that trains "
                     "(autocast does the %s compute)", cfg.hf_torch_dtype, cfg.hf_torch_dtype)
        return torch.float32
    return _DTYPES.get(cfg.hf_torch_dtype, "auto")


def load_causal_lm(cfg: ModelConfig, dtype: torch.dtype | str) -> nn.Module:
    """AutoModelForCausalLM.from_pretrained with the configured hub/local options (comes back in eval mode)."""
    kwargs: dict = {
        "dtype": dtype,
        "trust_remote_code": cfg.hf_trust_remote_code,
        "local_files_only": cfg.hf_local_files_only,
    }
    if cfg.hf_revision:
        kwargs["revision"] = cfg.hf_revision
    if cfg.hf_attn_implementation:
        kwargs["attn_implementation"] = cfg.hf_attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(cfg.hf_model_name, **kwargs)
    except OSError as err:  # not found, no network, missing files: one clear line
        raise ConfigError(f"model.hf_model_name={cfg.hf_model_name!r} could not be loaded: {err}") from err


def _hooks_outside_checkpoint(layer: nn.Module) -> bool:
    """True when checkpointing this layer replays only its forward, not its hooks (transformers 5.23: the
    layer class wraps ``forward``; 5.17 and older override ``__call__``, which runs the hooks inside)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return isinstance(layer, GradientCheckpointingLayer) and type(layer).__call__ is nn.Module.__call__


def _enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant checkpointing of every decoder layer, without the input-grad hook HF adds for it."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5 name (the old one warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # HF makes the embedding output require grad (needed only by reentrant checkpointing); with a frozen
    # base in wake it would build a graph through all the lower layers for nothing.
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()


def _logit_transform(config) -> tuple[float, float | None]:
    """(scale, soft-cap) that some CausalLMs apply after the head: Cohere's logit_scale, Granite's
    1/logits_scaling, Gemma 2's final_logit_softcapping; (1.0, None) for the rest."""
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    scale /= float(getattr(config, "logits_scaling", None) or 1.0)
    cap = getattr(config, "final_logit_softcapping", None)
    return scale, (float(cap) if cap else None)


# ---- mask-free causal attention ---------------------------------------------------------------------
CAUSAL_SDPA = "biollm_causal_sdpa"


def _causal_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, **kwargs):
    """transformers' SDPA attention with no mask: pure causal attention (``is_causal``, the flash kernel)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, None, **kwargs)


def _use_causal_sdpa(model: nn.Module) -> None:
    """With ``hf_pass_attention_mask=false`` and SDPA attention: run `_causal_sdpa`, an attention implementation
    of its own name, so transformers prepares no mask for it. Its mask preparation for a maskless SDPA forward
    checks on the host whether the positions hold packed sequences (a host sync in every forward), and builds an
    explicit mask instead while a CUDA graph is being captured (a different compiled layer than in the eager
    warm-up, compiled inside the capture, which fails). Left as it is where a layer uses a sliding window (its
    mask is not plain causal) or the model cannot switch its attention implementation."""
    config = getattr(model.config, "text_config", None) or model.config
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        if any(t != "full_attention" for t in layer_types):
            return
    elif getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return
    from transformers import AttentionInterface

    AttentionInterface.register(CAUSAL_SDPA, _causal_sdpa)
    try:
        model.set_attn_implementation(CAUSAL_SDPA)
    except (ValueError, NotImplementedError):  # an architecture that checks names itself: keep SDPA
        return


# ---- the injection hook -----------------------------------------------------------------------------
class _InjectionHook:
    """Forward hook on layer pre-1: output -> output + inject(output, mask) while a system forward runs.

    A plain object (not a bound method of the adapter) so that ``copy.deepcopy`` of the adapter gives the
    copy its own hook, and the hook holds no reference to the model.
    """

    def __init__(self) -> None:
        self.inject: Injection | None = None
        self.mask: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> torch.Tensor | tuple | None:
        if self.inject is None:
            return None  # base forward: keep the layer's output
        is_seq = isinstance(output, (tuple, list))
        h = output[0] if is_seq else output  # (B, T, H)
        h = h + self.inject(h, self.mask).to(h.dtype)  # h + delta, (B, T, H)
        return type(output)((h, *output[1:])) if is_seq else h


# ---- the adapter ------------------------------------------------------------------------------------
class HFNeocortex(nn.Module):
    """A ``Neocortex`` over any Hugging Face causal LM (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str = "cpu", trains_base: bool = True):
        super().__init__()
        self.cfg = cfg
        self.trains_base = trains_base
        self.model = load_causal_lm(cfg, resolve_load_dtype(cfg, trains_base))
        self._warn_if_half_base()
        # Parts of self.model are kept in a plain dict, not as attributes: an nn.Module attribute would
        # register them a second time (duplicate state_dict keys).
        self._parts: dict[str, nn.Module | None] = {"head": self._resolve_head()}
        self.model_vocab_size, self.output_hidden_size = self._parts["head"].weight.shape  # (V_model, H')
        self.vocab_size = self._output_vocab(cfg.vocab_size)
        self._logit_transform = _logit_transform(self._text_config())
        self._hook = _InjectionHook()
        # True: the [B,T] mask goes to the model (HF builds a padded causal mask, and checks on the host whether
        # it may skip it: one sync per forward). False (model.hf_pass_attention_mask's default): the model runs
        # pure-causal attention and only `inject` sees the mask. With right padding (every batch: the train
        # loop checks the stream's) this leaves every real position unchanged (a causal query never sees a
        # later pad key; pad positions change and stay masked downstream) and lets SDPA use its flash kernel:
        # 2.1x faster base forward on an H100 (Qwen2.5-0.5B shape, B=8, T=512, one padded row).
        self.pass_attention_mask = bool(cfg.hf_pass_attention_mask)
        if not self.pass_attention_mask:
            _use_causal_sdpa(self.model)
        self.layer_path, layers = hf_split_layer_path(self.model)
        if layers is not None:
            self._setup_split(layers, cfg.hf_injection_fraction)
        else:
            self._setup_legacy()
        # perf (memory): a trained base's tied embedding/head gradient goes straight into .grad (embedding_grad.py)
        embedding = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        self.embedding_grad_in_place = trains_base and getattr(embedding, "weight", None) is \
            self._parts["head"].weight and getattr(self._parts["head"], "bias", None) is None and \
            accumulate_embedding_grad_in_place(embedding)
        self.gradient_checkpointing = bool(cfg.hf_gradient_checkpointing)
        if self.gradient_checkpointing:
            self._setup_gradient_checkpointing()
        self.model.to(device)
        self.train(False)  # same mode as the loaded model; from here on only the trainer changes it
        self.num_parameters = sum(p.numel() for p in self.model.parameters())

    # ---- construction helpers -----------------------------------------------------------------------
    def _warn_if_half_base(self) -> None:
        dtype = next(self.model.parameters()).dtype
        if self.trains_base and dtype in _HALF:
            warnings.warn(
                f"model.hf_allow_half_precision_base=true: the base trains with {dtype} weights. AdamW updates "
                "may underflow (bf16 barely moves at small lr) or overflow (fp16 went NaN after one step in "
                "the reference); fp32 master weights with autocast are the safe default.",
                stacklevel=3,
            )

    def _resolve_head(self) -> nn.Module:
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        weight = getattr(head, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ConfigError(f"model.hf_model_name={self.cfg.hf_model_name!r}: no linear LM head found "
                              "(get_output_embeddings() has no [V, H] weight)")
        return head

    def _output_vocab(self, cap: int) -> int:
        if cap < 0 or cap > self.model_vocab_size:
            raise ConfigError(f"model.vocab_size={cap} must be 0 (whole vocabulary) or in [1, "
                              f"{self.model_vocab_size}] for {self.cfg.hf_model_name!r}")
        return cap or self.model_vocab_size

    def _setup_split(self, layers: nn.ModuleList, fraction: float) -> None:
        self.injection_mode = "decoder_split"
        self.num_layers = len(layers)
        self.injection_layer_idx = split_point(self.num_layers, fraction) - 1
        self._parts["split_layer"] = layers[self.injection_layer_idx]
        self._parts["split_layer"].register_forward_hook(self._hook)
        # the module whose forward runs embeddings -> layers -> final norm: the parent of the stack
        self._parts["trunk"] = _getattr_path(self.model, self.layer_path.rsplit(".", 1)[0])
        self.hidden_size = self._text_config().hidden_size  # width at the injection point
        self._parts["layers"] = layers
        self._parts["upper"] = nn.ModuleList(list(layers)[self.injection_layer_idx + 1 :])
        self.can_resume = self._check_resume()

    def _setup_legacy(self) -> None:
        if not self.cfg.hf_allow_legacy_injection_fallback:
            raise ConfigError(
                f"model.hf_model_name={self.cfg.hf_model_name!r}: no decoder stack at any of {', '.join(LAYER_PATHS)}; "
                "set model.hf_allow_legacy_injection_fallback=true for head-only injection"
            )
        warnings.warn(
            f"{self.cfg.hf_model_name!r}: no decoder stack at any of {', '.join(LAYER_PATHS)}; falling back to "
            "legacy head-only injection (the hippocampal delta is added to the final hidden state)",
            stacklevel=3,
        )
        self.injection_mode = "legacy_head_only"
        self.can_resume = False
        self.num_layers = int(getattr(self._text_config(), "num_hidden_layers", 0) or 0)
        self.injection_layer_idx = -1
        self._parts["split_layer"] = None
        base = getattr(self.model, "base_model", None)
        self._parts["trunk"] = base if isinstance(base, nn.Module) and base is not self.model else None
        self.hidden_size = self.output_hidden_size  # the delta lives at the head's input

    def _setup_gradient_checkpointing(self) -> None:
        if not getattr(self.model, "supports_gradient_checkpointing", False):
            raise ConfigError(f"model.hf_gradient_checkpointing=true: {type(self.model).__name__} does not support it")
        _enable_gradient_checkpointing(self.model)
        layer = self._parts["split_layer"]
        if layer is not None and not _hooks_outside_checkpoint(layer):
            if not hasattr(layer, "gradient_checkpointing"):
                raise ConfigError("model.hf_gradient_checkpointing=true: this model checkpoints its layers in a "
                                  "way that would replay the injection hook in the backward pass")
            layer.gradient_checkpointing = False  # keep the injection out of the recompute

    def _text_config(self):
        config = self.model.config
        return config.get_text_config() if hasattr(config, "get_text_config") else config

    # ---- Neocortex protocol -------------------------------------------------------------------------
    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               inject: Injection | None = None) -> torch.Tensor:
        """input_ids [B,T] (right-padded; mask [B,T] 1 = real) -> final-normed hidden [B,T,H'], one pass."""
        if self.injection_mode == "legacy_head_only":
            h = self._final_hidden(input_ids, attention_mask)  # (B, T, H')
            return h if inject is None else h + inject(h, attention_mask).to(h.dtype)
        if self._hook.inject is not None:
            raise RuntimeError("HFNeocortex.hidden called from inside an injection (nested system forward)")
        self._hook.inject, self._hook.mask = inject, attention_mask
        try:
            return self._final_hidden(input_ids, attention_mask)  # (B, T, H'), delta added at layer pre-1
        finally:
            self._hook.inject = self._hook.mask = None

    def _final_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if not self.pass_attention_mask:
            attention_mask = None
        trunk = self._parts["trunk"]
        if trunk is not None:
            out = trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return self._full_forward_hidden(input_ids, attention_mask)

    # ---- resuming from the injection point -----------------------------------------------------------
    def resume(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """h [B,T,H] at the injection point (layer pre-1's output, delta included) -> final-normed hidden
        [B,T,H']: only the upper layers run. Perf: a frozen lower stack gives the same h before and after a
        hippocampal update, so the post-update teacher (wake) and the system view beside a base view (refresh)
        need not re-run it. The model's own code does the work: its trunk runs with the stack swapped for the
        upper layers and ``inputs_embeds=h`` (positions, masks and the final norm as in a full pass). Checked
        against a full pass at load (`_check_resume`); False there means this is never used."""
        if not self.can_resume:
            raise RuntimeError("HFNeocortex.resume: not available for this model (can_resume is False)")
        return self._resume(h, attention_mask)

    def _resume(self, h: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if not self.pass_attention_mask:
            attention_mask = None
        trunk, name = self._parts["trunk"], self.layer_path.rsplit(".", 1)[1]
        trunk._modules[name] = self._parts["upper"]  # plain swap, restored below (no module re-registration)
        try:
            out = trunk(inputs_embeds=h, attention_mask=attention_mask, use_cache=False)
        finally:
            trunk._modules[name] = self._parts["layers"]
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    @torch.no_grad()
    def _check_resume(self) -> bool:
        """Does `resume` reproduce a full pass on this model? Layer-type-dependent masks (sliding-window
        layers mixed with full ones) are indexed by position in the stack, so a swapped stack is refused;
        otherwise one short padded batch is compared (eval mode, as loaded). Embedding scaling or absolute
        position embeddings added to ``inputs_embeds`` fail the comparison and disable resuming."""
        types = getattr(self._text_config(), "layer_types", None) or []
        if len(set(types)) > 1:
            return False
        vocab = min(self.model_vocab_size, self.vocab_size)
        ids = torch.arange(10, device=self.model.device).remainder(vocab).view(2, 5)  # (2, 5)
        mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool, device=ids.device)
        seen: list[torch.Tensor] = []

        def capture(h: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
            seen.append(h)
            return torch.zeros_like(h)

        try:
            full = self.hidden(ids, mask, inject=capture)  # (2, 5, H')
            resumed = self._resume(seen[0], mask)
        except Exception as err:  # an architecture whose trunk refuses inputs_embeds, ...
            log.info("resume from the injection point is off for this model: %s", err)
            return False
        keep = mask.unsqueeze(-1)
        err = ((full - resumed) * keep).abs().max() / full.abs().max().clamp(min=1e-6)
        return bool(err < 1e-4)

    def compile_layers(self, **options) -> None:
        """Regional compilation: each decoder layer's forward under `torch.compile`. The injection hook stays
        outside the compiled code (hooks run in ``Module.__call__``, around ``forward``), so the base and the
        system views share one compiled layer."""
        for layer in self._parts.get("layers") or []:
            layer.forward = torch.compile(layer.forward, **options)

    def compile_trunk(self, **options) -> None:
        """Whole-stack compilation: the trunk's forward (embeddings, every layer, the final norm) under
        `torch.compile`. The injection hook on layer pre-1 runs inside it, so dynamo traces the hippocampus into
        the same graph; the base view (no injection), the system view and `resume` (the stack swapped for the
        upper layers) are separate variants of one compiled function. Perf: one guard check and one graph launch
        per forward instead of one per layer, and the model's Python around the layers (masks, rotary
        embeddings) runs once at trace time."""
        trunk = self._parts["trunk"]
        if trunk is not None:
            trunk.forward = torch.compile(trunk.forward, **options)
        else:  # legacy layout without a separable trunk: the whole model
            self.model.forward = torch.compile(self.model.forward, **options)

    def _full_forward_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Legacy path for a model with no separable trunk: its last hidden state (logits of one position)."""
        kwargs = {"output_hidden_states": True, "use_cache": False}
        if "logits_to_keep" in inspect.signature(self.model.forward).parameters:
            kwargs["logits_to_keep"] = 1
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return out.hidden_states[-1]  # (B, T, H'), final-normed in transformers' CausalLMs

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H'] -> logits [..., V] over the first V = vocab_size ids (sliced head rows only)."""
        head = self._parts["head"]
        if self.embedding_grad_in_place:  # a tied head without bias: its gradient added in place
            logits = head_logits(hidden, head.weight, self.vocab_size)  # (..., V)
        else:
            weight = head.weight[: self.vocab_size]  # (V, H'), a view
            bias = getattr(head, "bias", None)
            bias = None if bias is None else bias[: self.vocab_size]
            logits = F.linear(hidden, weight, bias)  # (..., V)
        scale, cap = self._logit_transform
        if scale != 1.0:
            logits = logits * scale
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def runtime_info(self) -> dict:
        dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        return {
            "neocortex": "hf",
            "hf_model_name": self.cfg.hf_model_name,
            "hf_revision": self.cfg.hf_revision,
            "hf_injection_mode": self.injection_mode,
            "hf_layer_path": self.layer_path,
            "hf_injection_layer_idx": self.injection_layer_idx,
            "hf_num_decoder_layers": self.num_layers,
            "hf_injection_fraction": self.cfg.hf_injection_fraction,
            "hf_dtype": dtype,
            "hf_trains_base": self.trains_base,
            "hf_parameters": self.num_parameters,
            "hf_gradient_checkpointing": self.gradient_checkpointing,
            "hf_pass_attention_mask": self.pass_attention_mask,
            "hf_attn_implementation": getattr(self.model.config, "_attn_implementation", None),
            "hf_vocab_size": self.vocab_size,
            "hf_model_vocab_size": self.model_vocab_size,
            # the same keys as the tiny neocortex, for uniform logging
            "injection_layer_idx": self.injection_layer_idx,
            "num_decoder_layers": self.num_layers,
            "parameters": self.num_parameters,
        }
