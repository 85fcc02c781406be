"""kernels.compat: mamba_ssm / causal_conv1d aliases, and transformers' Mamba / Mamba2 models on our kernels.

transformers' own PyTorch path (imported without the aliases) is the independent reference: logits, gradients,
greedy generation. Tolerances: fp32 on both sides, the same math in different summation orders over at most
L * N = 13 * 8 terms per output, so differences stay near 1e-6 of the values (1e-5 relative is allowed).
"""
import importlib
import importlib.metadata
import importlib.util
import sys

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import compat
from kernels.causal_conv1d import causal_conv1d_ref
from kernels.ssd import ssd_sequential_ref

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
if any(importlib.util.find_spec(name) for name in ("mamba_ssm", "causal_conv1d")):
    pytest.skip("a real mamba_ssm or causal_conv1d is installed: the aliases stay off by design, and transformers "
                "would take it for the reference path", allow_module_level=True)

MODELING = ("transformers.models.mamba.modeling_mamba", "transformers.models.mamba2.modeling_mamba2")
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture
def aliases():
    """Installs the aliases for one test and removes them (and every aliased module) afterwards."""
    assert compat.install_mamba_ssm_aliases() == ["causal_conv1d", "mamba_ssm"]
    yield
    compat.uninstall_mamba_ssm_aliases()


def import_modeling(with_aliases):
    """transformers resolves its Mamba kernels when modeling_mamba(2) is first imported: import them afresh,
    with or without the aliases, and leave no copy behind in sys.modules."""
    for name in MODELING:
        sys.modules.pop(name, None)
    if with_aliases:
        compat.install_mamba_ssm_aliases()
    try:
        return [importlib.import_module(name) for name in MODELING]
    finally:
        compat.uninstall_mamba_ssm_aliases()
        for name in MODELING:
            sys.modules.pop(name, None)


def tiny_model(version, modeling):
    mamba, mamba2 = modeling
    torch.manual_seed(0)
    if version == 1:
        config = mamba.MambaConfig(vocab_size=64, hidden_size=16, state_size=8, num_hidden_layers=2, expand=2,
                                   conv_kernel=4, time_step_rank=4)
        return mamba.MambaForCausalLM(config)
    config = mamba2.Mamba2Config(vocab_size=64, hidden_size=16, state_size=8, num_hidden_layers=2, expand=2,
                                 head_dim=8, num_heads=4, n_groups=2, conv_kernel=4, chunk_size=8)
    return mamba2.Mamba2ForCausalLM(config)


def input_ids(batch=2, length=13, seed=1):
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_same_greedy_generation(model, reference, ids):
    """Tokens equal and every step's logits close (decoding runs on the cached states). An explicit all-ones
    mask: otherwise generate() takes any pad_token_id among the random ids for padding."""
    runs = [m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                       output_logits=True, return_dict_in_generate=True) for m in (model.eval(), reference.eval())]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    torch.testing.assert_close(torch.stack(runs[0].logits), torch.stack(runs[1].logits), **TOL)


def logits_and_grads(model, ids, **kwargs):
    model.zero_grad()
    logits = model(ids, **kwargs).logits
    (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_run(ours, reference, ids, **kwargs):
    logits, grads = logits_and_grads(ours, ids, **kwargs)
    ref_logits, ref_grads = logits_and_grads(reference, ids, **kwargs)
    torch.testing.assert_close(logits, ref_logits, **TOL)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **TOL, msg=lambda m: f"{name}: {m}")


# --------------------------------------------------------------------------------------------- aliases

def test_upstream_import_paths_resolve_to_our_kernels(aliases):
    from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn, selective_scan_fn
    from mamba_ssm.ops.triton.layernorm_gated import RMSNorm, rmsnorm_fn
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined, mamba_split_conv1d_scan_combined
    from mamba_ssm.utils.generation import InferenceParams

    assert (selective_scan_fn, mamba_inner_fn, selective_state_update, mamba_chunk_scan_combined) == (
        kernels.selective_scan_fn, kernels.mamba_inner_fn, kernels.selective_state_update,
        kernels.mamba_chunk_scan_combined)
    assert (causal_conv1d_fn, causal_conv1d_update) == (kernels.causal_conv1d_fn, kernels.causal_conv1d_update)
    assert (RMSNorm, InferenceParams) == (kernels.RMSNormGated, kernels.InferenceParams)
    assert (mamba_split_conv1d_scan_combined, rmsnorm_fn) == (compat.mamba_split_conv1d_scan_combined,
                                                              compat.rmsnorm_fn)
    import mamba_ssm
    assert mamba_ssm.Mamba2 is kernels.Mamba2 and mamba_ssm.__version__ == "2.3.2+mamba.kernels"
    # what transformers' availability checks read: a spec, and a version from importlib.metadata
    assert importlib.util.find_spec("mamba_ssm.ops.triton.ssd_combined") is not None
    assert importlib.metadata.version("mamba_ssm") == "2.3.2+mamba.kernels"
    assert importlib.metadata.version("causal-conv1d") == "1.6.1+mamba.kernels"
    from transformers.utils.import_utils import _is_package_available
    assert _is_package_available("mamba_ssm", return_version=True) == (True, "2.3.2+mamba.kernels")
    with pytest.raises(ImportError):
        import mamba_ssm.ops.triton.layer_norm  # noqa: F401  (not provided: no fused add-norm)


def test_aliases_never_shadow_a_real_package(tmp_path, monkeypatch):
    (tmp_path / "mamba_ssm").mkdir()
    (tmp_path / "mamba_ssm" / "__init__.py").write_text("REAL = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert compat.install_mamba_ssm_aliases() == ["causal_conv1d"]
        import mamba_ssm
        assert mamba_ssm.REAL
        from causal_conv1d import causal_conv1d_fn
        assert causal_conv1d_fn is kernels.causal_conv1d_fn
    finally:
        compat.uninstall_mamba_ssm_aliases()
        sys.modules.pop("mamba_ssm", None)
    assert importlib.util.find_spec("causal_conv1d") is None and "causal_conv1d" not in sys.modules


def test_late_install_warns():
    importlib.import_module(MODELING[0])
    try:
        with pytest.warns(UserWarning, match="before install_mamba_ssm_aliases"):
            compat.install_mamba_ssm_aliases()
    finally:
        compat.uninstall_mamba_ssm_aliases()
        sys.modules.pop(MODELING[0], None)


# ------------------------------------------------------------ transformers' fast path on the aliases

@pytest.mark.parametrize("version", [1, 2])
def test_transformers_fast_path_on_aliases_matches_its_torch_path(version):
    """With the aliases, transformers calls our functions (mamba_inner_fn / mamba_split_conv1d_scan_combined
    in training, the separate ops in eval); its own PyTorch path is the reference."""
    reference = tiny_model(version, import_modeling(with_aliases=False))
    ours = tiny_model(version, import_modeling(with_aliases=True))
    ours.load_state_dict(reference.state_dict())
    ids = input_ids()
    for training in (True, False):
        assert_same_run(ours.train(training), reference.train(training), ids)
    assert_same_greedy_generation(ours, reference, ids)


def packed_documents():
    first, second = input_ids(1, 5, seed=2), input_ids(1, 8, seed=3)
    return first, second, torch.cat([first, second], 1), torch.tensor([[0] * 5 + [1] * 8], dtype=torch.int32)


def test_transformers_mamba2_on_aliases_isolates_packed_sequences():
    """Mamba2Model forwards seq_idx to causal_conv1d_fn and mamba_chunk_scan_combined (eval) or
    mamba_split_conv1d_scan_combined (training): documents stay apart. (Mamba2ForCausalLM does not pass it on
    to its backbone, so the backbone is called.)"""
    backbone = tiny_model(2, import_modeling(with_aliases=True)).backbone
    first, second, packed_ids, seq_idx = packed_documents()
    for training in (False, True):
        backbone.train(training)
        with torch.no_grad():
            packed = backbone(packed_ids, seq_idx=seq_idx).last_hidden_state
            torch.testing.assert_close(packed[:, :5], backbone(first).last_hidden_state, **TOL)
            torch.testing.assert_close(packed[:, 5:], backbone(second).last_hidden_state, **TOL)


# ------------------------------------------------------------------------- patch_transformers_model

@pytest.mark.parametrize("version", [1, 2])
def test_patched_model_matches_transformers(version):
    modeling = import_modeling(with_aliases=False)
    reference = tiny_model(version, modeling)
    model = tiny_model(version, modeling)
    params_before = dict(model.named_parameters())
    compat.patch_transformers_model(model)
    mixers = [layer.mixer for layer in model.backbone.layers]
    assert all(isinstance(m, kernels.Mamba if version == 1 else kernels.Mamba2) for m in mixers)
    # the same Parameter objects under the same names: optimizers and checkpoints keep working
    assert {name: id(p) for name, p in model.named_parameters()} == {n: id(p) for n, p in params_before.items()}
    ids = input_ids()
    for training in (True, False):
        assert_same_run(model.train(training), reference.train(training), ids)
    assert_same_greedy_generation(model, reference, ids)


@pytest.mark.parametrize("version", [1, 2])
def test_patched_model_isolates_packed_sequences(version):
    """Forward and backward. Mamba2Model hands seq_idx to its mixers (Mamba2ForCausalLM does not pass it on to
    the backbone); transformers' MambaBlock drops it, so for Mamba the patched mixer is called directly."""
    backbone = compat.patch_transformers_model(tiny_model(version, import_modeling(with_aliases=False))).backbone
    if version == 1:
        mixer = backbone.layers[0].mixer
        run = lambda ids, **kw: mixer(backbone.embeddings(ids), **kw)  # noqa: E731
    else:
        run = lambda ids, **kw: backbone(ids, **kw).last_hidden_state  # noqa: E731
    first, second, packed_ids, seq_idx = packed_documents()
    packed = run(packed_ids, seq_idx=seq_idx)
    weight = torch.randn(packed.shape, generator=torch.Generator().manual_seed(5))
    params = [p for p in backbone.parameters()]
    packed_grads = torch.autograd.grad((packed * weight).sum(), params, allow_unused=True)
    alone = [run(ids) for ids in (first, second)]
    torch.testing.assert_close(packed, torch.cat(alone, 1), **TOL)
    alone_grads = torch.autograd.grad((alone[0] * weight[:, :5]).sum() + (alone[1] * weight[:, 5:]).sum(), params,
                                      allow_unused=True)
    assert sum(g is not None for g in packed_grads) >= 7  # at least one mixer's parameters and the embedding
    # parameter gradients sum over the tokens in another order packed than alone (and per thread count): fp32
    # rounding measured up to 1.6e-5 absolute (1.6e-4 relative on one small element) with 2 threads
    for packed_grad, alone_grad in zip(packed_grads, alone_grads):
        if packed_grad is not None:
            torch.testing.assert_close(packed_grad, alone_grad, rtol=1e-4, atol=1e-4)


def test_patched_model_rejects_padding_and_models_without_mixers():
    model = compat.patch_transformers_model(tiny_model(1, import_modeling(with_aliases=False)))
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[0, :3] = 0
    with pytest.raises(NotImplementedError, match="seq_idx"):
        model(input_ids(), attention_mask=mask)
    with pytest.raises(ValueError, match="no transformers MambaMixer"):
        compat.patch_transformers_model(torch.nn.Linear(2, 2))


# --------------------------------------------------------------------- mamba_split_conv1d_scan_combined

def split_conv1d_scan_reference(zxbcdt, conv_w, conv_b, dt_bias, A, D, headdim, ngroups, norm_w, out_w,
                                norm_before_gate, eps=1e-6):
    """float64, from the sequential SSD reference, a plain conv and an explicit gated RMSNorm."""
    nheads = A.shape[0]
    dim = nheads * headdim
    dstate = (conv_w.shape[0] - dim) // (2 * ngroups)
    d_mlp = (zxbcdt.shape[-1] - 2 * dim - 2 * ngroups * dstate - nheads) // 2
    z0, x0, z, xBC, dt = zxbcdt.split([d_mlp, d_mlp, dim, dim + 2 * ngroups * dstate, nheads], -1)
    xBC = causal_conv1d_ref(xBC.transpose(1, 2), conv_w, conv_b, activation="silu").transpose(1, 2)
    x, B, C = xBC.split([dim, ngroups * dstate, ngroups * dstate], -1)
    y, final = ssd_sequential_ref(x.unflatten(-1, (nheads, headdim)), dt, A, B.unflatten(-1, (ngroups, dstate)),
                                  C.unflatten(-1, (ngroups, dstate)), D=D, dt_bias=dt_bias, dt_softplus=True,
                                  return_final_states=True)
    y = y.flatten(-2)
    if norm_w is None:  # then z gates inside the scan, as upstream
        y = y * F.silu(z)
    else:
        gated = y * F.silu(z) if not norm_before_gate else y
        groups = gated.unflatten(-1, (ngroups, -1))
        y = (groups * torch.rsqrt(groups.square().mean(-1, keepdim=True) + eps)).flatten(-2) * norm_w
        y = y * F.silu(z) if norm_before_gate else y
    y = torch.cat([F.silu(z0) * x0, y], -1)
    return F.linear(y, out_w), final


@pytest.mark.parametrize("d_mlp,norm,norm_before_gate,D_2d", [(0, True, False, False), (3, True, True, True),
                                                              (2, False, False, False)])
def test_split_conv1d_scan_combined_matches_reference(d_mlp, norm, norm_before_gate, D_2d):
    g = torch.Generator().manual_seed(4)
    batch, L, nheads, headdim, ngroups, dstate, width = 2, 11, 4, 3, 2, 5, 4
    dim = nheads * headdim
    conv_dim = dim + 2 * ngroups * dstate
    args = dict(
        zxbcdt=torch.randn(batch, L, 2 * d_mlp + 2 * dim + 2 * ngroups * dstate + nheads, generator=g),
        conv_w=torch.randn(conv_dim, width, generator=g) * 0.5, conv_b=torch.randn(conv_dim, generator=g) * 0.1,
        dt_bias=torch.randn(nheads, generator=g) * 0.5, A=-torch.rand(nheads, generator=g) - 0.2,
        D=torch.randn(*((nheads, headdim) if D_2d else (nheads,)), generator=g),
        norm_w=torch.rand(dim, generator=g) + 0.5 if norm else None,
        out_w=torch.randn(7, d_mlp + dim, generator=g) * 0.3)
    args = {k: v.requires_grad_() if v is not None else None for k, v in args.items()}
    out, final = compat.mamba_split_conv1d_scan_combined(
        args["zxbcdt"], args["conv_w"], args["conv_b"], args["dt_bias"], args["A"], args["D"], 4,
        return_final_states=True, rmsnorm_weight=args["norm_w"], outproj_weight=args["out_w"], headdim=headdim,
        ngroups=ngroups, norm_before_gate=norm_before_gate)
    ref_args = {k: v.detach().double().requires_grad_() if v is not None else None for k, v in args.items()}
    ref_out, ref_final = split_conv1d_scan_reference(**ref_args, headdim=headdim, ngroups=ngroups,
                                                     norm_before_gate=norm_before_gate)
    torch.testing.assert_close(out.double(), ref_out, **TOL)
    torch.testing.assert_close(final.double(), ref_final, **TOL)
    weight = torch.randn(out.shape, generator=g)
    (out * weight).sum().backward()
    (ref_out * weight.double()).sum().backward()
    for name, tensor in args.items():
        if tensor is not None:
            torch.testing.assert_close(tensor.grad.double(), ref_args[name].grad, **TOL, msg=lambda m: f"{name}: {m}")


def test_split_conv1d_scan_combined_rejects_bad_input():
    zxbcdt = torch.randn(1, 4, 2 * 8 + 2 * 4 + 2)
    with pytest.raises(ValueError, match="headdim"):
        compat.mamba_split_conv1d_scan_combined(zxbcdt, torch.randn(12, 4), None, torch.zeros(2), -torch.ones(2),
                                                torch.ones(2), 4)
    with pytest.raises(ValueError, match="zxbcdt"):
        compat.mamba_split_conv1d_scan_combined(zxbcdt[..., 1:], torch.randn(12, 4), None, torch.zeros(2),
                                                -torch.ones(2), torch.ones(2, 4), 4)
    with pytest.raises(NotImplementedError, match="state_dtype"):
        compat.mamba_split_conv1d_scan_combined(zxbcdt, torch.randn(12, 4), None, torch.zeros(2), -torch.ones(2),
                                                torch.ones(2, 4), 4, state_dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="bias"):
        compat.rmsnorm_fn(torch.randn(2, 8), torch.ones(8), torch.zeros(8))
