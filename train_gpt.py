"""The NanoGPT speedrun GPT (modded-nanogpt record-21 architecture and recipe), in one file.

    torchrun --standalone --nproc_per_node=8 train_gpt.py                 # speedrun preset on FineWeb
    torchrun --standalone --nproc_per_node=1 train_gpt.py --preset=cpu     # small model, demo corpus, CPU
    python train_gpt.py --preset=cpu --num_iterations=50 --run_name=try1   # any field of Hyperparameters

    python train_gpt.py --preset=cpu --runs=3 --seed=0                    # 3 seeds back to back, then stats
    python train_gpt.py --preset=cpu_mamba2 --save_checkpoint=final       # Mamba2 LM (--mixer, --mixer_pattern)
    python train_gpt.py --resume=records/RUN                              # continue a checkpointed run
    python generate.py records/RUN --prompt "The devil is"                # complete text with its checkpoint

Sections: 1 hyperparameters and command line; 2 Muon; 3 model (attention masks, FP8 head, MoT, Mamba mixers,
one-token decoding); 4 data; 5 records and checkpoints; 6 training.
"""
from __future__ import annotations

import os

# read when CUDA initialises, so set before anything touches it (record 21 sets it too)
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import copy  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

REPO_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO_DIR))
from data.shards import EOT_ID, ShardError, check_shard, read_shard, shard_files  # noqa: E402

# -----------------------------------------------------------------------------
# 1. Hyperparameters and command line


@dataclass
class Hyperparameters:
    run_name: str = "baseline"          # records are grouped by this name in summaries
    preset: str = "auto"                # auto = speedrun on CUDA, cpu otherwise (see PRESETS)
    # data
    train_files: str = "data/fineweb10B/fineweb_train_*.bin"
    val_files: str = "data/fineweb10B/fineweb_val_*.bin"
    val_tokens: int = 10485760          # first N val tokens, as in the speedrun
    train_seq_len: int = 48 * 1024      # tokens per slice (one GPU, one micro-step)
    val_seq_len: int = 4 * 64 * 1024
    batch_slices: int = 8               # slices per optimizer step; grad_accum = batch_slices // world_size
    # schedule
    num_iterations: int = 1770
    cooldown_frac: float = 0.4          # lr 1.0 for the first 60%, then linear to 0.1
    val_loss_every: int = 125           # 0: only at the end
    warmup_steps: int = 10              # untimed kernel warm-up steps; model/optimizer restored after
    # model
    vocab_size: int = 50257
    num_layers: int = 12
    num_heads: int = 6
    head_dim: int = 128
    model_dim: int = 768
    no_attn_layers: str = "7"           # comma-separated layer indices without attention
    window_pattern: str = "LSSSLSSLSSSL"  # per layer: L = long window, S = short (half) window
    window_max_tokens: int = 1728       # window warms up 128 -> next_multiple(1728, 128) = 1792 tokens
    block_size: int = 128               # attention mask block size (tokens)
    attn_scale: float = 0.12
    loss_chunk: int = 0                 # >0: head + softcap + loss over this many tokens at a time (CPU:
                                        # keeps each logits buffer under malloc's mmap threshold)
    # mixture of tokenizers: each token also enters as its UTF-8 bytes (section 3b)
    mot: str = "none"                   # none | cross | cross+attn | cross+mamba | cross+mamba2
    chars_per_token: int = 16           # bytes per token slot (left-aligned, PAD after, truncated beyond)
    char_dim: int = 128
    char_window_tokens: int = 4         # cross+attn: a char sees the chars of this many tokens (its own incl.)
    char_heads: int = 2
    cross_heads: int = 4
    cross_prev_tokens: int = 0          # cross-attention also reads this many previous tokens' chars
    mot_lr: float = 0.008               # Adam lr for MoT matrices (char embedding uses embed_lr)
    char_mamba_lr: float = 0.001        # Adam lr for the char Mamba's matrices: at mot_lr its B/C projections
                                        # grew 7x in 6 steps and the loss spiked (devlog)
    # sequence mixers (section 3c): attention, Mamba or Mamba2 per layer
    mixer: str = "attention"            # attention | mamba | mamba2, for every layer
    mixer_pattern: str = ""             # one letter per layer, overrides --mixer: A attention, M Mamba, 2 Mamba2,
                                        # - none; --no_attn_layers turns listed A layers into -
    mamba_d_state: int = 16             # Mamba (selective scan) state size
    mamba2_d_state: int = 64            # Mamba2 (SSD) state size
    mamba_expand: int = 2               # inner width = expand * model_dim (Mamba and Mamba2)
    mamba2_headdim: int = 64
    mamba2_chunk_size: int = 256
    mamba_lr: float = 0.004             # Adam lr for the Mamba layers' A_log, D, dt (bias, Mamba's dt_proj) and
                                        # conv weights; their in/out (and Mamba's x) projections train with Muon
    # optimizers
    head_lr: float = 0.22 / 768 ** 0.5
    embed_lr: float = 0.6
    scalar_lr: float = 0.04
    muon_lr: float = 0.05
    muon_momentum_start: float = 0.85
    muon_momentum_end: float = 0.95
    muon_momentum_warmup: int = 300
    # system
    attention: str = "auto"             # flex | sdpa (dense mask); auto = flex on CUDA, sdpa on CPU
    compile: str = "auto"               # on | off; auto = on for CUDA
    fp8_head: str = "auto"              # on | off; auto = on for Hopper (sm90+)
    dtype: str = "auto"                 # bfloat16 | float32 activations; auto = bf16 on CUDA, fp32 on CPU
    seed: int = -1                      # -1: unseeded, as upstream
    sync_every_step: bool = False       # True: a device sync after every step (slower; CUDA events time
                                        # each step without it)
    records_dir: str = "records"
    save_record: bool = True
    runs: int = 1                       # >1: this many seeds back to back (seed, seed+1, ...), then statistics
    target_loss: float = 3.28           # --runs: one-sided t-test that the mean final val loss is below this
    # checkpoints (section 6b)
    save_checkpoint: str = "off"        # off | final | every_N: RECORD/checkpoint.pt (model, optimizers, loader
                                        # position, RNG) after the last step, or every N steps and the last
    resume: str = ""                    # checkpoint.pt or its record folder: continue that run (its
                                        # hyperparameters, overridden by the flags given with --resume)


PRESETS = {
    "speedrun": {},
    # 8 GPU speedrun batch on a smaller card: same tokens per step, shorter slices, more accumulation
    "speedrun_24k": dict(train_seq_len=24 * 1024, batch_slices=16, val_seq_len=64 * 1024),
    # A few minutes on a 2-core CPU, on the demo corpus that ships in data/.
    "cpu": dict(
        train_files="data/devil_jargon/devil_jargon_train_*.bin",
        val_files="data/devil_jargon/devil_jargon_val_*.bin",
        num_iterations=150, val_loss_every=50, warmup_steps=0,
        val_tokens=8192, train_seq_len=512, val_seq_len=1024, batch_slices=2,
        num_layers=12, num_heads=2, head_dim=64, model_dim=128, window_max_tokens=448,
        head_lr=0.22 / 128 ** 0.5, loss_chunk=128,
    ),
}
# The cpu preset with Mamba2 in every layer (d_state 32, 8 heads of 32 at expand 2; 64-token chunks)
PRESETS["cpu_mamba2"] = dict(PRESETS["cpu"], mixer="mamba2", mamba2_d_state=32, mamba2_headdim=32,
                             mamba2_chunk_size=64)
# The cpu preset as a hybrid: Mamba2 everywhere but two attention layers (one per U-net half)
PRESETS["cpu_hybrid"] = dict(PRESETS["cpu_mamba2"], mixer_pattern="22A2222222A2", no_attn_layers="")
EMBEDDED_TRAIN = "data/devil_jargon/devil_jargon_train_*.bin"
MOT_VARIANTS = ("none", "cross", "cross+attn", "cross+mamba", "cross+mamba2")


def parse_value(text: str, typ):
    if typ is bool or typ == "bool":
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    return {"int": int, "float": float, "str": str}.get(typ, typ)(text) if isinstance(typ, str) else typ(text)


def parse_args(argv: list[str], cuda: bool) -> Hyperparameters:
    """`--key=value` or `--key value` for any Hyperparameters field; the preset applies first."""
    known = {f.name: f for f in fields(Hyperparameters)}
    pairs = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise SystemExit(f"unexpected argument {arg!r}: use --key=value (keys: {', '.join(known)})")
        key, eq, val = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                nxt = f"; the next argument {argv[i + 1]!r} is a flag" if i + 1 < len(argv) else ""
                raise SystemExit(f"--{key} needs a value (--{key}=VALUE){nxt}")
            val, i = argv[i + 1], i + 1
        if key not in known:
            raise SystemExit(f"unknown hyperparameter --{key}; known: {', '.join(known)}")
        try:
            pairs[key] = parse_value(val, known[key].type)
        except ValueError as e:
            raise SystemExit(f"--{key}: {e}")
        i += 1
    resumed = {}
    if pairs.get("resume"):  # the checkpoint's hyperparameters, then the flags given with --resume
        try:
            resumed = checkpoint_hyperparameters(load_checkpoint(pairs["resume"]))
        except CheckpointError as e:
            raise SystemExit(f"--resume: {e}")
        resumed.pop("runs")  # a checkpoint is one run of a --runs series (its seed saved): resume that run only
    preset = pairs.get("preset", resumed.get("preset", "auto"))
    if preset == "auto":
        preset = "speedrun" if cuda else "cpu"
    if preset not in PRESETS:
        raise SystemExit(f"--preset must be one of auto, {', '.join(PRESETS)}; got {preset!r}")
    args = Hyperparameters(**{**PRESETS[preset], **resumed, **pairs, "preset": preset})
    validate_args(args)
    return args


# (lower, upper) bounds per numeric flag; None = unbounded on that side
BOUNDS = dict(
    val_tokens=(1, None), train_seq_len=(1, None), val_seq_len=(1, None), batch_slices=(1, None),
    num_iterations=(1, None), cooldown_frac=(0.0, 1.0), val_loss_every=(0, None), warmup_steps=(0, None),
    vocab_size=(EOT_ID + 1, 2 ** 16), num_layers=(6, None), num_heads=(1, None), head_dim=(4, None),
    model_dim=(1, None), window_max_tokens=(1, None), block_size=(1, None), attn_scale=(0.0, None),
    loss_chunk=(0, None), chars_per_token=(1, 128), char_dim=(1, None), char_window_tokens=(1, None),
    char_heads=(1, None), cross_heads=(1, None), cross_prev_tokens=(0, None), mot_lr=(0.0, None), char_mamba_lr=(0.0, None),
    head_lr=(0.0, None), embed_lr=(0.0, None), scalar_lr=(0.0, None), muon_lr=(0.0, None),
    muon_momentum_start=(0.0, 1.0), muon_momentum_end=(0.0, 1.0), muon_momentum_warmup=(0, None),
    seed=(-1, None), runs=(1, None), mamba_d_state=(1, None), mamba2_d_state=(1, None), mamba_expand=(1, None),
    mamba2_headdim=(1, None), mamba2_chunk_size=(1, None), mamba_lr=(0.0, None),
)
CHOICES = dict(attention=("auto", "flex", "sdpa"), compile=("auto", "on", "off"), fp8_head=("auto", "on", "off"),
               dtype=("auto", "bfloat16", "float32"), mot=MOT_VARIANTS,
               mixer=("attention", "mamba", "mamba2"))


def validate_args(a: Hyperparameters):
    """Every flag checked before anything is built or written; the message names the flag and the range."""
    def need(cond, msg):
        if not cond:
            raise SystemExit(f"bad hyperparameters: {msg}")
    for key, (low, high) in BOUNDS.items():
        v = getattr(a, key)
        need(math.isfinite(v), f"--{key} must be a finite number, got {v}")
        need((low is None or v >= low) and (high is None or v <= high),
             f"--{key} must be in [{low}, {'inf' if high is None else high}], got {v}")
    for key, allowed in CHOICES.items():
        need(getattr(a, key) in allowed, f"--{key} must be one of {', '.join(allowed)}, got {getattr(a, key)!r}")
    for key in ("run_name", "train_files", "val_files", "records_dir"):
        need(getattr(a, key).strip() != "", f"--{key} must not be empty")
    need(math.isfinite(a.target_loss), f"--target_loss must be a finite number, got {a.target_loss}")
    need(a.num_layers % 2 == 0, f"--num_layers must be even (U-net skips pair layer i with L-1-i), got {a.num_layers}")
    need(len(a.window_pattern) == a.num_layers and set(a.window_pattern) <= {"L", "S"},
         f"--window_pattern must have one L/S per layer ({a.num_layers}), got {a.window_pattern!r}")
    need(a.train_seq_len % a.block_size == 0 and a.val_seq_len % a.block_size == 0,
         f"--train_seq_len ({a.train_seq_len}) and --val_seq_len ({a.val_seq_len}) must be multiples of "
         f"--block_size ({a.block_size})")
    need(a.head_dim % 4 == 0, f"--head_dim must be a multiple of 4 (half-truncated rotary), got {a.head_dim}")
    need(a.val_tokens % a.val_seq_len == 0,
         f"--val_tokens ({a.val_tokens}) must be a multiple of --val_seq_len ({a.val_seq_len})")
    layers = [s.strip() for s in a.no_attn_layers.split(",") if s.strip()]
    need(all(s.isdigit() and int(s) < a.num_layers for s in layers),
         f"--no_attn_layers must be comma-separated layer indices in [0, {a.num_layers}), got {a.no_attn_layers!r}")
    need(a.mixer_pattern == "" or (len(a.mixer_pattern) == a.num_layers and set(a.mixer_pattern) <= set("AM2-")),
         f"--mixer_pattern must be empty or one of A (attention), M (Mamba), 2 (Mamba2), - (none) per layer "
         f"({a.num_layers}), got {a.mixer_pattern!r}")
    if "2" in layer_mixers(a):
        need(a.mamba_expand * a.model_dim % a.mamba2_headdim == 0,
             f"--mamba2_headdim ({a.mamba2_headdim}) must divide --mamba_expand * --model_dim "
             f"({a.mamba_expand * a.model_dim})")
    need(checkpoint_every(a.save_checkpoint) is not None,
         f"--save_checkpoint must be off, final or every_N (N >= 1), got {a.save_checkpoint!r}")
    if a.mot != "none":
        need(a.char_dim % a.char_heads == 0 and a.char_dim % a.cross_heads == 0,
             f"--char_dim ({a.char_dim}) must be divisible by --char_heads ({a.char_heads}) and "
             f"--cross_heads ({a.cross_heads})")


def no_attn_set(a: Hyperparameters) -> set[int]:
    return {int(s) for s in a.no_attn_layers.split(",") if s.strip()}


MIXER_LETTERS = dict(attention="A", mamba="M", mamba2="2")


def layer_mixers(a: Hyperparameters) -> str:
    """One letter per layer: A attention, M Mamba, 2 Mamba2, - no sequence mixer (the MLP only). --mixer_pattern
    if given, else --mixer for every layer; --no_attn_layers turns the listed attention layers into -."""
    pattern = a.mixer_pattern or MIXER_LETTERS[a.mixer] * a.num_layers
    return "".join("-" if c == "A" and i in no_attn_set(a) else c for i, c in enumerate(pattern))


def checkpoint_every(flag: str) -> int | None:
    """--save_checkpoint as a step interval: 0 = only after the last step, -1 = never, None = malformed."""
    if flag in ("off", "final"):
        return -1 if flag == "off" else 0
    n = flag.removeprefix("every_")
    return int(n) if flag.startswith("every_") and n.isdigit() and int(n) >= 1 else None


def next_multiple_of_n(v: float, n: int) -> int:
    return max(n, math.ceil(v / n) * n)


# -----------------------------------------------------------------------------
# 2. Muon: momentum, then orthogonalise the update with a Newton-Schulz iteration


def zeropower_via_newtonschulz5(G: Tensor, steps: int = 5) -> Tensor:
    """Approximately U V^T of G = U S V^T (batched over leading dims), in bf16. The quintic's
    coefficients maximise the slope at zero; the result has singular values in about [0.7, 1.2]."""
    assert G.ndim >= 2
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.bfloat16()
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if transposed else X


class Muon(torch.optim.Optimizer):
    """Nesterov momentum + Newton-Schulz orthogonalisation for 2-D (or stacked 2-D) weights.
    With several ranks each orthogonalises every world_size-th matrix of a same-shape group and the bf16
    updates are all-gathered into one buffer, asynchronously: the exchange of one round of matrices
    overlaps the orthogonalisation of the next (as record 21). `orthogonalise` is
    zeropower_via_newtonschulz5, compiled on CUDA by the caller."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, rank=0, world_size=1,
                 orthogonalise=zeropower_via_newtonschulz5):
        params = list(params)
        shapes = []
        for p in params:
            if p.shape not in shapes:
                shapes.append(p.shape)
        groups = [dict(params=[p for p in params if p.shape == s]) for s in shapes]
        super().__init__(groups, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))
        self.rank, self.world_size, self.orthogonalise = rank, world_size, orthogonalise

    def _update(self, p: Tensor, group: dict) -> Tensor:
        g = p.grad
        assert g is not None, "Muon parameter without a gradient"
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(g)
        buf = state["momentum_buffer"]
        buf.lerp_(g, 1 - group["momentum"])
        g = g.lerp(buf, group["momentum"]) if group["nesterov"] else buf
        return self.orthogonalise(g, group["ns_steps"]).bfloat16()

    @torch.no_grad()
    def step(self):
        ws = self.world_size
        for group in self.param_groups:
            params = group["params"]
            pending = None  # (first index, gathered (ws, *shape) bf16 updates, async handle) of the last round

            def apply(first, gathered, handle):
                if handle is not None:
                    handle.wait()
                for j in range(min(ws, len(params) - first)):
                    p = params[first + j]
                    scale = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
                    p.add_(gathered[j].view_as(p), alpha=-group["lr"] * scale)

            for base in range(0, len(params), ws):
                mine = base + self.rank
                # a rank with no matrix left in this round sends zeros (all_gather needs every rank)
                update = (self._update(params[mine], group) if mine < len(params)
                          else torch.zeros_like(params[base], dtype=torch.bfloat16))
                if ws > 1:
                    # flat buffers: gloo accepts only a concatenation along dim 0, NCCL either
                    flat = update.new_empty(ws * update.numel())
                    handle = dist.all_gather_into_tensor(flat, update.flatten(), async_op=True)
                    gathered = flat.view(ws, *update.shape)
                else:
                    gathered, handle = update[None], None
                if pending is not None:
                    apply(*pending)
                pending = (base, gathered, handle)
            if pending is not None:
                apply(*pending)


# -----------------------------------------------------------------------------
# 3. Model


def norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


# --- FP8 head (Hopper): e4m3 inputs, e5m2 gradients, torch._scaled_mm, fixed scales --------------------
#
# A tensor is multiplied by its scale before the cast to fp8 and _scaled_mm divides it out. Record 21's
# scales (x_s = 2, w_s = 2**9, grad_s = 2**19) go with a mean loss over T = 49,152 tokens and no
# accumulation: the logit gradients are about (p - onehot) / T, so grad_s = 2**19 lifts them to
# (p - onehot) * 10.7, inside e5m2's normal range (2**-14 .. 57,344) for every p above ~5e-6.
# With T tokens per micro-step and grad_accum micro-steps the loss is divided by T * grad_accum, so
# grad_s grows by the same factor and every GPU count sees the same fp8 gradient values.

FP8_REFERENCE_TOKENS = 48 * 1024  # record 21: train_seq_len on each of 8 GPUs, grad_accum 1


def fp8_head_scales(tokens_per_micro_step: int, grad_accum: int) -> tuple[float, float, float]:
    """(x_s, w_s, grad_s) of record 21, grad_s rescaled to this run's loss normalisation."""
    return 2.0, 2.0 ** 9, 2.0 ** 19 * grad_accum * tokens_per_micro_step / FP8_REFERENCE_TOKENS


def _scale_tensor(s: float, like: Tensor) -> Tensor:
    # made on the device (a fill kernel, or a constant under torch.compile): no host-to-device copy
    return torch.full((), s, dtype=torch.float32, device=like.device)


def _fp8_forward_impl(x: Tensor, w: Tensor, x_s: float, w_s: float):
    x_f8 = x.mul(x_s).to(torch.float8_e4m3fn)
    w_f8 = w.mul(w_s).to(torch.float8_e4m3fn)
    out = torch._scaled_mm(x_f8, w_f8.T, out_dtype=torch.bfloat16, use_fast_accum=True,
                           scale_a=_scale_tensor(1 / x_s, x), scale_b=_scale_tensor(1 / w_s, x))
    return out, x_f8, w_f8


def _fp8_backward_impl(g: Tensor, x_f8: Tensor, w_f8: Tensor, x_s: float, w_s: float, grad_s: float):
    g_f8 = g.mul(grad_s).to(torch.float8_e5m2)
    # _scaled_mm wants its second operand column-major: .T.contiguous().T
    grad_x = torch._scaled_mm(g_f8, w_f8.T.contiguous().T, out_dtype=torch.bfloat16, use_fast_accum=False,
                              scale_a=_scale_tensor(1 / grad_s, g), scale_b=_scale_tensor(1 / w_s, g))
    # (in, out) row-major, returned transposed: the weight gradient has strides (1, out)
    grad_w = torch._scaled_mm(x_f8.T.contiguous(), g_f8.T.contiguous().T, out_dtype=torch.float32,
                              use_fast_accum=False, scale_a=_scale_tensor(1 / x_s, g),
                              scale_b=_scale_tensor(1 / grad_s, g)).T
    return grad_x, grad_w


# On CUDA the scale-and-cast is fused by torch.compile (eagerly, g.mul(grad_s) alone would materialise a
# (T, 50304) bf16 temporary, 4.9 GB at T = 49,152); on the CPU (tests) it runs eagerly.
_compiled_fp8 = {}


def _on_device(fn):
    def call(*args):
        if not args[0].is_cuda:
            return fn(*args)
        if fn not in _compiled_fp8:
            _compiled_fp8[fn] = torch.compile(fn, dynamic=False)
        return _compiled_fp8[fn](*args)
    return call


@torch.library.custom_op("nanogpt_mot::fp8_mm", mutates_args=())
def fp8_mm(x: Tensor, w: Tensor, x_s: float, w_s: float, grad_s: float) -> tuple[Tensor, Tensor, Tensor]:
    """x @ w.T with x, w in e4m3; returns the bf16 product and the fp8 copies (saved for backward)."""
    assert x.ndim == w.ndim == 2 and x.size(1) == w.size(1) and x.is_contiguous() and w.is_contiguous()
    return _on_device(_fp8_forward_impl)(x, w, x_s, w_s)


@fp8_mm.register_fake
def _(x, w, x_s, w_s, grad_s):
    return (x.new_empty(x.size(0), w.size(0), dtype=torch.bfloat16),
            x.new_empty(x.shape, dtype=torch.float8_e4m3fn), w.new_empty(w.shape, dtype=torch.float8_e4m3fn))


@torch.library.custom_op("nanogpt_mot::fp8_mm_backward", mutates_args=())
def fp8_mm_backward(g: Tensor, x_f8: Tensor, w_f8: Tensor, x_s: float, w_s: float, grad_s: float) -> tuple[Tensor, Tensor]:
    """Gradients through e5m2: dx = g @ w (bf16), dw = g.T @ x (fp32, for the optimizer)."""
    return _on_device(_fp8_backward_impl)(g, x_f8, w_f8, x_s, w_s, grad_s)


@fp8_mm_backward.register_fake
def _(g, x_f8, w_f8, x_s, w_s, grad_s):
    # the strides the real op returns: grad_x row-major, grad_w the transpose of an (in, out) matrix
    grad_x = g.new_empty(g.size(0), w_f8.size(1), dtype=torch.bfloat16)
    grad_w = g.new_empty(w_f8.size(1), w_f8.size(0), dtype=torch.float32).T
    return grad_x, grad_w


def _fp8_backward(ctx, grad_out, *_):
    x_f8, w_f8 = ctx.saved_tensors
    grad_x, grad_w = torch.ops.nanogpt_mot.fp8_mm_backward(grad_out.contiguous(), x_f8, w_f8, *ctx.scales)
    return grad_x, grad_w, None, None, None


def _fp8_setup(ctx, inputs, output):
    *_, x_s, w_s, grad_s = inputs
    _, x_f8, w_f8 = output
    ctx.scales = (x_s, w_s, grad_s)
    ctx.save_for_backward(x_f8, w_f8)


fp8_mm.register_autograd(_fp8_backward, setup_context=_fp8_setup)


class CastedLinear(nn.Linear):
    """fp32 master weight, cast to the activation dtype per matmul; optional FP8 matmul (Hopper)."""

    def __init__(self, in_features, out_features, use_fp8=False, x_s=1.0, w_s=1.0, grad_s=1.0):
        super().__init__(in_features, out_features, bias=False)
        self.use_fp8, self.x_s, self.w_s, self.grad_s = use_fp8, x_s, w_s, grad_s

    def reset_parameters(self):
        bound = 3 ** 0.5 * 0.5 * self.in_features ** -0.5  # uniform with std 0.5/sqrt(in)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_fp8 and self.training:
            flat = x.flatten(0, -2).contiguous()
            out = torch.ops.nanogpt_mot.fp8_mm(flat, self.weight, self.x_s, self.w_s, self.grad_s)[0]
            return out.reshape(*x.shape[:-1], -1)
        return F.linear(x, self.weight.type_as(x))


class Rotary(nn.Module):
    """Rotary embedding on half the dims: head_dim/4 frequencies (base 1024) + head_dim/4 zeros, so half
    of each head is position-free. Rotates the two halves of the head (not interleaved pairs)."""

    def __init__(self, head_dim: int, max_seq_len: int):
        super().__init__()
        freqs = (1 / 1024) ** torch.linspace(0, 1, steps=head_dim // 4, dtype=torch.float32)
        self.register_buffer("freqs", torch.cat([freqs, freqs.new_zeros(head_dim // 4)]), persistent=False)
        self.extend(max_seq_len)

    def extend(self, max_seq_len: int):
        """(Re)build the cos/sin tables for positions 0 .. max_seq_len-1 (generation past the training length)."""
        theta = torch.outer(torch.arange(max_seq_len, dtype=torch.float32, device=self.freqs.device), self.freqs)
        self.register_buffer("cos", theta.cos(), persistent=False)
        self.register_buffer("sin", theta.sin(), persistent=False)

    def forward(self, x: Tensor, start: int = 0) -> Tensor:  # x: (B, T, H, D) at positions start .. start+T-1
        end = start + x.size(-3)
        assert self.cos.size(0) >= end, f"position {end - 1} beyond the rotary table ({self.cos.size(0)})"
        cos, sin = self.cos[None, start:end, None, :], self.sin[None, start:end, None, :]
        x1, x2 = x.float().chunk(2, dim=-1)
        y1 = x1 * cos + x2 * sin
        y2 = -x1 * sin + x2 * cos
        return torch.cat((y1, y2), -1).type_as(x)


# --- attention masks: document-causal, sliding window counted in blocks of visible keys ---------------

def document_ids(input_seq: Tensor) -> Tensor:
    """Doc id per token: EOT (50256) starts a document, so it belongs to the document it opens."""
    return (input_seq == EOT_ID).cumsum(0)


def block_visibility(docs: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """(any, all) over (query block, key block): any = some query token may see some key token
    (causal and same document); all = every query token sees every key token."""
    nb = docs.numel() // block_size
    blocks = docs.view(nb, block_size)
    low, high = blocks[:, 0], blocks[:, -1]  # docs are non-decreasing
    idx = torch.arange(nb, device=docs.device)
    any_ = (idx[:, None] >= idx[None, :]) & (low[:, None] <= high[None, :]) & (high[:, None] >= low[None, :])
    all_ = (idx[:, None] > idx[None, :]) & (low[:, None] == high[None, :]) & (high[:, None] == low[None, :])
    return any_, all_


def windowed_blocks(any_: Tensor, window_blocks: Tensor) -> Tensor:
    """Keep, for each query block, its `window_blocks` most recent visible key blocks. The rank counts
    visible blocks at or after each key block, so the window spans visible blocks, not raw distance."""
    recency = any_.flip(-1).to(torch.int32).cumsum(-1).flip(-1)
    return any_ & (recency <= window_blocks)


def _ordered(mask: Tensor) -> tuple[Tensor, Tensor]:
    num = mask.sum(-1, dtype=torch.int32)
    # stable argsort on ~mask lists the selected key blocks first, in increasing order
    indices = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num[None, None].contiguous(), indices[None, None].contiguous()


def make_block_masks(input_seq: Tensor, window_blocks: Tensor, block_size: int):
    """Long (window_blocks) and short (window_blocks // 2) FlexAttention BlockMasks, built from block
    summaries only: O(num_blocks^2) work, never a token-level mask."""
    from torch.nn.attention.flex_attention import BlockMask

    docs = document_ids(input_seq)
    any_, all_ = block_visibility(docs, block_size)

    def build(w):
        kept = windowed_blocks(any_, w)

        # The window is in mask_mod too, so the mask is right wherever mask_mod is applied densely (eager
        # flex_attention on the CPU ignores the block lists). The GPU kernel evaluates mask_mod only on
        # partial blocks, so the extra lookup is nearly free.
        def document_causal_window(b, h, q_idx, kv_idx):
            return ((q_idx >= kv_idx) & (docs[q_idx] == docs[kv_idx])
                    & kept[q_idx // block_size, kv_idx // block_size])

        partial_num, partial_idx = _ordered(kept & ~all_)
        full_num, full_idx = _ordered(kept & all_)
        return BlockMask.from_kv_blocks(partial_num, partial_idx, full_num, full_idx,
                                        BLOCK_SIZE=block_size, mask_mod=document_causal_window)
    return build(window_blocks), build(torch.clamp_min(window_blocks // 2, 1))


def make_dense_masks(input_seq: Tensor, window_blocks: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """The same two masks as make_block_masks, as dense (T, T) booleans for scaled_dot_product_attention."""
    docs = document_ids(input_seq)
    any_, _ = block_visibility(docs, block_size)
    T = input_seq.numel()
    pos = torch.arange(T, device=input_seq.device)
    token_mask = (pos[:, None] >= pos[None, :]) & (docs[:, None] == docs[None, :])

    def build(w):
        kept = windowed_blocks(any_, w)
        return kept.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1) & token_mask
    return build(window_blocks), build(torch.clamp_min(window_blocks // 2, 1))


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, head_dim: int, max_seq_len: int, scale: float):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = num_heads, head_dim, scale
        hdim = num_heads * head_dim
        bound = 3 ** 0.5 * 0.5 * dim ** -0.5
        self.qkv_w = nn.Parameter(torch.empty(3, hdim, dim).uniform_(-bound, bound))  # merged Q, K, V
        self.lambdas = nn.Parameter(torch.tensor([0.5, 0.5]))  # value mixing: a*v + b*value_embedding
        self.rotary = Rotary(head_dim, max_seq_len)
        self.c_proj = CastedLinear(hdim, dim)
        self.c_proj.weight.detach().zero_()

    def qkv(self, x: Tensor, ve: Tensor | None, start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """Rotated q, k and mixed v, each (B, H, T, D), for the tokens at positions start .. start+T-1."""
        B, T = x.size(0), x.size(1)
        H, D = self.num_heads, self.head_dim
        q, k, v = F.linear(x, self.qkv_w.flatten(end_dim=1).type_as(x)).view(B, T, 3 * H, D).chunk(3, dim=-2)
        q, k = self.rotary(norm(q), start), self.rotary(norm(k), start)
        v = self.lambdas[0] * v + self.lambdas[1] * ve.view_as(v) if ve is not None else self.lambdas[0] * v
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def decode(self, x: Tensor, ve: Tensor | None, kv: tuple[Tensor, Tensor], pos: int, visible: Tensor) -> Tensor:
        """One token (1, 1, dim) at position pos: its key and value go into the cache kv (each (1, H, max_len, D)),
        the query reads the cached positions where visible (pos + 1,) is True."""
        q, k, v = self.qkv(x, ve, pos)
        keys, values = kv
        keys[:, :, pos], values[:, :, pos] = k[:, :, 0], v[:, :, 0]
        y = F.scaled_dot_product_attention(q, keys[:, :, :pos + 1], values[:, :, :pos + 1], attn_mask=visible[None, :],
                                           scale=self.scale)
        return self.c_proj(y.transpose(1, 2).reshape(1, 1, -1))

    def forward(self, x: Tensor, ve: Tensor | None, mask) -> Tensor:
        B, T = x.size(0), x.size(1)
        assert B == 1, "packed sequences: one row per rank (documents are separated by EOT)"
        H, D = self.num_heads, self.head_dim
        q, k, v = self.qkv(x, ve)  # (B, H, T, D)
        if isinstance(mask, Tensor):  # dense boolean mask: CPU path and reference
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        else:
            from torch.nn.attention.flex_attention import flex_attention
            y = flex_attention(q, k, v, block_mask=mask, scale=self.scale)
        y = y.transpose(1, 2).contiguous().view(B, T, H * D)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.c_fc = CastedLinear(dim, 4 * dim)
        self.c_proj = CastedLinear(4 * dim, dim)
        self.c_proj.weight.detach().zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


def make_ssm(a: Hyperparameters, kind: str, layer_idx: int) -> nn.Module:
    """A Mamba (kind M) or Mamba2 (kind 2) mixer from kernels/ (Triton on CUDA, PyTorch on the CPU); its output
    projection starts at zero, as every residual branch of the speedrun does."""
    import kernels
    if kind == "M":
        ssm = kernels.Mamba(a.model_dim, d_state=a.mamba_d_state, expand=a.mamba_expand, layer_idx=layer_idx)
    else:
        ssm = kernels.Mamba2(a.model_dim, d_state=a.mamba2_d_state, expand=a.mamba_expand, headdim=a.mamba2_headdim,
                             chunk_size=a.mamba2_chunk_size, layer_idx=layer_idx)
    ssm.out_proj.weight.detach().zero_()
    return ssm


class Block(nn.Module):
    """Sequence mixer (attention, Mamba, Mamba2 or none: layer_mixers) then MLP, each a pre-norm residual."""

    def __init__(self, a: Hyperparameters, layer_idx: int, max_seq_len: int):
        super().__init__()
        kind = layer_mixers(a)[layer_idx]
        self.attn = (CausalSelfAttention(a.model_dim, a.num_heads, a.head_dim, max_seq_len, a.attn_scale)
                     if kind == "A" else None)
        self.ssm = make_ssm(a, kind, layer_idx) if kind in ("M", "2") else None
        self.mlp = MLP(a.model_dim)
        self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0]))  # x = l0 * x + l1 * x0

    def run_ssm(self, h: Tensor, **kw) -> Tensor:
        # the Mamba weights stay fp32 (nn.Linear, no per-matmul cast), so bf16 activations are cast around them
        return self.ssm(h.to(self.ssm.in_proj.weight.dtype), **kw).to(h.dtype)

    def forward(self, x: Tensor, ve: Tensor | None, x0: Tensor, mask, seq_idx: Tensor | None = None) -> Tensor:
        x = self.lambdas[0] * x + self.lambdas[1] * x0
        if self.attn is not None:
            x = x + self.attn(norm(x), ve, mask)
        elif self.ssm is not None:
            x = x + self.run_ssm(norm(x), seq_idx=seq_idx)
        return x + self.mlp(norm(x))

    def decode(self, x: Tensor, ve: Tensor | None, x0: Tensor, cache, pos: int, visible: Tensor | None) -> Tensor:
        """forward for one token (1, 1, dim), reading and updating this layer's decoding cache."""
        x = self.lambdas[0] * x + self.lambdas[1] * x0
        if self.attn is not None:
            x = x + self.attn.decode(norm(x), ve, cache, pos, visible)
        elif self.ssm is not None:
            h = norm(x)
            x = x + self.ssm.step(h.to(self.ssm.in_proj.weight.dtype), *cache)[0].to(h.dtype)
        return x + self.mlp(norm(x))


# -----------------------------------------------------------------------------
# 3b. Mixture of tokenizers (MoT): every token also enters as its bytes
#
# Byte table: row t holds token t's raw UTF-8 bytes (tiktoken's decode_single_token_bytes, not decoded
# strings: partial UTF-8 tokens would all become U+FFFD), left-aligned, then PAD; tokens longer than
# chars_per_token keep their first bytes. Char ids: 0-255 bytes, 256 PAD, 257 EOS. <|endoftext|> is
# [EOS, PAD, ...]; the head-padding ids (50257..50303) never occur in data and are all PAD. The table is an
# integer buffer: .bfloat16() and friends leave it alone, so ids never round.

CHAR_PAD, CHAR_EOS, CHAR_VOCAB = 256, 257, 258


def build_byte_table(num_ids: int, chars_per_token: int, vocab_size: int = 50257) -> Tensor:
    from data.shards import gpt2_encoding
    enc = gpt2_encoding()
    table = torch.full((num_ids, chars_per_token), CHAR_PAD, dtype=torch.int16)
    for t in range(min(vocab_size, num_ids)):
        if t == EOT_ID:
            table[t, 0] = CHAR_EOS
            continue
        raw = enc.decode_single_token_bytes(t)[:chars_per_token]
        table[t, :len(raw)] = torch.tensor(list(raw), dtype=torch.int16)
    return table


def token_key_mask(token_docs: Tensor, char_ids: Tensor, window: int) -> Tensor:
    """(T, window*C): which chars of tokens t-window+1 .. t a query of token t may read: same document,
    not PAD. Key block j holds token t-window+1+j (see windowed_keys). O(T * window * C), never (T*C)^2."""
    T, C = char_ids.shape
    src = torch.arange(T, device=char_ids.device)[:, None] + torch.arange(1 - window, 1, device=char_ids.device)
    srcc = src.clamp_min(0)
    same_doc = (src >= 0) & (token_docs[srcc] == token_docs[:, None])  # (T, window)
    return (same_doc[:, :, None] & (char_ids[srcc] != CHAR_PAD)).reshape(T, window * C)


def char_window_mask(token_docs: Tensor, char_ids: Tensor, window: int) -> Tensor:
    """(T, C, window*C) mask of the windowed char self-attention: every char of token t sees the non-PAD
    chars of tokens t-window+1 .. t of its document (its own token's chars in full: they are all input at
    t). Each char also sees itself, so no row is empty."""
    T, C = char_ids.shape
    keys = token_key_mask(token_docs, char_ids, window)[:, None, :].expand(T, C, window * C).clone()
    own = torch.arange(C, device=char_ids.device)
    keys[:, own, (window - 1) * C + own] = True
    return keys


def windowed_keys(x: Tensor, window: int) -> Tensor:
    """(T, C, D) -> (T, window*C, D): for each token the chars of the `window` tokens ending at it
    (zeros before the sequence start; the mask hides them)."""
    T, C, D = x.shape
    padded = torch.cat([x.new_zeros(window - 1, C, D), x], 0)
    return padded.unfold(0, window, 1).permute(0, 3, 1, 2).reshape(T, window * C, D)


SDPA_MAX_BATCH = 65535  # grid limit of the memory-efficient SDPA kernel on the batch dimension


def batched_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """scaled_dot_product_attention with the batch (one entry per token: T of them, 262,144 at validation)
    split into pieces of at most SDPA_MAX_BATCH."""
    if q.size(0) <= SDPA_MAX_BATCH:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return torch.cat([F.scaled_dot_product_attention(q[s:s + SDPA_MAX_BATCH], k[s:s + SDPA_MAX_BATCH],
                                                     v[s:s + SDPA_MAX_BATCH], attn_mask=mask[s:s + SDPA_MAX_BATCH])
                      for s in range(0, q.size(0), SDPA_MAX_BATCH)])


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(T, S, heads*dh) -> (T, heads, S, dh): explicit, so a token's heads never mix with other tokens."""
    T, S, D = x.shape
    return x.view(T, S, heads, D // heads).transpose(1, 2)


class CharSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads, self.window = heads, window
        self.qkv = CastedLinear(dim, 3 * dim)
        self.proj = CastedLinear(dim, dim)
        self.proj.weight.detach().zero_()

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:  # x: (T, C, D), mask: (T, C, window*C)
        q, k, v = self.qkv(norm(x)).chunk(3, dim=-1)
        q, k = norm(q.unflatten(-1, (self.heads, -1))).flatten(-2), norm(k.unflatten(-1, (self.heads, -1))).flatten(-2)
        kw, vw = windowed_keys(k, self.window), windowed_keys(v, self.window)
        y = batched_sdpa(split_heads(q, self.heads), split_heads(kw, self.heads), split_heads(vw, self.heads),
                         mask[:, None])
        return x + self.proj(y.transpose(1, 2).flatten(-2))


class CharMamba(nn.Module):
    """Mamba or Mamba2 over the packed char sequence; seq_idx restarts the state at every document."""

    def __init__(self, dim: int, kind: str):
        super().__init__()
        import kernels
        self.mixer = (kernels.Mamba(dim, d_state=16, expand=2) if kind == "mamba" else
                      kernels.Mamba2(dim, d_state=32, expand=2, headdim=max(8, dim // 8), chunk_size=64))

    def forward(self, x: Tensor, char_docs: Tensor) -> Tensor:  # x: (T, C, D)
        T, C, D = x.shape
        seq = x.reshape(1, T * C, D)
        out = self.mixer(norm(seq).to(self.mixer.in_proj.weight.dtype), seq_idx=char_docs.to(torch.int32)[None])
        return x + out.reshape(T, C, D).to(x.dtype)


class MixtureOfTokenizers(nn.Module):
    """x0 = norm(l0 * token_embedding + l1 * cross), where cross is each token's query attending to its own
    chars (and cross_prev_tokens previous tokens' chars of the same document), PAD chars masked."""

    def __init__(self, a: Hyperparameters, num_ids: int):
        super().__init__()
        self.a = a
        self.register_buffer("byte_table", build_byte_table(num_ids, a.chars_per_token, a.vocab_size), persistent=False)
        self.char_embed = nn.Embedding(CHAR_VOCAB, a.char_dim)
        # byte-slot position: without it cross-attention reads a token's bytes as a bag ("stop" = "pots")
        self.char_pos_embed = nn.Embedding(a.chars_per_token, a.char_dim)
        encoder = a.mot.partition("+")[2]
        self.encoder_kind = encoder or None
        if encoder == "attn":
            self.encoder = CharSelfAttention(a.char_dim, a.char_heads, a.char_window_tokens)
        elif encoder in ("mamba", "mamba2"):
            self.encoder = CharMamba(a.char_dim, encoder)
        self.q = CastedLinear(a.model_dim, a.char_dim)
        self.kv = CastedLinear(a.char_dim, 2 * a.char_dim)
        self.out = CastedLinear(a.char_dim, a.model_dim)
        self.lambdas = nn.Parameter(torch.tensor([1.0, 1.0]))

    def chars(self, input_seq: Tensor, docs: Tensor) -> Tensor:
        """Char features (T, C, char_dim) after the optional char encoder."""
        ids = self.byte_table[input_seq].long()  # (T, C), integers end to end
        x = self.char_embed(ids) + self.char_pos_embed.weight  # (T, C, char_dim) + (C, char_dim)
        if self.encoder_kind == "attn":
            x = self.encoder(x, char_window_mask(docs, ids, self.a.char_window_tokens))
        elif self.encoder_kind is not None:
            x = self.encoder(x, docs.repeat_interleave(ids.size(1)))
        return x

    def cross(self, tok: Tensor, chars: Tensor, input_seq: Tensor, docs: Tensor) -> Tensor:
        T, C, _ = chars.shape
        w = self.a.cross_prev_tokens + 1
        ids = self.byte_table[input_seq]
        q = self.q(norm(tok))[:, None]  # (T, 1, char_dim)
        k, v = self.kv(norm(chars)).chunk(2, dim=-1)
        mask = token_key_mask(docs, ids, w)[:, None, :].clone()  # (T, 1, w*C): one query per token
        mask[:, 0, (w - 1) * C] = True  # own first byte: never PAD for a real token; keeps rows non-empty
        H = self.a.cross_heads
        y = batched_sdpa(split_heads(q, H), split_heads(windowed_keys(k, w), H), split_heads(windowed_keys(v, w), H),
                         mask[:, None])
        return self.out(y.transpose(1, 2).flatten(-2))[:, 0]  # (T, model_dim)

    def forward(self, input_seq: Tensor, tok: Tensor) -> Tensor:
        docs = document_ids(input_seq)
        chars = self.chars(input_seq, docs).to(tok.dtype)
        return self.lambdas[0] * tok + self.lambdas[1] * self.cross(tok, chars, input_seq, docs)


class GPT(nn.Module):
    def __init__(self, a: Hyperparameters, max_seq_len: int, use_fp8: bool = False, grad_accum: int = 1):
        super().__init__()
        self.a = a
        self.embed = nn.Embedding(a.vocab_size, a.model_dim)
        # 3 value embeddings, used by the first 3 and the last 3 layers (012 ... 012); one that only Mamba layers
        # would read is not made (it would get no gradient). Keys "0".."2" keep the state-dict names.
        self.mixers = layer_mixers(a)
        L = a.num_layers
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(a.vocab_size, a.model_dim) for i in range(3)
                                           if "A" in (self.mixers[i], self.mixers[L - 3 + i])})
        self.blocks = nn.ModuleList([Block(a, i, max_seq_len) for i in range(a.num_layers)])
        self.head_vocab = next_multiple_of_n(a.vocab_size, 128)  # 50257 -> 50304: tensor-core friendly
        d = a.model_dim
        x_s, w_s, grad_s = fp8_head_scales(a.train_seq_len, grad_accum)
        self.lm_head = CastedLinear(d, self.head_vocab, use_fp8=use_fp8, x_s=x_s, w_s=w_s, grad_s=grad_s)
        self.lm_head.weight.detach().zero_()
        self.skip_weights = nn.Parameter(torch.ones(a.num_layers // 2))  # U-net: layer L-1-i reads layer i
        self.mot = MixtureOfTokenizers(a, self.head_vocab) if a.mot != "none" else None

    def input_embedding(self, input_seq: Tensor) -> Tensor:
        """x0 before the blocks: the token embedding, mixed with its bytes when MoT is on."""
        tok = self.embed(input_seq)
        if self.mot is not None:
            tok = self.mot(input_seq, tok)
        return norm(tok[None])

    def masks(self, input_seq: Tensor, window_blocks: Tensor, dense: bool):
        make = make_dense_masks if dense else make_block_masks
        long_m, short_m = make(input_seq, window_blocks, self.a.block_size)
        return [long_m if c == "L" else short_m for c in self.a.window_pattern]

    def layer_value_embeddings(self, tokens: Tensor) -> list[Tensor | None]:
        ve = [self.value_embeds[str(i)](tokens) if str(i) in self.value_embeds else None for i in range(3)]
        return ve + [None] * (self.a.num_layers - 6) + ve

    def features(self, input_seq: Tensor, window_blocks: Tensor, dense_mask: bool) -> Tensor:
        """Final normed hidden states (1, T, model_dim)."""
        assert input_seq.ndim == 1, f"input_seq must be 1-D (packed tokens), got {tuple(input_seq.shape)}"
        L = self.a.num_layers
        ve = self.layer_value_embeddings(input_seq)
        masks = self.masks(input_seq, window_blocks, dense_mask) if "A" in self.mixers else [None] * L
        # Mamba layers restart their state (and conv window) at every document: the attention masks' doc ids
        seq_idx = document_ids(input_seq).to(torch.int32)[None] if set("M2") & set(self.mixers) else None
        x = x0 = self.input_embedding(input_seq).to(self.embed.weight.dtype)
        skips = []
        for i in range(L // 2):
            x = self.blocks[i](x, ve[i], x0, masks[i], seq_idx)
            skips.append(x)
        for i in range(L // 2, L):
            x = x + self.skip_weights[i - L // 2] * skips.pop()
            x = self.blocks[i](x, ve[i], x0, masks[i], seq_idx)
        return norm(x)

    @torch.no_grad()
    def decode_step(self, token: int, state: "DecodeState") -> Tensor:
        """Logits (head_vocab,) after `token`, appended at position state.pos: equal to logits() of the whole
        sequence at that position, with the attention window as at the end of training (state.window_blocks)."""
        t = state.pos
        if t >= state.max_len:
            raise ValueError(f"decoding state holds {state.max_len} positions; position {t} does not fit")
        device = self.embed.weight.device
        if token == EOT_ID:  # EOT opens a new document: the Mamba states restart, attention sees only it
            state.doc += 1
            for cache, kind in zip(state.layers, self.mixers):
                if kind in ("M", "2"):
                    for s in cache:
                        s.zero_()
        tok = torch.tensor([token], device=device)
        if state.tokens is not None:  # a MoT char encoder reads previous tokens: recompute it over the history
            state.tokens[t] = token
            x0 = self.input_embedding(state.tokens[:t + 1])[:, -1:]
        else:
            x0 = self.input_embedding(tok)
        x = x0 = x0.to(self.embed.weight.dtype)
        visible = {}
        if state.docs is not None:
            state.docs[t] = state.doc
            bs, pos = self.a.block_size, torch.arange(t + 1, device=device)
            same_doc = state.docs[:t + 1] == state.doc
            for c, w in (("L", state.window_blocks), ("S", max(state.window_blocks // 2, 1))):
                visible[c] = same_doc & (pos // bs > t // bs - w)  # the w most recent blocks (see windowed_blocks)
        ve = self.layer_value_embeddings(tok)
        L = self.a.num_layers
        layer_args = [(ve[i], x0, state.layers[i], t, visible.get(self.a.window_pattern[i])) for i in range(L)]
        skips = []
        for i in range(L // 2):
            x = self.blocks[i].decode(x, *layer_args[i])
            skips.append(x)
        for i in range(L // 2, L):
            x = x + self.skip_weights[i - L // 2] * skips.pop()
            x = self.blocks[i].decode(x, *layer_args[i])
        state.pos += 1
        return self.head(norm(x))[0, 0]

    def head(self, h: Tensor) -> Tensor:
        logits = self.lm_head(h).float()
        return 30 * torch.sigmoid(logits / 7.5)  # softcap: 15 * (1 + tanh(x / 15))

    def logits(self, input_seq: Tensor, window_blocks: Tensor, dense_mask: bool = False) -> Tensor:
        return self.head(self.features(input_seq, window_blocks, dense_mask))

    def forward(self, input_seq: Tensor, target_seq: Tensor, window_blocks: Tensor, dense_mask: bool = False) -> Tensor:
        h = self.features(input_seq, window_blocks, dense_mask)[0]
        chunk = self.a.loss_chunk if self.a.loss_chunk > 0 else h.size(0)
        total = h.new_zeros((), dtype=torch.float32)
        for s in range(0, h.size(0), chunk):
            total = total + F.cross_entropy(self.head(h[s:s + chunk]), target_seq[s:s + chunk], reduction="sum")
        return total / h.size(0)


class DecodeState:
    """GPT.decode_step's cache for one sequence: per attention layer the keys and values of every position so
    far (preallocated for max_len) and the positions' document ids; per Mamba layer its (conv_state, ssm_state),
    the same size at any length; the token history only when a MoT char encoder needs it."""

    def __init__(self, model: GPT, max_len: int):
        a, device = model.a, model.embed.weight.device
        self.pos, self.doc, self.max_len = 0, 0, max_len
        self.window_blocks = window_blocks_at(a.num_iterations, a)
        if "A" in model.mixers:
            for block in model.blocks:
                if block.attn is not None:
                    block.attn.rotary.extend(max(max_len, block.attn.rotary.cos.size(0)))
        self.docs = torch.zeros(max_len, dtype=torch.long, device=device) if "A" in model.mixers else None
        needs_history = model.mot is not None and (model.mot.encoder_kind is not None or a.cross_prev_tokens > 0)
        self.tokens = torch.zeros(max_len, dtype=torch.long, device=device) if needs_history else None
        dtype = model.embed.weight.dtype
        self.layers = []
        for block in model.blocks:
            if block.attn is not None:
                shape = (1, a.num_heads, max_len, a.head_dim)
                self.layers.append((torch.zeros(shape, dtype=dtype, device=device),
                                    torch.zeros(shape, dtype=dtype, device=device)))
            else:
                self.layers.append(block.ssm.allocate_inference_cache(1) if block.ssm is not None else None)


def build_optimizers(model: GPT, a: Hyperparameters, rank: int, world_size: int, fused: bool,
                     orthogonalise=zeropower_via_newtonschulz5):
    """Adam for the head, the embeddings and the scalars; Muon for every matrix inside the blocks but the Mamba
    layers' dynamics: their in_proj, out_proj (and Mamba's x_proj) are Muon matrices, while A_log, D, dt_bias,
    Mamba's dt_proj (a rank-dt_rank map that sets the step sizes) and the depthwise conv weights and biases train
    with Adam at mamba_lr. Asserts that every trainable parameter is in exactly one group."""
    ssm_muon = {id(m.weight) for n, m in model.blocks.named_modules()
                if n.endswith((".ssm.in_proj", ".ssm.out_proj", ".ssm.x_proj"))}
    ssm_adam = [p for n, p in model.blocks.named_parameters() if ".ssm." in n and id(p) not in ssm_muon]
    taken = {id(p) for p in ssm_adam}
    hidden_matrices = [p for p in model.blocks.parameters() if p.ndim >= 2 and id(p) not in taken]
    embeds = [p for n, p in model.named_parameters() if "embed" in n and p.ndim >= 2 and not n.startswith("blocks.")
              and not n.startswith("mot.encoder.")]
    scalars = [p for p in model.parameters() if p.ndim < 2 and id(p) not in taken]
    head = [model.lm_head.weight]
    char_mamba = [p for n, p in model.named_parameters() if n.startswith("mot.encoder.mixer.") and p.ndim >= 2]
    taken = {id(p) for p in embeds + char_mamba}
    mot_matrices = [p for n, p in model.named_parameters() if n.startswith("mot.") and p.ndim >= 2 and id(p) not in taken]
    adam_groups = [dict(params=head, lr=a.head_lr), dict(params=embeds, lr=a.embed_lr),
                   dict(params=scalars, lr=a.scalar_lr)]
    if char_mamba:
        adam_groups.append(dict(params=char_mamba, lr=a.char_mamba_lr))
    if ssm_adam:
        adam_groups.append(dict(params=ssm_adam, lr=a.mamba_lr))
    if mot_matrices:
        adam_groups.append(dict(params=mot_matrices, lr=a.mot_lr))
    adam = torch.optim.Adam(adam_groups, betas=(0.8, 0.95), eps=1e-10, fused=fused)
    muon = Muon(hidden_matrices, lr=a.muon_lr, momentum=a.muon_momentum_end, rank=rank, world_size=world_size,
                orthogonalise=orthogonalise)
    optimizers = [adam, muon]
    check_optimizer_coverage(model, optimizers)
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def check_optimizer_coverage(model: nn.Module, optimizers) -> None:
    counts = {id(p): 0 for p in model.parameters() if p.requires_grad}
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                counts[id(p)] = counts.get(id(p), 0) + 1
    names = {id(p): n for n, p in model.named_parameters()}
    missing = [names.get(i, "?") for i, c in counts.items() if c == 0]
    repeated = [names.get(i, "?") for i, c in counts.items() if c > 1]
    assert not missing and not repeated, (f"every trainable parameter must be in exactly one optimizer group; "
                                          f"in none: {missing}; in several: {repeated}")


# -----------------------------------------------------------------------------
# 4. Data


def data_fix_hint(pattern: str) -> str:
    if "fineweb" in pattern:
        return "download it with `python data/cached_fineweb10B.py 8`"
    if "devil_jargon" in pattern:
        return "build the demo corpus with `python data/prepare.py`"
    return "build shards with `python data/prepare.py --out_dir DIR your_texts*.txt`"


def ensure_embedded_corpus(pattern: str, rank: int):
    """The demo corpus is tokenized on first use (rank 0 writes; others wait)."""
    import glob
    if "devil_jargon" in pattern and not glob.glob(str(REPO_DIR / pattern)):
        if rank == 0:
            from data.prepare import prepare_embedded
            print("tokenizing the embedded demo corpus (first use)...")
            prepare_embedded()
        if dist.is_initialized():
            dist.barrier()


def check_data(a: Hyperparameters, world_size: int) -> str:
    """Every train and val shard's header and size, before anything is built or timed: a truncated
    shard or missing FineWeb is reported now, not when the loader reaches it. Raises ShardError."""
    lines = []
    for kind, pattern, seq_len in (("train", a.train_files, a.train_seq_len), ("val", a.val_files, a.val_seq_len)):
        path_pattern = pattern if os.path.isabs(pattern) else str(REPO_DIR / pattern)
        fix = data_fix_hint(path_pattern)
        files = shard_files(path_pattern, fix)
        span = world_size * seq_len
        counts = [check_shard(f, fix) for f in files]
        for f, n in zip(files, counts):
            if n < span + 1:
                raise ShardError(f"{kind} shard {f} has {n} tokens, fewer than one batch needs ({world_size} ranks "
                                 f"x {kind}_seq_len {seq_len} + 1 = {span + 1}): lower --{kind}_seq_len or use "
                                 f"more data. Fix: {fix}")
        if kind == "val":
            needed = a.val_tokens // span
            available = sum((n - 1) // span for n in counts)  # what distributed_data_generator yields
            if available < needed:
                raise ShardError(f"val data {pattern} holds {available} batches of {span} tokens, --val_tokens="
                                 f"{a.val_tokens} needs {needed}: lower --val_tokens or --val_seq_len")
        lines.append(f"{kind} data: {len(files)} shards, {sum(counts):,} tokens ({pattern})")
    return "\n".join(lines)


def distributed_data_generator(pattern: str, seq_len: int, rank: int, world_size: int, vocab_size: int,
                               loop: bool = True):
    """Yield (inputs int32, targets int64) of seq_len tokens for this rank. A micro-step consumes
    world_size * seq_len consecutive tokens; rank r takes slice r (plus one token for the targets)."""
    pattern = pattern if os.path.isabs(pattern) else str(REPO_DIR / pattern)
    fix = data_fix_hint(pattern)
    files = shard_files(pattern, fix)
    span = world_size * seq_len
    while True:
        for f in files:
            tokens = read_shard(f, vocab_size, fix)
            if tokens.size < span + 1:
                raise ShardError(f"shard {f} has {tokens.size} tokens, fewer than one batch needs "
                                 f"({world_size} ranks x {seq_len} + 1 = {span + 1}); lower train_seq_len/val_seq_len "
                                 f"or use more data. Fix: {fix}")
            tokens = torch.from_numpy(tokens.astype(np.int32))
            pos = 0
            while pos + span + 1 <= tokens.numel():
                buf = tokens[pos + rank * seq_len: pos + (rank + 1) * seq_len + 1]
                yield buf[:-1], buf[1:].to(torch.int64)
                pos += span
        if not loop:
            return


# -----------------------------------------------------------------------------
# 5. Records: log in the speedrun format + machine-readable summary


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_DIR,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        try:
            return subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return torch.cuda.get_device_name(device)
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def write_json_atomic(path: Path, obj) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def write_atomic(path: Path, write) -> None:
    """write(binary file) into a temporary file in the same folder, fsync, rename: a crash or a full disk leaves
    the previous file or none, never a truncated one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


# --- checkpoints: RECORD/checkpoint.pt, plain containers and tensors only (torch.load(weights_only=True)) ----

CHECKPOINT_FORMAT = "train_gpt checkpoint v1"
CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(Exception):
    pass


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """A checkpoint file, or a record folder holding checkpoint.pt. Raises CheckpointError saying what is wrong."""
    path = Path(path)
    if path.is_dir():
        if not (path / CHECKPOINT_NAME).is_file():
            raise CheckpointError(f"{path} holds no {CHECKPOINT_NAME}: train with --save_checkpoint=final (or "
                                  f"every_N) to write one")
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated or foreign file: pickle, zip and weights_only errors alike
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        found = ck.get("format") if isinstance(ck, dict) else type(ck).__name__
        raise CheckpointError(f"{path} is not a {CHECKPOINT_FORMAT!r} file (format: {found!r})")
    ck["path"] = str(path)
    return ck


def checkpoint_hyperparameters(ck: dict) -> dict:
    """The checkpoint's hyperparameters, checked against this version's fields."""
    known = {f.name for f in fields(Hyperparameters)}
    unknown = sorted(set(ck["hyperparameters"]) - known)
    if unknown:
        raise CheckpointError(f"{ck['path']} was written by another version of train_gpt.py: unknown "
                              f"hyperparameters {unknown}")
    return dict(ck["hyperparameters"])


def model_from_checkpoint(ck: dict, device, max_seq_len: int | None = None) -> GPT:
    """The checkpoint's GPT with its weights, in eval mode. Raises CheckpointError if they do not fit."""
    a = Hyperparameters(**checkpoint_hyperparameters(ck))
    model = GPT(a, max_seq_len=max_seq_len or max(a.train_seq_len, a.val_seq_len))
    try:  # copies cast: bf16 embeddings saved by a CUDA run load into this fp32 model
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{ck['path']}: weights do not fit the model its hyperparameters describe: {e}") from None
    return model.to(device).eval()


def gather_muon_state(muon: Muon, world_size: int) -> None:
    """With several ranks each keeps the momentum of only the matrices it orthogonalises (every world_size-th
    of a shape group): broadcast each from its owner, so every rank (rank 0 saves) holds all of them."""
    if world_size == 1:
        return
    for group in muon.param_groups:
        for i, p in enumerate(group["params"]):
            state = muon.state[p]
            buf = state.get("momentum_buffer")
            state["momentum_buffer"] = buf = torch.zeros_like(p) if buf is None else buf
            dist.broadcast(buf, src=i % world_size)


def new_record_dir(records_dir: str, run_name: str) -> Path:
    """A fresh folder; never reuses an existing one."""
    root = Path(records_dir) if os.path.isabs(records_dir) else REPO_DIR / records_dir
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_name)
    while True:
        path = root / f"{stamp}_{safe}_{uuid.uuid4().hex[:6]}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


# -----------------------------------------------------------------------------
# 6. Training


def setup_distributed():
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1 or "RANK" in os.environ:
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None)
    return rank, world_size, device


def all_reduce_mean_(tensors: list[Tensor], world_size: int):
    """Average across ranks with one collective (gloo has no AVG, so SUM then divide)."""
    if world_size == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def lr_multiplier(step: int, a: Hyperparameters) -> float:
    x = step / a.num_iterations
    if x < 1 - a.cooldown_frac:
        return 1.0
    w = (1 - x) / a.cooldown_frac
    return w * 1.0 + (1 - w) * 0.1


def window_blocks_at(step: int, a: Hyperparameters) -> int:
    return next_multiple_of_n(a.window_max_tokens * step / a.num_iterations, a.block_size) // a.block_size


@dataclass
class Settings:
    """What the "auto" flags resolve to on this machine, and the accumulation."""
    use_flex: bool
    use_compile: bool
    use_fp8: bool
    act_dtype: torch.dtype
    grad_accum: int


def resolve_settings(a: Hyperparameters, device_type: str, hopper: bool, world_size: int) -> Settings:
    """Checks that need the device and the world size; SystemExit naming the flag, before anything is built."""
    cuda = device_type == "cuda"
    if a.batch_slices % world_size != 0:
        raise SystemExit(f"world size {world_size} must divide --batch_slices={a.batch_slices} "
                         f"(grad_accum = batch_slices // world_size)")
    if a.val_tokens % (world_size * a.val_seq_len) != 0:
        raise SystemExit(f"--val_tokens={a.val_tokens} must be a multiple of world_size * val_seq_len "
                         f"= {world_size * a.val_seq_len}")
    use_flex = a.attention == "flex" or (a.attention == "auto" and cuda)
    use_compile = a.compile == "on" or (a.compile == "auto" and cuda)
    if not use_flex and max(a.train_seq_len, a.val_seq_len) > 16384:
        raise SystemExit(f"--attention=sdpa builds dense (T, T) masks: keep --train_seq_len/--val_seq_len <= 16384 "
                         f"(got {a.train_seq_len}/{a.val_seq_len}) or use --attention=flex on a GPU")
    if use_flex and cuda and not use_compile:
        raise SystemExit(f"--compile=off with --attention=flex on CUDA: uncompiled flex_attention materialises "
                         f"(heads, T, T) scores ({a.num_heads} x {max(a.train_seq_len, a.val_seq_len)}^2); use "
                         f"--compile=on, or --attention=sdpa with sequences <= 16384 tokens")
    if use_flex and cuda and a.block_size % 128 != 0:
        raise SystemExit(f"--block_size={a.block_size} with --attention=flex on CUDA: the compiled FlexAttention "
                         f"kernel needs a multiple of 128 (torch 2.11 rejects smaller blocks on sm_90); use "
                         f"--block_size=128 or --attention=sdpa")
    return Settings(
        use_flex=use_flex, use_compile=use_compile,
        use_fp8=a.fp8_head == "on" or (a.fp8_head == "auto" and hopper),
        act_dtype=torch.bfloat16 if (a.dtype == "bfloat16" or (a.dtype == "auto" and cuda)) else torch.float32,
        grad_accum=a.batch_slices // world_size)


class Diverged(Exception):
    def __init__(self, step: int, what: str, value: float):
        super().__init__(f"{what} is {value} at step {step}: the run diverged; stopping (lower the learning "
                         f"rates, or check the data)")
        self.step = step


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def raise_interrupted(signum, frame):
    raise Interrupted(signum)


class StepTimer:
    """Milliseconds per optimizer step. On CUDA without a per-step sync, CUDA events timestamp each step on
    the device's timeline and are read once at the end, so the CPU keeps running ahead (as record 21);
    otherwise host time, after a device sync when sync_every_step is set."""

    def __init__(self, device_events: bool, sync):
        self.device_events, self.sync, self.spans = device_events, sync, []

    def _mark(self):
        if self.device_events:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        self.sync()
        return time.perf_counter()

    def start(self):
        self._start = self._mark()

    def stop(self):
        self.spans.append((self._start, self._mark()))

    def ms(self) -> list[float]:
        if self.device_events:
            torch.cuda.synchronize()
            return [s.elapsed_time(e) for s, e in self.spans]
        return [1000 * (e - s) for s, e in self.spans]


EXIT_CODES = dict(completed=0, failed=1, diverged=3, interrupted=130)


def main(argv=None) -> dict:
    """Parse and check everything (flags, then data), then train --runs times; returns the last run's summary."""
    rank, world_size, device = setup_distributed()
    cuda = device.type == "cuda"
    try:
        a = parse_args(sys.argv[1:] if argv is None else argv, cuda=cuda)
        hopper = cuda and torch.cuda.get_device_capability(device)[0] >= 9
        settings = resolve_settings(a, device.type, hopper, world_size)
        ensure_embedded_corpus(a.train_files, rank)
        ensure_embedded_corpus(a.val_files, rank)
        try:
            data_report = check_data(a, world_size)
        except ShardError as e:
            raise SystemExit(f"data check failed before training: {e}") from None
        previous = {sig: signal.signal(sig, raise_interrupted) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            summaries = []
            for i in range(a.runs):
                run = dataclasses.replace(a, seed=a.seed + i if a.seed >= 0 else -1)
                summaries.append(train(run, settings, rank, world_size, device, data_report))
                if summaries[-1]["status"] == "interrupted":
                    break
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if a.runs > 1 and rank == 0:
            print(series_report(summaries, a.target_loss), flush=True)
        return summaries[-1]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def series_report(summaries: list[dict], target: float) -> str:
    """--runs: mean, std and the one-sided t-test of the final val losses (summarize.py's statistics)."""
    from summarize import markdown_table, summarize, unranked_lines
    lines = [f"{len(summaries)} runs of {summaries[0]['run_name']!r}, seeds "
             f"{[s['hyperparameters']['seed'] for s in summaries]}:"]
    rows = summarize(summaries, target=target)
    if rows:
        lines.append(markdown_table(rows, target))
    lines += unranked_lines(summaries)
    return "\n".join(lines)


def train(a: Hyperparameters, s: Settings, rank: int, world_size: int, device: torch.device, data_report: str) -> dict:
    """One run; its record says whether it completed, diverged, was interrupted or failed."""
    master = rank == 0
    cuda = device.type == "cuda"
    grad_accum = s.grad_accum
    if a.seed >= 0:
        torch.manual_seed(a.seed)
    record_dir = new_record_dir(a.records_dir, a.run_name) if (master and a.save_record) else None
    logfile = open(record_dir / "train.log", "w") if record_dir else None

    def print0(line: str = "", console: bool = True):
        if master:
            if console:
                print(line, flush=True)
            if logfile:
                logfile.write(line + "\n")
                logfile.flush()

    # the source of the run goes first in its log, as in the speedrun
    print0(Path(__file__).read_text(), console=False)
    print0("=" * 100, console=False)
    print0(f"Running Python {sys.version}", console=False)
    print0(f"Running PyTorch {torch.__version__} compiled for CUDA {torch.version.cuda}", console=False)
    print0(device_description(device), console=False)
    print0("=" * 100, console=False)
    print0(f"hyperparameters: {json.dumps(dataclasses.asdict(a))}")
    print0(f"world_size={world_size} grad_accum={grad_accum} device={device} attention={'flex' if s.use_flex else 'sdpa'} "
           f"compile={s.use_compile} fp8_head={s.use_fp8} dtype={s.act_dtype}")
    print0(data_report)
    if record_dir:
        print0(f"record: {record_dir}")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    timer = StepTimer(device_events=cuda and not a.sync_every_step, sync=sync if a.sync_every_step else lambda: None)
    val_history, train_losses = [], []
    training_time_ms, steps_done, n_params = 0.0, 0, 0
    status, stopped_at, error = "failed", None, None
    try:
        train_loader = distributed_data_generator(a.train_files, a.train_seq_len, rank, world_size, a.vocab_size)
        model = GPT(a, max_seq_len=max(a.train_seq_len, a.val_seq_len), use_fp8=s.use_fp8,
                    grad_accum=grad_accum).to(device)
        for m in model.modules():
            if isinstance(m, nn.Embedding) and s.act_dtype == torch.bfloat16:
                m.bfloat16()
        if world_size > 1:
            for p in model.parameters():
                dist.broadcast(p.detach(), 0)
        compile_ns = cuda and s.use_compile  # eager on the CPU: inductor's compile time outweighs the gain
        orthogonalise = torch.compile(zeropower_via_newtonschulz5) if compile_ns else zeropower_via_newtonschulz5
        optimizers = build_optimizers(model, a, rank, world_size, fused=True, orthogonalise=orthogonalise)
        muon = optimizers[1]
        n_params = sum(p.numel() for p in model.parameters())
        print0(f"parameters: {n_params:,} (mixers per layer: {model.mixers})")
        start_step = 0
        if a.resume:
            start_step, training_time_ms = resume_from(a, model, optimizers, train_loader, world_size, grad_accum,
                                                       train_losses, val_history, print0)
        every = checkpoint_every(a.save_checkpoint)

        def checkpoint(step: int):
            if every < 0:
                return
            gather_muon_state(muon, world_size)
            if record_dir:
                path = record_dir / CHECKPOINT_NAME
                write_atomic(path, lambda f: torch.save(dict(
                    format=CHECKPOINT_FORMAT, hyperparameters=dataclasses.asdict(a), step=step,
                    world_size=world_size, model=model.state_dict(), optimizers=[o.state_dict() for o in optimizers],
                    train_loss=list(train_losses), val=list(val_history), train_time_ms=training_time_ms,
                    rng=torch.get_rng_state(), cuda_rng=torch.cuda.get_rng_state(device) if cuda else None), f))
                print0(f"step:{step}/{a.num_iterations} checkpoint: {path}")
        if s.use_fp8:
            head = model.lm_head
            print0(f"fp8 head scales: x_s={head.x_s} w_s={head.w_s} grad_s={head.grad_s} (record 21's, grad_s "
                   f"x {a.train_seq_len} tokens x grad_accum {grad_accum} / {FP8_REFERENCE_TOKENS})")
        fwd = torch.compile(model, dynamic=False) if s.use_compile else model
        dense = not s.use_flex

        def train_step(step: int, batches) -> Tensor:
            window = torch.tensor(window_blocks_at(step, a), dtype=torch.int32, device=device)
            total = torch.zeros((), device=device)
            for inputs, targets in batches:
                loss = fwd(inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True), window, dense)
                (loss / grad_accum).backward()
                total += loss.detach() / grad_accum
            # gradients and the reported loss averaged over ranks in one collective
            all_reduce_mean_([p.grad for p in model.parameters()] + [total], world_size)
            lr_mul = lr_multiplier(step, a)
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * lr_mul
            frac = min(step / a.muon_momentum_warmup, 1) if a.muon_momentum_warmup > 0 else 1.0
            for group in muon.param_groups:
                group["momentum"] = (1 - frac) * a.muon_momentum_start + frac * a.muon_momentum_end
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
            return total

        # untimed warm-up (compilation, kernel autotuning) on random tokens; state restored after
        if a.warmup_steps > 0:
            saved = dict(model=copy.deepcopy(model.state_dict()), opts=[copy.deepcopy(o.state_dict()) for o in optimizers])
            g = torch.Generator().manual_seed(rank)
            for w in range(a.warmup_steps):
                fake = [torch.randint(0, a.vocab_size, (a.train_seq_len + 1,), generator=g, dtype=torch.int32)
                        for _ in range(grad_accum)]
                train_step(w, [(t[:-1], t[1:].long()) for t in fake])
            model.load_state_dict(saved["model"])
            for o, st in zip(optimizers, saved["opts"]):
                o.load_state_dict(st)
            del saved

        # A step's loss is read (and checked for divergence) one step later on CUDA, so reading it never
        # stalls the queue; on the CPU at once.
        lag = 1 if (cuda and not a.sync_every_step) else 0
        pending = []  # (step, loss tensor, host-side train time ms) not yet read

        def read_losses(keep: int):
            while len(pending) > keep:
                n, loss, approx = pending.pop(0)
                value = loss.item()
                train_losses.append(value)
                print0(f"step:{n}/{a.num_iterations} train_loss:{value:.4f} train_time:{approx:.0f}ms "
                       f"step_avg:{approx / n:.2f}ms", console=master and (n <= 10 or n % 10 == 0))
                if not math.isfinite(value):
                    raise Diverged(n, "train loss", value)

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        for step in range(start_step, a.num_iterations + 1):
            last = step == a.num_iterations
            if last or (a.val_loss_every > 0 and step % a.val_loss_every == 0 and step > 0):
                read_losses(0)
                sync()
                training_time_ms += 1000 * (time.perf_counter() - t0)
                model.eval()
                val_steps = a.val_tokens // (world_size * a.val_seq_len)
                val_loader = distributed_data_generator(a.val_files, a.val_seq_len, rank, world_size, a.vocab_size,
                                                        loop=False)
                window = torch.tensor(window_blocks_at(step, a), dtype=torch.int32, device=device)
                val_loss = torch.zeros((), device=device)
                with torch.no_grad():
                    for _ in range(val_steps):  # check_data made sure the val shards hold val_steps batches
                        inputs, targets = next(val_loader)
                        val_loss += fwd(inputs.to(device), targets.to(device), window, dense)
                val_loss /= val_steps
                all_reduce_mean_([val_loss], world_size)
                vl = val_loss.item()
                val_history.append(dict(step=step, val_loss=vl, train_time_ms=training_time_ms))
                print0(f"step:{step}/{a.num_iterations} val_loss:{vl:.4f} train_time:{training_time_ms:.0f}ms "
                       f"step_avg:{training_time_ms / max(step, 1):.2f}ms")
                if not math.isfinite(vl):
                    raise Diverged(step, "val loss", vl)
                model.train()
                sync()
                t0 = time.perf_counter()
            if last:
                break
            timer.start()
            loss = train_step(step, [next(train_loader) for _ in range(grad_accum)])
            timer.stop()
            steps_done = step + 1
            pending.append((steps_done, loss, training_time_ms + 1000 * (time.perf_counter() - t0)))
            read_losses(lag)
            if every > 0 and steps_done % every == 0 and steps_done < a.num_iterations:
                read_losses(0)
                sync()  # the time spent writing is not training time
                training_time_ms += 1000 * (time.perf_counter() - t0)
                checkpoint(steps_done)
                t0 = time.perf_counter()
        checkpoint(a.num_iterations)
        status = "completed"
    except Diverged as e:
        status, stopped_at, error = "diverged", e.step, str(e)
        print0(f"DIVERGED: {e}")
    except Interrupted as e:
        status, stopped_at, error = "interrupted", steps_done, str(e)
        print0(f"INTERRUPTED after {steps_done} steps: {e}; writing the record")
    except BaseException as e:
        error = f"{type(e).__name__}: {e}"
        print0(f"FAILED after {steps_done} steps: {error}")
        raise
    finally:
        summary = finish_record(a, s, world_size, device, record_dir, print0, status=status, stopped_at=stopped_at,
                                error=error, timer=timer, train_losses=train_losses, val_history=val_history,
                                training_time_ms=training_time_ms, n_params=n_params)
        if logfile:
            logfile.close()
    return summary


def resume_from(a: Hyperparameters, model: GPT, optimizers, train_loader, world_size: int, grad_accum: int,
                train_losses: list, val_history: list, print0) -> tuple[int, float]:
    """Load --resume's model, optimizer and RNG state and the history so far; move the train loader to where
    that run stopped. Returns (first step to run, training time so far in ms)."""
    try:
        ck = load_checkpoint(a.resume, map_location=next(model.parameters()).device)
        model.load_state_dict(ck["model"])
    except (CheckpointError, RuntimeError) as e:
        raise SystemExit(f"--resume: {e}") from None
    saved = ck["hyperparameters"]
    if ck["world_size"] != world_size or saved["batch_slices"] != a.batch_slices or saved["train_seq_len"] != a.train_seq_len:
        raise SystemExit(f"--resume: {ck['path']} was written with world size {ck['world_size']}, --batch_slices="
                         f"{saved['batch_slices']}, --train_seq_len={saved['train_seq_len']}; resuming needs the same "
                         f"(the data position depends on them)")
    for opt, state in zip(optimizers, ck["optimizers"], strict=True):
        base_lrs = [group["initial_lr"] for group in opt.param_groups]
        opt.load_state_dict(state)
        for group, lr in zip(opt.param_groups, base_lrs):  # the lr flags given with --resume, not the saved ones
            group["initial_lr"] = lr
    torch.set_rng_state(ck["rng"])
    if ck["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(ck["cuda_rng"])
    for _ in range(ck["step"] * grad_accum):
        next(train_loader)
    train_losses.extend(ck["train_loss"])
    val_history.extend(ck["val"])
    print0(f"resumed from {ck['path']} at step {ck['step']}")
    return ck["step"], ck["train_time_ms"]


def finish_record(a: Hyperparameters, s: Settings, world_size: int, device: torch.device, record_dir, print0, *,
                  status: str, stopped_at, error, timer: StepTimer, train_losses: list, val_history: list,
                  training_time_ms: float, n_params: int) -> dict:
    """The run's summary.json (written atomically), whatever way the run ended."""
    cuda = device.type == "cuda"
    step_ms = timer.ms()
    if cuda:
        peak_alloc = torch.cuda.max_memory_allocated() // 2**20
        peak_reserved = torch.cuda.max_memory_reserved() // 2**20
        print0(f"peak memory allocated: {peak_alloc} MiB reserved: {peak_reserved} MiB")
    else:  # CPU: the process's peak resident set (includes Python and the data)
        import resource
        peak_alloc = peak_reserved = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        print0(f"peak memory (max RSS): {peak_alloc} MiB")
    completed = status == "completed"
    summary = dict(
        run_name=a.run_name, status=status, diverged_at_step=stopped_at if status == "diverged" else None,
        interrupted_at_step=stopped_at if status == "interrupted" else None, error=error,
        hyperparameters=dataclasses.asdict(a), git_commit=git_commit(), world_size=world_size,
        grad_accum=s.grad_accum, device=torch.cuda.get_device_name(device) if cuda else f"cpu ({os.cpu_count()} cores)",
        torch=torch.__version__, attention="flex" if s.use_flex else "sdpa", compile=s.use_compile, fp8_head=s.use_fp8,
        parameters=n_params, step_ms=step_ms, train_loss=train_losses, val=val_history,
        final_val_loss=val_history[-1]["val_loss"] if completed else None, train_time_ms=training_time_ms,
        tokens_per_s=(a.batch_slices * a.train_seq_len * len(train_losses) / (training_time_ms / 1000)
                      if completed and training_time_ms > 0 else None),
        median_step_ms=float(np.median(step_ms)) if step_ms else None, peak_memory_allocated_mib=peak_alloc,
        peak_memory_reserved_mib=peak_reserved, time=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    if record_dir:
        write_json_atomic(record_dir / "summary.json", summary)
        print0(f"wrote {record_dir / 'summary.json'} (status: {status})")
    return summary


if __name__ == "__main__":
    sys.exit(EXIT_CODES[main()["status"]])
