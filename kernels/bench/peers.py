"""--peers: our torch paths next to the pure-PyTorch peers, in one process.

- selective scan: ours (backend torch) vs mambapy's parallel scan vs a minimal sequential loop;
- SSD core (no D, z, dt_bias): ours (backend torch) vs the Mamba-2 paper's minimal chunked SSD
  (kernels.ssd.reference.ssd_minimal_discrete) vs a minimal sequential loop;
- modules: our Mamba / Mamba2 (backend torch) vs transformers' MambaMixer (sequential loop, and its mambapy
  option) / Mamba2Mixer (its torch chunked path), with the same weights.
Candidates are interleaved (one call of each per round, medians over rounds) so that load from other
processes hits all of them alike. Errors are against a float64 run of the minimal loop (ops) or of
transformers' module (modules). mambapy and transformers are optional: rows say so when absent.
A scaling table fits time = c * L^k per implementation over the lengths run.
"""
from __future__ import annotations

import math
import statistics

import torch
import torch.nn.functional as F

from .. import mamba_chunk_scan_combined, selective_scan_fn
from ..ssd.reference import ssd_minimal_discrete
from . import common
from .common import print_table, rel_err, saved_for_backward_mib
from .ops import mambapy_scan, scan_inputs


def interleaved_ms(fns: dict, rounds: int) -> dict:
    """Median ms per candidate, one call of each per round (after one warm-up call each), timed with
    common.clock (wall or this process's CPU time), the garbage collector paused (common.gc_paused)."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    with common.gc_paused():
        for _ in range(rounds):
            for k, fn in fns.items():
                t = common.clock()
                fn()
                times[k].append(1000 * (common.clock() - t))
    return {k: statistics.median(v) for k, v in times.items()}


def fitted_exponent(lengths, times) -> float:
    """Least-squares slope of log(time) against log(L)."""
    xs, ys = [math.log(x) for x in lengths], [math.log(t) for t in times]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def minimal_scan_loop(u, delta, A, B, C, D, z, delta_bias):
    """Mamba-1, one time step per loop step, written as plainly as possible."""
    dt = F.softplus(delta + delta_bias[:, None])
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for dt_t, u_t, B_t, C_t in zip(dt.unbind(-1), u.unbind(-1), B.unbind(-1), C.unbind(-1)):
        h = torch.exp(dt_t[..., None] * A) * h + (dt_t * u_t)[..., None] * B_t[:, None]
        ys.append((h * C_t[:, None]).sum(-1))
    return (torch.stack(ys, -1) + D[:, None] * u) * F.silu(z)


def minimal_ssd_loop(x, dt, A, B, C):
    """Mamba-2 SSD without options, one step per loop step; B, C (b, L, heads, N)."""
    h = x.new_zeros(x.shape[0], x.shape[2], x.shape[3], B.shape[-1])
    ys = []
    for x_t, dt_t, B_t, C_t in zip(x.unbind(1), dt.unbind(1), B.unbind(1), C.unbind(1)):
        h = torch.exp(dt_t * A)[..., None, None] * h + (dt_t[..., None] * x_t)[..., None] * B_t[:, :, None]
        ys.append((h * C_t[:, :, None]).sum(-1))
    return torch.stack(ys, 1)


def _run_case(title, impls, inputs, grad_keys, reference_fn, rounds, extra=None):
    """Rows for one shape: fwd and fwd+bwd medians (interleaved), saved MiB, errors vs float64."""
    leaves = {name: {k: v.detach().clone().requires_grad_(k in grad_keys) for k, v in inputs.items()}
              for name in impls}
    with torch.no_grad():
        shape = next(iter(impls.values()))(**inputs).shape
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    ref_leaves = {k: v.detach().double().requires_grad_(k in grad_keys) for k, v in inputs.items()}
    ref_out = reference_fn(**ref_leaves)
    ref_out.backward(w.double())

    def fwd(name):
        return lambda: impls[name](**inputs)

    def fwd_bwd(name):
        def run():
            out = impls[name](**leaves[name])
            out.backward(w)
            for v in leaves[name].values():
                v.grad = None
        return run
    with torch.no_grad():
        f = interleaved_ms({k: fwd(k) for k in impls}, rounds)
    fb = interleaved_ms({k: fwd_bwd(k) for k in impls}, rounds)
    rows = []
    for name, impl in impls.items():
        out = impl(**leaves[name])
        out.backward(w)
        grad_err = max(rel_err(leaves[name][k].grad, ref_leaves[k].grad) for k in grad_keys)
        for v in leaves[name].values():
            v.grad = None
        rows.append(dict(case=title, impl=name, fwd_ms=f[name], fwdbwd_ms=fb[name], fwd_err=rel_err(out, ref_out),
                         grad_err=grad_err, saved_mib=saved_for_backward_mib(lambda: impl(**leaves[name])),
                         **(extra or {})))
    ours = rows[0]
    for r in rows:
        r["fwd_ratio_ours"] = ours["fwd_ms"] / r["fwd_ms"]
        r["fwdbwd_ratio_ours"] = ours["fwdbwd_ms"] / r["fwdbwd_ms"]
    return rows


PEER_COLUMNS = [("impl", "impl", "s"), ("fwd ms", "fwd_ms", ".2f"), ("fwd+bwd ms", "fwdbwd_ms", ".2f"),
                ("ours/peer fwd", "fwd_ratio_ours", ".2f"), ("ours/peer fwd+bwd", "fwdbwd_ratio_ours", ".2f"),
                ("fwd err", "fwd_err", ".1e"), ("grad err", "grad_err", ".1e"), ("saved MiB", "saved_mib", ".1f")]


def scan_peer_rows(batch, dim, N, lengths, rounds, loop_max_len):
    try:
        import mambapy.pscan  # noqa: F401
        has_mambapy = True
    except ImportError:
        has_mambapy = False
    rows = []
    for L in lengths:
        impls = {"ours torch": lambda **kw: selective_scan_fn(**kw, delta_softplus=True, backend="torch")}
        if has_mambapy:
            impls["mambapy pscan"] = mambapy_scan
        if L <= loop_max_len:
            impls["minimal loop"] = minimal_scan_loop
        inp = scan_inputs(batch, dim, L, N, torch.float32, torch.device("cpu"))
        r = _run_case(f"scan {batch}x{dim}x{L}x{N}", impls, inp, tuple(inp), minimal_scan_loop, rounds,
                      dict(op="selective_scan", L=L))
        print_table(f"selective_scan (batch, dim, L, N) = ({batch}, {dim}, {L}, {N}), fp32"
                    + ("" if has_mambapy else " (mambapy not installed)"), r, PEER_COLUMNS)
        rows += r
    return rows


def ssd_core_inputs(batch, L, H, P, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(x=r(batch, L, H, P), dt=F.softplus(r(batch, L, H)), A=-(torch.rand(H, generator=g) + 0.5),
                B=r(batch, L, H, N), C=r(batch, L, H, N))


def ssd_peer_rows(batch, H, P, N, chunk, lengths, rounds, loop_max_len):
    def minimal(x, dt, A, B, C):
        return ssd_minimal_discrete(x * dt[..., None], A * dt, B, C, chunk)[0]
    rows = []
    for L in lengths:
        impls = {"ours torch": lambda **kw: mamba_chunk_scan_combined(**kw, chunk_size=chunk, backend="torch"),
                 "ssd_minimal (paper)": minimal}
        if L <= loop_max_len:
            impls["minimal loop"] = minimal_ssd_loop
        inp = ssd_core_inputs(batch, L, H, P, N)
        r = _run_case(f"ssd {batch}x{L}x{H}x{P}x{N} chunk {chunk}", impls, inp, tuple(inp), minimal_ssd_loop, rounds,
                      dict(op="ssd", L=L))
        print_table(f"SSD core (batch, L, heads, headdim, N) = ({batch}, {L}, {H}, {P}, {N}), chunk {chunk}, fp32", r,
                    PEER_COLUMNS)
        rows += r
    return rows


def module_pairs(kind, d_model):
    """(ours, [(name, transformers module)], float64 reference module), same weights; None without
    transformers."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return None
    from .. import Mamba, Mamba2
    torch.manual_seed(0)
    if kind == "mamba":
        from transformers.models.mamba.modeling_mamba import MambaConfig, MambaMixer
        ours = Mamba(d_model, d_state=16, d_conv=4, expand=2, backend="torch")
        config = lambda mambapy: MambaConfig(hidden_size=d_model, state_size=16, conv_kernel=4, expand=2,  # noqa: E731
                                             use_bias=False, use_conv_bias=True, use_mambapy=mambapy)
        peers = [(f"transformers MambaMixer ({'mambapy' if m else 'loop'})", MambaMixer(config(m), layer_idx=0))
                 for m in (False, True)]
        reference = MambaMixer(config(False), layer_idx=0)
    else:
        from transformers.models.mamba2.modeling_mamba2 import Mamba2Config, Mamba2Mixer
        ours = Mamba2(d_model, d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1, chunk_size=256, backend="torch")
        cfg = Mamba2Config(hidden_size=d_model, state_size=128, conv_kernel=4, expand=2, head_dim=64,
                           num_heads=2 * d_model // 64, n_groups=1, chunk_size=256, use_bias=False, use_conv_bias=True)
        peers = [("transformers Mamba2Mixer (torch)", Mamba2Mixer(cfg, layer_idx=0))]
        reference = Mamba2Mixer(cfg, layer_idx=0)
    state = ours.state_dict()
    for _, m in peers + [("reference", reference)]:
        m.load_state_dict(state, strict=True)
    return ours, peers, reference.double()


def module_peer_rows(kind, d_models, lengths, rounds, loop_train_max_len=256):
    rows = []
    for d_model in d_models:
        pairs = module_pairs(kind, d_model)
        if pairs is None:
            print(f"\n## {kind} modules: transformers not installed, skipped")
            return rows
        ours, peers, reference = pairs
        modules = {f"ours {type(ours).__name__} (torch)": ours, **dict(peers)}
        for L in lengths:
            hidden = torch.randn(1, L, d_model, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                ref_out = reference(hidden.double())
            with torch.no_grad():
                f = interleaved_ms({k: (lambda m=m: m(hidden)) for k, m in modules.items()}, rounds)

            def train_step(m):
                def run():
                    m(hidden).square().mean().backward()
                    m.zero_grad(set_to_none=True)
                return run
            # transformers' sequential loop indexes the time axis inside autograd: its backward is quadratic
            # in L (33 s per step at d_model 256, L 1024 here), so it is trained only up to loop_train_max_len
            trained = {k: m for k, m in modules.items() if "loop" not in k or L <= loop_train_max_len}
            fb = interleaved_ms({k: train_step(m) for k, m in trained.items()}, rounds)
            case = []
            for name, m in modules.items():
                with torch.no_grad():
                    err = rel_err(m(hidden), ref_out)
                case.append(dict(op=f"{kind} module", case=f"{kind} d_model {d_model} L {L}", L=L, d_model=d_model,
                                 impl=name, fwd_ms=f[name], fwdbwd_ms=fb.get(name), fwd_err=err,
                                 saved_mib=saved_for_backward_mib(lambda m=m: m(hidden))))
            for r in case:
                r["fwd_ratio_ours"] = case[0]["fwd_ms"] / r["fwd_ms"]
                r["fwdbwd_ratio_ours"] = case[0]["fwdbwd_ms"] / r["fwdbwd_ms"] if r["fwdbwd_ms"] else None
            print_table(f"{kind} module, batch 1, d_model {d_model}, L {L}, fp32 (fwd+bwd: mean-square loss)", case,
                        [c for c in PEER_COLUMNS if c[1] != "grad_err"])
            rows += case
    return rows


def _joined(rows, key):
    return ", ".join(format(r[key], ".1f") if r[key] else "-" for r in rows)


def print_scaling(rows):
    """Per op/case family and impl: time at each L and the fitted exponent k in time ~ L^k."""
    groups = {}
    for r in rows:
        key = (r["op"] + (f" d_model {r['d_model']}" if "d_model" in r else ""), r["impl"])
        groups.setdefault(key, []).append(r)
    print("\n## Scaling: time vs L, fitted exponent k in time ~ L^k")
    print("| op | impl | L | fwd ms | fwd+bwd ms | k fwd | k fwd+bwd |")
    print("|---|---|---|---|---|---|---|")
    out = []
    for (op, impl), rs in groups.items():
        if len(rs) < 2:
            continue
        Ls = [r["L"] for r in rs]
        kf = fitted_exponent(Ls, [r["fwd_ms"] for r in rs])
        trained = [r for r in rs if r["fwdbwd_ms"]]
        kfb = (fitted_exponent([r["L"] for r in trained], [r["fwdbwd_ms"] for r in trained]) if len(trained) > 1
               else None)
        kfb_text = "-" if kfb is None else format(kfb, ".2f")
        print(f"| {op} | {impl} | {', '.join(map(str, Ls))} | {_joined(rs, 'fwd_ms')} | {_joined(rs, 'fwdbwd_ms')} | "
              f"{kf:.2f} | {kfb_text} |")
        out.append(dict(op=op, impl=impl, lengths=Ls, k_fwd=kf, k_fwdbwd=kfb))
    return out
