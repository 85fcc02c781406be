"""Run unmodified `mamba_ssm` / `causal_conv1d` code, and Hugging Face transformers' Mamba models, on these kernels.

    from kernels.compat import install_mamba_ssm_aliases      # mamba_kernels.compat when pip-installed
    install_mamba_ssm_aliases()                                # before importing the code that uses mamba_ssm
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn   # ours

Nothing is installed on disk. `install_mamba_ssm_aliases` appends a finder to `sys.meta_path`, after the
standard ones, so a real `mamba_ssm` or `causal_conv1d` (installed before or after) is always imported
instead. The finder answers `importlib.util.find_spec` and `import` for the module paths in `ALIAS_MODULES`, and
`importlib.metadata.version("mamba_ssm" | "causal_conv1d")` (the only metadata it fakes: a name and a version,
`UPSTREAM_VERSIONS` with a `+mamba.kernels` local label, no files), which is what transformers' availability
checks read (`is_mamba_ssm_available`, `is_mamba_2_ssm_available` (>= 2.0.4), `is_causal_conv1d_available`).

`patch_transformers_model(model)` swaps the mixers of a transformers MambaForCausalLM / Mamba2ForCausalLM (or
their bare models) for this package's `Mamba` / `Mamba2`, keeping the same Parameter objects, so the model runs
on these kernels on any device and takes `seq_idx` for packed sequences.
"""
from __future__ import annotations

import importlib.abc
import importlib.metadata
import importlib.util
import re
import sys
import warnings

import torch
import torch.nn.functional as F
from torch.func import functional_call

from . import causal_conv1d, selective_scan, ssd, state_update
from .modules import InferenceParams, Mamba, Mamba2, RMSNormGated

# The upstream releases whose public names and call conventions these aliases follow (see the README's
# "not supported" list for the differences); the advertised version carries a local label that says it is us.
UPSTREAM_VERSIONS = {"mamba_ssm": "2.3.2", "causal_conv1d": "1.6.1"}
LOCAL_LABEL = "+mamba.kernels"


def rmsnorm_fn(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    """mamba_ssm.ops.triton.layernorm_gated.rmsnorm_fn: RMSNormGated's computation with the given weight."""
    if bias is not None:
        raise NotImplementedError("rmsnorm_fn with a bias is not supported (mamba_ssm's RMSNorm has none)")
    norm = RMSNormGated(x.shape[-1], eps=eps, group_size=group_size, norm_before_gate=norm_before_gate, device="meta")
    return functional_call(norm, {"weight": weight}, (x, z))


def mamba_split_conv1d_scan_combined(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
                                     initial_states=None, seq_idx=None, dt_limit=(0.0, float("inf")),
                                     return_final_states=False, activation="silu", rmsnorm_weight=None,
                                     rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None, headdim=None,
                                     ngroups=1, norm_before_gate=True, state_dtype=None):
    """mamba_ssm.ops.triton.ssd_combined.mamba_split_conv1d_scan_combined, composed from causal_conv1d_fn and
    mamba_chunk_scan_combined (not fused: autograd keeps the intermediate activations).
    zxbcdt: (batch, L, 2 * d_mlp + 2 * dim + 2 * ngroups * dstate + nheads), split [z0, x0, z, xBC, dt];
    D: (nheads,) (then headdim is required) or (nheads, headdim). Returns out (batch, L, dim or out_dim),
    and the final states (batch, nheads, headdim, dstate) if return_final_states."""
    if state_dtype is not None:
        raise NotImplementedError("state_dtype is not supported: the inter-chunk states are kept in fp32")
    if D.dim() == 1:
        if headdim is None:
            raise ValueError("headdim must be given when D is (nheads,)")
        nheads = D.shape[0]
    else:
        nheads, headdim = D.shape
    dim = nheads * headdim
    if conv1d_weight.dim() != 2 or (conv1d_weight.shape[0] - dim) % (2 * ngroups):
        raise ValueError(f"conv1d_weight must be (dim + 2 * ngroups * dstate, width) with dim={dim}, "
                         f"ngroups={ngroups}; got {tuple(conv1d_weight.shape)}")
    dstate = (conv1d_weight.shape[0] - dim) // (2 * ngroups)
    d_mlp2 = zxbcdt.shape[-1] - 2 * dim - 2 * ngroups * dstate - nheads
    if zxbcdt.dim() != 3 or d_mlp2 < 0 or d_mlp2 % 2:
        raise ValueError(f"zxbcdt must be (batch, L, 2 * d_mlp + {2 * dim + 2 * ngroups * dstate + nheads}), "
                         f"got {tuple(zxbcdt.shape)}")
    z0, x0, z, xBC, dt = torch.split(zxbcdt, [d_mlp2 // 2, d_mlp2 // 2, dim, dim + 2 * ngroups * dstate, nheads], -1)
    xBC = causal_conv1d.causal_conv1d_fn(xBC.transpose(1, 2), conv1d_weight, conv1d_bias, seq_idx=seq_idx,
                                         activation=activation).transpose(1, 2)
    x, B, C = torch.split(xBC, [dim, ngroups * dstate, ngroups * dstate], dim=-1)
    res = ssd.mamba_chunk_scan_combined(
        x.unflatten(-1, (nheads, headdim)), dt, A, B.unflatten(-1, (ngroups, dstate)),
        C.unflatten(-1, (ngroups, dstate)), chunk_size, D=D,
        z=None if rmsnorm_weight is not None else z.unflatten(-1, (nheads, headdim)), dt_bias=dt_bias,
        initial_states=initial_states, seq_idx=seq_idx, dt_softplus=True, dt_limit=dt_limit,
        return_final_states=return_final_states)
    y, final_states = res if return_final_states else (res, None)
    y = y.flatten(-2)
    if rmsnorm_weight is not None:
        y = rmsnorm_fn(y, rmsnorm_weight, None, z, rmsnorm_eps, dim // ngroups, norm_before_gate)
    if d_mlp2:
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    if outproj_weight is not None:
        y = F.linear(y, outproj_weight, outproj_bias)
    return (y, final_states) if return_final_states else y


# Module path -> {attribute: object}. The upstream sub-modules that exist only for their functions are listed
# with the functions that unmodified callers import from them; packages (names with children) are packages.
ALIAS_MODULES = {
    "mamba_ssm": {"selective_scan_fn": selective_scan.selective_scan_fn,
                  "mamba_inner_fn": selective_scan.mamba_inner_fn, "Mamba": Mamba, "Mamba2": Mamba2},
    "mamba_ssm.ops": {},
    "mamba_ssm.ops.selective_scan_interface": {
        "selective_scan_fn": selective_scan.selective_scan_fn, "selective_scan_ref": selective_scan.selective_scan_ref,
        "mamba_inner_fn": selective_scan.mamba_inner_fn},
    "mamba_ssm.ops.triton": {},
    "mamba_ssm.ops.triton.selective_state_update": {
        "selective_state_update": state_update.selective_state_update,
        "selective_state_update_ref": state_update.selective_state_update_ref},
    "mamba_ssm.ops.triton.ssd_combined": {
        "mamba_chunk_scan_combined": ssd.mamba_chunk_scan_combined,
        "mamba_split_conv1d_scan_combined": mamba_split_conv1d_scan_combined},
    "mamba_ssm.ops.triton.layernorm_gated": {"RMSNorm": RMSNormGated, "rmsnorm_fn": rmsnorm_fn},
    "mamba_ssm.modules": {},
    "mamba_ssm.modules.mamba_simple": {"Mamba": Mamba},
    "mamba_ssm.modules.mamba2": {"Mamba2": Mamba2},
    "mamba_ssm.modules.ssd_minimal": {"ssd_minimal_discrete": ssd.ssd_minimal_discrete},
    "mamba_ssm.utils": {},
    "mamba_ssm.utils.generation": {"InferenceParams": InferenceParams},
    "causal_conv1d": {"causal_conv1d_fn": causal_conv1d.causal_conv1d_fn,
                      "causal_conv1d_update": causal_conv1d.causal_conv1d_update},
    "causal_conv1d.causal_conv1d_interface": {
        "causal_conv1d_fn": causal_conv1d.causal_conv1d_fn, "causal_conv1d_update": causal_conv1d.causal_conv1d_update,
        "causal_conv1d_ref": causal_conv1d.causal_conv1d_ref},
    "causal_conv1d.causal_conv1d_varlen": {"causal_conv1d_varlen_states": causal_conv1d.causal_conv1d_varlen_states},
}


class _AliasDistribution(importlib.metadata.Distribution):
    """Metadata with a name and a version only (no files, no requirements)."""

    def __init__(self, name):
        self._name = name

    def read_text(self, filename):
        if filename == "METADATA":
            return f"Metadata-Version: 2.1\nName: {self._name}\nVersion: {UPSTREAM_VERSIONS[self._name]}{LOCAL_LABEL}\n"
        return None

    def locate_file(self, path):
        return None


class AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves ALIAS_MODULES for the top-level names in `roots` (those whose real package was absent)."""

    def __init__(self, roots):
        self.roots = frozenset(roots)

    def _serves(self, fullname):
        return fullname.split(".")[0] in self.roots and fullname in ALIAS_MODULES

    def find_spec(self, fullname, path=None, target=None):
        if not self._serves(fullname):
            return None
        is_package = any(name.startswith(fullname + ".") for name in ALIAS_MODULES)
        return importlib.util.spec_from_loader(fullname, self, origin="mamba_kernels alias", is_package=is_package)

    def create_module(self, spec):
        return None  # the default module object

    def exec_module(self, module):
        module.__dict__.update(ALIAS_MODULES[module.__name__])
        if module.__name__ in self.roots:
            module.__version__ = UPSTREAM_VERSIONS[module.__name__] + LOCAL_LABEL

    def find_distributions(self, context=importlib.metadata.DistributionFinder.Context()):
        name = re.sub(r"[-_.]+", "_", context.name or "").lower()
        return iter([_AliasDistribution(name)] if name in self.roots else [])


def install_mamba_ssm_aliases():
    """Makes `import mamba_ssm...` / `import causal_conv1d...` resolve to these kernels when the real packages
    are absent. Call it before importing the code that uses them (transformers resolves its Mamba kernels when
    its modeling_mamba / modeling_mamba2 modules are first imported). Returns the aliased top-level names."""
    if any(isinstance(finder, AliasFinder) for finder in sys.meta_path):
        return sorted(next(f for f in sys.meta_path if isinstance(f, AliasFinder)).roots)
    roots = [name for name in UPSTREAM_VERSIONS if importlib.util.find_spec(name) is None]
    if roots:
        sys.meta_path.append(AliasFinder(roots))
    import_utils = sys.modules.get("transformers.utils.import_utils")
    for check in ("is_mamba_ssm_available", "is_mamba_2_ssm_available", "is_causal_conv1d_available"):
        # transformers caches these answers; a cached "absent" from before this call would hide the aliases
        getattr(getattr(import_utils, check, None), "cache_clear", lambda: None)()
    late = [name for name in ("transformers.models.mamba.modeling_mamba", "transformers.models.mamba2.modeling_mamba2")
            if name in sys.modules]
    if roots and late:
        warnings.warn(f"{', '.join(late)} was imported before install_mamba_ssm_aliases(): it keeps the kernels it "
                      "found then; call it first, or use patch_transformers_model(model)", stacklevel=2)
    return sorted(roots)


def uninstall_mamba_ssm_aliases():
    """Removes the finder and every aliased module from sys.modules (modules that imported them keep them)."""
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, AliasFinder)]
    for name in [n for n, m in sys.modules.items() if isinstance(getattr(m, "__loader__", None), AliasFinder)]:
        del sys.modules[name]


class TransformersMixerForward:
    """The forward of transformers' MambaMixer / Mamba2Mixer (transformers >= 5 cache API) over this package's
    module: full sequences through forward (with seq_idx), single decoding tokens through step."""

    def forward(self, hidden_states, cache=None, attention_mask=None, seq_idx=None, **kwargs):
        cache = kwargs.pop("cache_params", cache)
        if attention_mask is not None and not bool(attention_mask.all()):
            raise NotImplementedError("padded batches (attention_mask with zeros) are not supported by the patched "
                                      "mixers: pack the sequences and pass seq_idx instead")
        if cache is None:
            return super().forward(hidden_states, seq_idx=seq_idx)
        if not hasattr(cache, "get_conv_state"):
            raise NotImplementedError(f"{type(cache).__name__} is not supported: transformers >= 5's cache is needed")
        conv_state = cache.get_conv_state(self.layer_idx)
        if conv_state is not None:
            if hidden_states.shape[1] != 1 or cache.is_recording_past(self.layer_idx):
                raise NotImplementedError("after the prompt, the patched mixers take one token per call")
            return self.step(hidden_states, conv_state, cache.get_recurrent_state(self.layer_idx))[0]
        params = InferenceParams(max_seqlen=hidden_states.shape[1], max_batch_size=hidden_states.shape[0])
        out = super().forward(hidden_states, inference_params=params, seq_idx=seq_idx)
        conv_state, ssm_state = params.key_value_memory_dict[self.layer_idx]
        cache.update_conv_state(conv_state, self.layer_idx, conv_kernel_size=self.d_conv)
        cache.update_recurrent_state(ssm_state, self.layer_idx)
        return out


class TransformersMamba(TransformersMixerForward, Mamba):
    pass


class TransformersMamba2(TransformersMixerForward, Mamba2):
    pass


def _check_silu(config):
    if config.hidden_act not in ("silu", "swish"):
        raise ValueError(f"config.hidden_act must be 'silu' (as in mamba_ssm), got {config.hidden_act!r}")


def _mamba_from(mixer, backend):
    config = mixer.config
    _check_silu(config)
    return TransformersMamba(config.hidden_size, d_state=config.state_size, d_conv=config.conv_kernel,
                             expand=config.intermediate_size / config.hidden_size, dt_rank=int(config.time_step_rank),
                             conv_bias=config.use_conv_bias, bias=config.use_bias, layer_idx=mixer.layer_idx,
                             device="meta", backend=backend)


def _mamba2_from(mixer, backend):
    if mixer.num_heads * mixer.head_dim != mixer.intermediate_size:
        raise ValueError(f"num_heads * head_dim ({mixer.num_heads} * {mixer.head_dim}) must equal intermediate_size "
                         f"({mixer.intermediate_size})")
    if mixer.activation not in ("silu", "swish"):
        raise ValueError(f"config.hidden_act must be 'silu' (as in mamba_ssm), got {mixer.activation!r}")
    ours = TransformersMamba2(mixer.hidden_size, d_state=mixer.ssm_state_size, d_conv=mixer.conv_kernel_size,
                              expand=mixer.intermediate_size / mixer.hidden_size, headdim=mixer.head_dim,
                              ngroups=mixer.n_groups, dt_limit=tuple(mixer.time_step_limit), bias=mixer.use_bias,
                              conv_bias=mixer.use_conv_bias, chunk_size=mixer.chunk_size, norm_before_gate=False,
                              layer_idx=mixer.layer_idx, device="meta", backend=backend)
    ours.norm.eps = mixer.norm.variance_epsilon
    return ours


def _share_parameters(ours, theirs):
    """Moves theirs' Parameter objects into ours (built on the meta device), by name; shapes must agree."""
    our_params = dict(ours.named_parameters())
    their_params = dict(theirs.named_parameters())
    if our_params.keys() != their_params.keys():
        raise ValueError(f"parameter names differ: ours {sorted(our_params)}, transformers' {sorted(their_params)}")
    for name, param in their_params.items():
        if our_params[name].shape != param.shape:
            raise ValueError(f"{name}: our shape {tuple(our_params[name].shape)}, transformers' {tuple(param.shape)}")
        owner_path, _, attr = name.rpartition(".")
        setattr(ours.get_submodule(owner_path), attr, param)
    return ours.train(theirs.training)


# Matched by module and class name, not identity, so that no transformers import is needed here (and a
# re-imported modeling module still matches)
MIXER_BUILDERS = {("transformers.models.mamba.modeling_mamba", "MambaMixer"): _mamba_from,
                  ("transformers.models.mamba2.modeling_mamba2", "Mamba2Mixer"): _mamba2_from}


def _mixer_kind(module):
    return type(module).__module__, type(module).__name__


def patch_transformers_model(model, backend=None):
    """Replaces every transformers MambaMixer / Mamba2Mixer inside `model` by this package's Mamba / Mamba2
    holding the same Parameter objects (state_dict keys unchanged). `backend` as in kernels.set_backend.
    Returns the model. Padded batches (attention_mask with zeros) raise; pass seq_idx for packed sequences."""
    targets = [(name, module) for name, module in model.named_modules() if _mixer_kind(module) in MIXER_BUILDERS]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no transformers MambaMixer or Mamba2Mixer to patch")
    for name, mixer in targets:
        owner_path, _, attr = name.rpartition(".")
        ours = _share_parameters(MIXER_BUILDERS[_mixer_kind(mixer)](mixer, backend), mixer)
        setattr(model.get_submodule(owner_path), attr, ours)
    return model
