"""Text completion with a model trained by train_gpt.py (a record folder holding checkpoint.pt).

    python train_gpt.py --preset=cpu_mamba2 --save_checkpoint=final --run_name=m2
    python generate.py records/<the m2 record> --prompt "The devil is" --max_new_tokens=60
    python generate.py records/<the m2 record>            # interactive: one prompt per line from stdin

The prompt is read as a new document (EOT, then its GPT-2 tokens) one token at a time, then the completion is
sampled and printed as it comes. Every layer decodes one token per step from a cache: attention layers keep the
keys and values of every position (memory grows with the length), Mamba and Mamba2 layers keep their conv and
SSM states (the same size at any length). Sampling stops at <|endoftext|> or after --max_new_tokens.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_gpt as tg  # noqa: E402
from data.shards import EOT_ID  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a record folder holding checkpoint.pt, or the checkpoint file")
    p.add_argument("--prompt", help="complete this text and exit (without it: read prompts from stdin, one a line)")
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top_k", type=int, default=50, help="0: no top-k cut")
    p.add_argument("--top_p", type=float, default=0.95, help="1: no nucleus cut")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (cuda when available)")
    p.add_argument("--stats", action="store_true", help="print tokens/s and the decoding state's size to stderr")
    args = p.parse_args(argv)
    for name, ok, want in (("max_new_tokens", args.max_new_tokens >= 1, ">= 1"),
                           ("temperature", args.temperature >= 0, ">= 0"), ("top_k", args.top_k >= 0, ">= 0"),
                           ("top_p", 0 < args.top_p <= 1, "in (0, 1]")):
        if not ok:
            p.error(f"--{name} must be {want}, got {getattr(args, name)}")
    return args


def sample(logits: torch.Tensor, generator: torch.Generator, temperature: float, top_k: int, top_p: float) -> int:
    """One token id from logits (vocab,): greedy at temperature 0, else softmax(logits / T) restricted to the
    top_k most likely and to the smallest set whose probability reaches top_p."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if 0 < top_k < logits.numel():
        logits[logits < torch.topk(logits, top_k).values[-1]] = float("-inf")
    if top_p < 1:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        sorted_logits[probs.cumsum(-1) - probs >= top_p] = float("-inf")  # keeps the first, always
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    probs = logits.softmax(-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))


class Utf8Stream:
    """Writes the text of token bytes as soon as it is whole UTF-8 (a character may span tokens)."""

    def __init__(self, out):
        self.out, self.pending = out, b""

    def write(self, data: bytes):
        self.pending += data
        for cut in range(len(self.pending), max(len(self.pending) - 4, -1), -1):
            try:
                text = self.pending[:cut].decode("utf-8")
            except UnicodeDecodeError:
                continue
            self.out.write(text)
            self.out.flush()
            self.pending = self.pending[cut:]
            return

    def close(self):
        self.out.write(self.pending.decode("utf-8", errors="replace"))
        self.out.flush()
        self.pending = b""


def state_bytes(state: tg.DecodeState) -> int:
    tensors = [t for layer in state.layers if layer is not None for t in layer]
    tensors += [t for t in (state.docs, state.tokens) if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def complete(model: tg.GPT, enc, prompt: str, args, generator: torch.Generator, out) -> tuple[int, float, int]:
    """Stream the completion of prompt to out; returns (new tokens, seconds, decoding state bytes)."""
    tokens = [EOT_ID] + enc.encode_ordinary(prompt)
    state = tg.DecodeState(model, len(tokens) + args.max_new_tokens)
    start = time.perf_counter()
    for t in tokens:
        logits = model.decode_step(t, state)
    stream, produced = Utf8Stream(out), 0
    for i in range(args.max_new_tokens):
        nxt = sample(logits[:model.a.vocab_size], generator, args.temperature, args.top_k, args.top_p)
        if nxt == EOT_ID:
            break
        stream.write(enc.decode_single_token_bytes(nxt))
        produced += 1
        if i + 1 < args.max_new_tokens:
            logits = model.decode_step(nxt, state)
    stream.close()
    return produced, time.perf_counter() - start, state_bytes(state)


def main(argv=None, stdin=None, out=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    stdin, out = stdin or sys.stdin, out or sys.stdout
    if args.device not in ("auto", "cpu", "cuda"):
        print(f"error: --device must be cpu, cuda or auto, got {args.device!r}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device=cuda but no CUDA device is available", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    try:
        ck = tg.load_checkpoint(args.checkpoint)
        model = tg.model_from_checkpoint(ck, device)
    except tg.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from data.shards import gpt2_encoding
    enc = gpt2_encoding()
    generator = torch.Generator().manual_seed(args.seed)
    interactive = args.prompt is None
    if interactive:
        print(f"{model.mixers} model from {ck['path']} (step {ck['step']}); one prompt per line, Ctrl-D ends",
              file=sys.stderr)
    prompts = [args.prompt] if not interactive else (line.rstrip("\n") for line in stdin)
    for prompt in prompts:
        out.write(prompt)
        n, seconds, size = complete(model, enc, prompt, args, generator, out)
        out.write("\n")
        out.flush()
        if args.stats:
            print(f"[{n} new tokens in {seconds:.2f} s ({n / seconds:.1f} tokens/s, prompt included in the time); "
                  f"decoding state {size / 2**10:.1f} KiB]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
