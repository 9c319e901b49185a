"""Peak memory and time of the loss over a large vocabulary: the chunked summed cross-entropy
(``dude_dist.loss.summed_cross_entropy``) against ``F.cross_entropy(logits.float())``.

    python benchmarks/loss_memory.py                      # Qwen2.5's vocabulary, 2048 tokens, bf16 (~30 s)
    python benchmarks/loss_memory.py --tokens 512 --vocab 32000 --dtype float32 --name loss_memory_f32
    python benchmarks/loss_memory.py --device cuda --name gpu_loss_memory   # on a GPU

Each way runs in a fresh process: logits ``[tokens, vocab]`` in ``--dtype`` that require a
gradient (standing in for the LM head's output), then the summed loss, its backward, and
the gradient. Results go to ``benchmarks/results/<--name>.{json,md}``. Measured: the process's peak resident memory above what it held once the logits
existed (``VmHWM`` after a reset, Linux; on CUDA ``torch.cuda.max_memory_allocated``
above the memory allocated then), and the median seconds of forward + backward over
``--repeats`` runs after one warm-up (on CUDA, synchronised before the clock is read). ``planned`` is the planner's figure for the loss
(``dude_dist.planner.logit_bytes``: logits and gradient, one float32 chunk) less the
logits themselves.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import mib, reset_peak_rss, status_bytes, wait_for_quiet, write_results  # noqa: E402

WAYS = ("chunked", "upcast")


def measure(way: str, tokens: int, vocab: int, dtype_name: str, repeats: int, device: str = "cpu") -> dict:
    """One way, in this process: peak bytes above the logits' and median seconds."""
    import torch
    import torch.nn.functional as F

    from dude_dist.loss import IGNORE_INDEX, summed_cross_entropy

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    cuda = device.startswith("cuda")
    logits = (3 * torch.randn(tokens, vocab, dtype=dtype)).to(device).requires_grad_(True)
    labels = torch.randint(0, vocab, (tokens,)).to(device)
    labels[: tokens // 3] = IGNORE_INDEX  # a prompt's share of positions

    def loss_fn() -> torch.Tensor:
        if way == "chunked":
            return summed_cross_entropy(logits, labels)
        return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")

    def once() -> float:
        logits.grad = None
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss_fn().backward()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    once()  # warm-up, outside the peak
    logits.grad = None
    if cuda:
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = status_bytes()["VmRSS"]
        reset_peak_rss()
    first = once()
    peak = (torch.cuda.max_memory_allocated() if cuda else status_bytes()["VmHWM"]) - base
    seconds = [first] + [once() for _ in range(repeats - 1)]
    return {"way": way, "peak_bytes": peak, "seconds": statistics.median(seconds),
            "logit_bytes": logits.numel() * logits.element_size()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=152064)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default="loss_memory", help="results file stem")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="wait up to this long for an idle CPU before each way")
    parser.add_argument("--worker", choices=WAYS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.vocab < 2 or args.repeats < 1:
        parser.error(f"--tokens >= 1, --vocab >= 2 and --repeats >= 1, got {args.tokens}, {args.vocab}, "
                     f"{args.repeats}")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        parser.error(f"--device is cpu or cuda[:N], got {args.device!r}")
    if args.worker:
        print(json.dumps(measure(args.worker, args.tokens, args.vocab, args.dtype, args.repeats, args.device)))
        return 0
    try:
        return compare(args)
    except KeyboardInterrupt:
        print("interrupted; no results written", file=sys.stderr)
        return 130


def compare(args: argparse.Namespace) -> int:
    from dude_dist.loss import LOSS_CHUNK_ELEMENTS
    from dude_dist.planner import logit_bytes

    records = []
    for way in WAYS:
        wait_for_quiet(timeout=args.wait_quiet)
        cmd = [sys.executable, __file__, "--worker", way, "--tokens", str(args.tokens), "--vocab", str(args.vocab),
               "--dtype", args.dtype, "--repeats", str(args.repeats), "--device", args.device]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            print(f"error: the {way} loss failed (exit {done.returncode}): {tail}", file=sys.stderr)
            return 1
        records.append(json.loads(done.stdout.strip().splitlines()[-1]))
    chunked, upcast = (next(r for r in records if r["way"] == way) for way in WAYS)
    logits = args.tokens * args.vocab
    planned = logit_bytes(args.tokens, args.vocab, chunked["logit_bytes"] // logits) - chunked["logit_bytes"]
    rows = [[r["way"], mib(r["peak_bytes"]), round(r["peak_bytes"] / r["logit_bytes"], 2),
             mib(planned) if r["way"] == "chunked" else "—", round(r["seconds"], 3),
             round(upcast["seconds"] / r["seconds"], 2)] for r in records]
    columns = ["loss", "peak above the logits MiB", "× the logits", "planned MiB (the same)", "fwd+bwd s", "speed × upcast"]
    write_results(args.name, title=f"Loss memory: {args.tokens} tokens × {args.vocab} vocabulary, {args.dtype}"
                  + ("" if args.device == "cpu" else f", {args.device}"), device=args.device,
                  settings=vars(args) | {"chunk_elements": LOSS_CHUNK_ELEMENTS}, records=records,
                  tables={"": (columns, rows)},
                  notes=["chunked: dude_dist.loss.summed_cross_entropy (what training uses); upcast: "
                         "F.cross_entropy(logits.float(), reduction='sum').",
                         "peak: " + ("torch.cuda.max_memory_allocated above the memory allocated"
                                     if args.device.startswith("cuda") else "VmHWM above the resident memory")
                         + " once the logits existed, so it counts the gradient and everything the loss made; "
                         "one process per way."])
    return 0


if __name__ == "__main__":
    sys.exit(main())
