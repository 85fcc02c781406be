"""The FP8 LM head (train_gpt.py section 3): products, fake (meta) implementations, torch.compile, and
gradients at the speedrun's loss normalisation for 1 and 8 GPUs.

The ops run on the CPU through torch._scaled_mm's CPU implementation (fp8 storage, fp32 accumulation), so
these tests check the quantisation itself: scales, casts, layouts. Speed is a GPU matter (kernels/bench)."""
import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg

E4M3_REL = 2.0 ** -4  # e4m3: 3 mantissa bits, relative rounding error <= 2^-4
E5M2_REL = 2.0 ** -3  # e5m2: 2 mantissa bits, <= 2^-3


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_fp8_head_matches_float_matmul():
    torch.manual_seed(0)
    lin = tg.CastedLinear(64, 256, use_fp8=True, x_s=2.0, w_s=2.0 ** 9, grad_s=2.0 ** 8)
    x = torch.randn(32, 64, dtype=torch.bfloat16, requires_grad=True)
    out = lin(x)
    ref_x = x.detach().float().requires_grad_()
    ref_w = lin.weight.detach().clone().requires_grad_()
    ref = ref_x @ ref_w.T
    g = torch.randn_like(ref) * 1e-2  # x grad_s = 2.56: e5m2's normal range
    out.backward(g.to(out.dtype))
    ref.backward(g)
    # Per element the rounding error is uniform-like, rms about max/sqrt(3); over a sum of many independent
    # products the norm-wise relative error stays near that rms: forward e4m3 x and w, sqrt(2) * 3.6% = 5.1%;
    # backward adds e5m2 on g (7.2% rms). Bounds at the per-element maxima (6.25%, 12.5%) plus margin.
    assert rel(out, ref.detach()) < 0.08
    assert rel(x.grad, ref_x.grad) < 0.15
    assert rel(lin.weight.grad, ref_w.grad) < 0.15


def test_fake_implementations_declare_the_real_layouts():
    """torch.compile trusts the fake implementations' strides; the weight gradient is returned transposed
    (strides (1, out)), which a contiguous fake declared wrongly: a certain crash on the first GPU step."""
    torch.manual_seed(0)
    x = torch.randn(32, 64, dtype=torch.bfloat16)
    w = torch.randn(128, 64) * 0.05
    # test_faketensor: the fake's sizes, strides and dtypes against the real op's (test_schema cannot
    # run here: its checker multiplies fp8 tensors, which the CPU does not implement)
    torch.library.opcheck(torch.ops.nanogpt_mot.fp8_mm.default, (x, w, 2.0, 512.0, 256.0),
                          test_utils=("test_faketensor",))
    _, x_f8, w_f8 = torch.ops.nanogpt_mot.fp8_mm(x, w, 2.0, 512.0, 256.0)
    g = torch.randn(32, 128, dtype=torch.bfloat16) * 1e-2
    torch.library.opcheck(torch.ops.nanogpt_mot.fp8_mm_backward.default, (g, x_f8, w_f8, 2.0, 512.0, 256.0),
                          test_utils=("test_faketensor",))
    grad_w = torch.ops.nanogpt_mot.fp8_mm_backward(g, x_f8, w_f8, 2.0, 512.0, 256.0)[1]
    assert grad_w.stride() == (1, 128)  # the layout the fake must (and now does) declare


def tiny_fp8_model():
    a = tg.parse_args(["--preset=cpu", "--num_layers=6", "--window_pattern=LSSSSL", "--no_attn_layers=3",
                       "--model_dim=32", "--num_heads=2", "--head_dim=16", "--block_size=16",
                       "--train_seq_len=64", "--val_seq_len=64", "--val_tokens=64", "--window_max_tokens=64"],
                      cuda=False)
    torch.manual_seed(0)
    model = tg.GPT(a, max_seq_len=64, use_fp8=True)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.05 if p.ndim >= 2 else 1.0))
    return model


def test_compiled_fp8_head_runs_forward_and_backward():
    """The model's head and loss under torch.compile (inductor, CPU) with the FP8 head: inductor asserts the
    fake implementations' strides at run time, which failed on the first backward before. Compiling the
    whole model on the CPU takes ~100 s on 2 cores (measured), so the CPU test compiles the part that holds
    the FP8 op; test_compiled_model_with_fp8_head_on_cuda compiles the whole model on a GPU."""
    model = tiny_fp8_model()
    h = F.rms_norm(torch.randn(64, 32), (32,))
    targets = torch.randint(0, 50257, (64,))

    def head_loss(h):
        return F.cross_entropy(model.head(h), targets)

    results = []
    for fn in (head_loss, torch.compile(head_loss, dynamic=False)):
        model.zero_grad()
        x = h.clone().requires_grad_()
        loss = fn(x)
        loss.backward()
        results.append((loss.detach(), x.grad, model.lm_head.weight.grad.clone()))
    (loss_e, gx_e, gw_e), (loss_c, gx_c, gw_c) = results
    assert torch.isfinite(loss_c) and loss_c.item() == pytest.approx(loss_e.item(), rel=1e-3)
    # same fp8 ops in both; inductor may round the softcap's fp32 math in another order (a few ulps)
    assert rel(gx_c, gx_e) < 1e-2 and rel(gw_c, gw_e) < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="FP8 _scaled_mm kernels need a Hopper (sm90+) GPU")
def test_compiled_model_with_fp8_head_on_cuda():
    model = tiny_fp8_model().cuda()
    seq = torch.randint(0, 50000, (129,), device="cuda")
    seq[[0, 30]] = tg.EOT_ID
    w = torch.tensor(2, dtype=torch.int32, device="cuda")
    # block_size 16 is fine for the dense (SDPA) masks; the full compiled graph holds the FP8 custom ops
    loss = torch.compile(model, dynamic=False)(seq[:64], seq[1:65], w, True)
    loss.backward()
    assert torch.isfinite(loss) and model.lm_head.weight.grad.isfinite().all()


T_SPEEDRUN, ROWS, DIM, VOCAB = 48 * 1024, 64, 128, 50304


def head_gradients(scales, grad_accum, fp8):
    """Gradients of the speedrun loss (softcap, cross-entropy, mean over T = 49,152 tokens, divided by
    grad_accum) with respect to the head's input and weight, for ROWS of those tokens. The logit gradients
    are (p - onehot) / (T * grad_accum), the magnitudes a real micro-step has: only ROWS rows are
    computed (the full (49,152, 50,304) product is 3.8 TFLOP, minutes on a CPU; every row is quantised
    with the same fixed scale, so rows do not interact). DIM 128 instead of 768: the inner dimension
    does not change the gradient magnitudes the scales must hold, only the cost."""
    g = torch.Generator().manual_seed(0)
    h = F.rms_norm(torch.randn(ROWS, DIM, generator=g), (DIM,)).bfloat16()
    # logits with std ~0.8 around the softcap's centre: p spread over ~1e-5 .. 1e-4 as early in training
    w = torch.randn(VOCAB, DIM, generator=g) * (0.8 / DIM ** 0.5)
    targets = torch.randint(0, 50257, (ROWS,), generator=g)
    lin = tg.CastedLinear(DIM, VOCAB, use_fp8=fp8, x_s=scales[0], w_s=scales[1], grad_s=scales[2])
    with torch.no_grad():
        lin.weight.copy_(w)
    x = (h.clone() if fp8 else h.float()).requires_grad_()  # reference: the bf16 head's math in fp32
    logits = 30 * torch.sigmoid(lin(x).float() / 7.5)
    (F.cross_entropy(logits, targets, reduction="sum") / (T_SPEEDRUN * grad_accum)).backward()
    non_target = torch.ones(VOCAB, dtype=torch.bool)
    non_target[targets] = False
    return x.grad.float(), lin.weight.grad, non_target


@pytest.mark.parametrize("grad_accum", [1, 8], ids=["8gpu", "1gpu"])
def test_fp8_head_gradients_match_float_head_at_speedrun_scale(grad_accum):
    scales = tg.fp8_head_scales(T_SPEEDRUN, grad_accum)
    gx8, gw8, non_target = head_gradients(scales, grad_accum, fp8=True)
    gx, gw, _ = head_gradients(scales, grad_accum, fp8=False)
    # Independent per-element roundings (x, w in e4m3; the logit gradient in e5m2) add in quadrature:
    # rms sqrt(2 * 3.6%^2 + 7.2%^2) = 8.8% at worst per product, less after summing many products.
    # 0.12 leaves room; a scale that drops gradients into e5m2's subnormals/zero exceeds it by far.
    assert rel(gx8, gx) < 0.12
    assert rel(gw8, gw) < 0.12
    # Weight rows of tokens that are no target here get only the softmax's push-down gradient, the
    # part that underflows first: it must survive, in direction and in mass.
    assert rel(gw8[non_target], gw[non_target]) < 0.12
    mass = (gw8[non_target].abs().sum() / gw[non_target].abs().sum()).item()
    assert 0.9 < mass < 1.1


def test_scales_that_ignore_accumulation_lose_the_non_target_gradient():
    """Control: the next record's scales (divided: sqrt(768)/448, 24/448, 1/448), used with record 21's
    mean loss and 8-step accumulation, round the non-target logit gradients to zero; the test above
    would catch them."""
    scales = (448 / 768 ** 0.5, 448 / 24, 448.0)  # as multipliers
    gx8, gw8, non_target = head_gradients(scales, 8, fp8=True)
    gx, gw, _ = head_gradients(scales, 8, fp8=False)
    assert rel(gw8[non_target], gw[non_target]) > 0.5
