#!/usr/bin/env python
"""One SGSD optimizer step at a real model's size: the trainer's path against the published one.

    python benchmarks/bench_train_step.py --quick                     # CPU, under 3 min on 2 cores
    python benchmarks/bench_train_step.py --shape qwen3-1.7b --K 8 --T 1024 --dtype bf16  # CUDA

A random-init model of a named shape (``--model random:NAME`` of the trainer,
:data:`sgsd.engine.model.RANDOM_SHAPES`: Qwen3's published configs, or ``cpu``, a small
body on Qwen3's 151,936-row head) is loaded through the trainer's own ``load_policy``
(LoRA or full fine-tuning, gradient checkpointing), once per method from the same seed.
The batch is fixed: P problems of G rollouts, random prompt and completion ids of fixed
lengths from a seeded generator (no sampling, so runs compare); each problem has K teacher
contexts (a distinct random skill block before its prompt), shared by its G rollouts with
the same completion. Then one optimizer step, three (or four) ways, in one process,
interleaved round by round (medians over ``--repeats`` rounds after a warm-up round):

  published     the published code path: teacher log-probs from the model's full logits
                and ``log_softmax``; the student forward repeated once per teacher, each
                with its full ``[B, L, V]`` logits, ``log_softmax`` in fp32 and the gated
                loss of that teacher (``sgsd_kernels.reference``), backward per teacher
  ours-<backend> the trainer's ``sgsd.engine.scoring.forward_backward``: teacher scoring
                from hidden states in micro-batches (``linear_logprobs``), ONE student
                forward/backward per micro-batch, ``linear_gated_kd_loss`` on the teachers'
                log-probs, with ``kernel_backend`` torch, native (CPU) or triton (CUDA)

and each step ends with the trainer's gradient clip, AdamW and scheduler step. Per method:
wall time split into teacher scoring / student forward+loss+backward / optimizer, peak
memory, completion tokens per second and model-FLOP utilisation against a GEMM rate
measured in the same process. The step-0 loss and gradient norm of every ``ours`` row is
compared with ``published`` (same weights, same batch): a mismatch is reported in the row
and makes the exit status 2.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import math
import os
import shlex
import sys
import time
import traceback
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

#: ``--quick`` sizes on CPU: the ``cpu`` shape keeps the 151,936-row head; 2 problems × 1
#: rollout × 4 teachers × 64 completion tokens, 3 timed rounds.
QUICK_CPU = dict(shape="cpu", K=4, problems=2, G=1, T=64, prompt_len=32, skill_len=32, repeats=3)
DTYPES = {
    "auto": "auto",
    "fp32": "float32",
    "float32": "float32",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
}
#: Step-0 loss and gradient-norm agreement between ours and published (relative): fp32
#: differs only in summation order; in 16-bit the published path rounds its logits to the
#: model dtype before log_softmax, ours keeps them in fp32.
LOSS_TOL = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 2e-2}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shape", default=None, help="qwen3-0.6b | qwen3-1.7b | cpu (default: "
                   "cpu on CPU, qwen3-1.7b on CUDA)")  # fmt: skip
    p.add_argument("--vocab", type=int, default=None, help="vocabulary (default 151936)")
    p.add_argument("--K", type=int, default=None, help="teachers per rollout (default 8)")
    p.add_argument("--G", type=int, default=None, help="rollouts per problem (default 1)")
    p.add_argument("--problems", type=int, default=None, help="problems per step (default 4)")
    p.add_argument("--T", type=int, default=None, help="completion tokens (default 1024)")
    p.add_argument("--prompt-len", type=int, default=None, help="student prompt tokens (256)")
    p.add_argument("--skill-len", type=int, default=None,
                   help="teacher skill block before the prompt, tokens (default 256)")  # fmt: skip
    p.add_argument("--dtype", default="auto", choices=sorted(DTYPES),
                   help="model dtype (auto: bf16 on CUDA, fp32 on CPU, as the trainer)",
                   )  # fmt: skip
    ft = p.add_mutually_exclusive_group()
    ft.add_argument("--lora", dest="finetune", action="store_const", const="lora",
                    help="LoRA (the trainer's default: r 64, alpha 128)")  # fmt: skip
    ft.add_argument("--full", dest="finetune", action="store_const", const="full")
    p.set_defaults(finetune="lora")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                   default=False, help="recompute activations in backward (default off)",
                   )  # fmt: skip
    p.add_argument("--micro-batch-size", type=int, default=4, help="student rollouts per pass")
    p.add_argument("--teacher-micro-batch-size", type=int, default=8,
                   help="teacher sequences per no-grad forward")  # fmt: skip
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5)")
    p.add_argument("--quick", action="store_true",
                   help="small defaults (CPU: the cpu shape, K 4, T 64, 3 rounds; under 3 min "
                   "on 2 cores)")  # fmt: skip
    p.add_argument("--methods", default=None,
                   help="comma list from published,ours-torch,ours-native,ours-triton "
                   "(default: published, ours-torch and the device's own backend)")  # fmt: skip
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="", help="a line for the table's header (e.g. the load)")
    p.add_argument("--out", default=os.path.join(HERE, "out"), help="directory for CSV and md")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the table's command line
    return args


def resolve_sizes(args, cuda: bool) -> None:
    """Fill the sizes the user left out: ``--quick`` on CPU, else the GPU-sized defaults."""
    quick = QUICK_CPU if (args.quick and not cuda) else {}
    full = dict(shape="qwen3-1.7b" if cuda else "cpu", K=8, problems=4, G=1, T=1024,
                prompt_len=256, skill_len=256, repeats=3 if args.quick else 5)  # fmt: skip
    for key, value in full.items():
        if getattr(args, key) is None:
            setattr(args, key, quick.get(key, value))
    for key in ("K", "G", "problems", "T", "prompt_len", "skill_len", "repeats"):
        if getattr(args, key) < 1:
            raise SystemExit(f"bench_train_step.py: --{key.replace('_', '-')} must be >= 1")


# ----------------------------------------------------------------------------- setup
@dataclass
class Method:
    name: str
    backend: str | None  # the kernel backend of an "ours" row; None: published
    status: str = "ok"
    note: str = ""
    objs: dict = field(default_factory=dict)  # policy, optimizer, scheduler, params, cfg
    samples: list = field(default_factory=list)  # per timed round: phase times, peak
    step0: dict = field(default_factory=dict)  # loss and grad norm of the warm-up step


def model_spec(args) -> str:
    return f"random:{args.shape}" + (f":{args.vocab}" if args.vocab else "")


def train_config(args, backend: str):
    from sgsd.config import TrainConfig

    return TrainConfig(
        model=model_spec(args),
        finetune=args.finetune,
        dtype=DTYPES[args.dtype],
        gradient_checkpointing=args.gradient_checkpointing,
        num_teachers=args.K,
        rollouts_per_problem=args.G,
        problems_per_step=args.problems,
        micro_batch_size=args.micro_batch_size,
        teacher_micro_batch_size=args.teacher_micro_batch_size,
        max_completion_tokens=args.T,
        kernel_backend=backend,
        # A random model's teachers barely differ from the student, so every support
        # score would fall inside the paper's ε = 0.05, every polarity be 0 and the loss
        # 0: with ε = 0 every teacher counts, and the step-0 check compares real values.
        confidence_threshold=0.0,
    )


def build(m: Method, args, device, backend_for_cfg: str) -> None:
    """The trainer's policy (``load_policy``), optimizer and scheduler for one method."""
    import torch

    from sgsd.engine.model import load_policy
    from sgsd.engine.optim import build_optimizer, build_scheduler
    from sgsd.methods import build_method

    cfg = train_config(args, backend_for_cfg)
    torch.manual_seed(args.seed)  # the same LoRA init for every method
    policy, tokenizer, _ = load_policy(cfg, device)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, params)
    m.objs = dict(
        cfg=cfg,
        policy=policy,
        tokenizer=tokenizer,
        params=params,
        optimizer=optimizer,
        scheduler=build_scheduler(cfg, optimizer),
        strategy=build_method(cfg),
    )


def make_rollouts(args, strategy, tokenizer, vocab: int):
    """The fixed batch: P problems × G rollouts, K teacher contexts per problem."""
    import torch

    from sgsd.engine.scoring import Rollout

    gen = torch.Generator().manual_seed(args.seed + 1)

    def ids(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    rollouts = []
    for p in range(args.problems):
        prompt = ids(args.prompt_len)
        teachers = [(ids(args.skill_len) + prompt, 1.0 / args.K) for _ in range(args.K)]
        for g in range(args.G):
            completion = ids(args.T)
            rollouts.append(
                Rollout(
                    problem=None,
                    prompt_ids=prompt,
                    completion_ids=completion,
                    token_mask=strategy.token_mask(tokenizer, completion),
                    reward=1.0 if (p * args.G + g) % 2 == 0 else -1.0,  # half right
                    predicted=None,
                    teachers=teachers,
                )
            )
    strategy.prepare(rollouts)
    return rollouts


# ----------------------------------------------------------------------------- published
def published_teacher_logprobs(policy, rollouts, K, t_max, cfg, pad_id, device):
    """``[B, K, T]`` teacher log-probs the published way: the model's full logits (every
    position, the model dtype), gathered at the completion, ``log_softmax`` in fp32."""
    import torch

    from sgsd.engine.sequences import gather_positions, sequences_batch
    from sgsd_kernels import reference

    out = torch.zeros((len(rollouts), K, t_max), dtype=torch.float32, device=device)
    jobs = [(b, k, t) for b, r in enumerate(rollouts) for k, (t, _) in enumerate(r.teachers[:K])]
    size = cfg.teacher_micro_batch_size
    with torch.no_grad():
        for chunk in (jobs[lo : lo + size] for lo in range(0, len(jobs), size)):
            comps = [rollouts[b].completion_ids for b, _, _ in chunk]
            prefixes = [j[2] for j in chunk]
            ids, attn, pos, targets, _ = sequences_batch(prefixes, comps, pad_id, device)
            logits = policy.model(input_ids=ids, attention_mask=attn).logits
            lp = reference.logprobs_from_logits_ref(
                gather_positions(logits, pos), targets, cfg.logprob_temperature
            )
            del logits
            for row, (b, k, _) in enumerate(chunk):
                n = len(rollouts[b].completion_ids)
                out[b, k, :n] = lp[row, :n].float()
    return out


def published_forward_backward(policy, rollouts, u, cfg, pad_id, device) -> float:
    """The student forward once per teacher (full logits, fp32 ``log_softmax``), that
    teacher's gated loss (docs/design.md §3 is a sum over k, so the K losses add up to
    the whole), backward after each: one ``[n, L, V]`` logits graph alive at a time, the
    leanest the published path gets. Returns the loss (mean over rollouts)."""
    import torch

    from sgsd.engine.sequences import gather_positions, sequences_batch
    from sgsd_kernels import reference

    K, total, loss_sum = u.shape[1], len(rollouts), 0.0
    for lo in range(0, total, cfg.micro_batch_size):
        chunk = rollouts[lo : lo + cfg.micro_batch_size]
        ids, attn, pos, targets, valid = sequences_batch(
            [r.prompt_ids for r in chunk], [r.completion_ids for r in chunk], pad_id, device
        )
        mask = torch.zeros_like(valid)
        for b, r in enumerate(chunk):
            mask[b, : len(r.token_mask)] = torch.tensor(r.token_mask, dtype=torch.bool)
        mask &= valid
        rewards = torch.tensor([r.reward for r in chunk], dtype=torch.float32, device=device)
        weights = torch.tensor([[w for _, w in r.teachers[:K]] for r in chunk], device=device)
        for k in range(K):
            logits = policy.model(input_ids=ids, attention_mask=attn).logits
            s = reference.logprobs_from_logits_ref(
                gather_positions(logits, pos), targets, cfg.logprob_temperature
            )
            out = reference.gated_kd_ref(
                s.unsqueeze(1), u[lo : lo + len(chunk), k : k + 1], mask, rewards,
                weights[:, k : k + 1], cfg.gate_tau, cfg.clip_delta, cfg.confidence_threshold,
            )  # fmt: skip
            (out["loss"] * (len(chunk) / total)).backward()
            loss_sum += float(out["loss"].detach()) * len(chunk)
            del logits, s, out
    return loss_sum / total


# ----------------------------------------------------------------------------- one step
class TeacherTimer:
    """Times the trainer's own ``teacher_logprobs`` inside ``forward_backward`` (the real
    function, called through a wrapper installed on its module for the benchmark)."""

    def __init__(self, sync):
        from sgsd.engine import scoring

        self.scoring, self.real = scoring, scoring.teacher_logprobs
        self.sync, self.seconds = sync, 0.0

    def __call__(self, *a, **kw):
        self.sync()
        t0 = time.perf_counter()
        try:
            return self.real(*a, **kw)
        finally:
            self.sync()
            self.seconds += time.perf_counter() - t0

    def __enter__(self):
        self.seconds = 0.0
        self.scoring.teacher_logprobs = self
        return self

    def __exit__(self, *exc):
        self.scoring.teacher_logprobs = self.real


def run_step(m: Method, rollouts, device, sync, meter) -> dict:
    """One optimizer step of ``m``: phase times (s), peak memory (bytes), loss, grad norm."""
    import torch

    from sgsd.engine.scoring import forward_backward

    o = m.objs
    cfg, policy, pad_id = o["cfg"], o["policy"], o["tokenizer"].pad_token_id
    o["optimizer"].zero_grad(set_to_none=True)
    meter.start()
    sync()
    t0 = time.perf_counter()
    if m.backend is None:
        u = published_teacher_logprobs(
            policy, rollouts, cfg.num_teachers, len(rollouts[0].completion_ids), cfg, pad_id, device
        )
        sync()
        t_teacher = time.perf_counter() - t0
        loss = published_forward_backward(policy, rollouts, u, cfg, pad_id, device)
        del u
    else:
        with TeacherTimer(sync) as timer:
            loss, _ = forward_backward(policy, policy, o["strategy"], rollouts, cfg, pad_id, device)
        t_teacher = timer.seconds
    sync()
    t1 = time.perf_counter()
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    norm = float(torch.nn.utils.clip_grad_norm_(o["params"], max_norm))
    o["optimizer"].step()
    o["scheduler"].step()
    sync()
    t2 = time.perf_counter()
    return {
        "teacher": t_teacher,
        "student": (t1 - t0) - t_teacher,
        "optimizer": t2 - t1,
        "step": t2 - t0,
        "peak": meter.peak(),
        "loss": loss,
        "grad_norm": norm,
    }


# ----------------------------------------------------------------------------- accounting
def step_flops(args, vocab: int, shape: dict) -> float:
    """Useful model FLOPs of one step, the same for every method: K teacher forwards per
    rollout (LM head at the completion positions only), one student forward and backward
    (weight gradients only where they train: LoRA's are negligible, ``--full`` doubles the
    backward's matmuls, the tied head included). Not counted: gradient-checkpointing
    recompute and the published path's K-fold student and full-sequence logits."""
    H, L, mlp = shape["hidden_size"], shape["num_hidden_layers"], shape["intermediate_size"]
    nh, nkv, hd = shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"]
    body = L * (H * hd * (nh + 2 * nkv) + nh * hd * H + 3 * H * mlp)  # matmul parameters

    def fwd(seq: int) -> float:  # body matmuls + causal attention (QKᵀ and AV)
        return 2 * body * seq + L * 4 * nh * hd * seq * seq / 2

    head = 2 * vocab * H * args.T
    B = args.problems * args.G
    full = args.finetune == "full"
    teacher = B * args.K * (fwd(args.skill_len + args.prompt_len + args.T) + head)
    s_len = args.prompt_len + args.T
    attn = L * 4 * nh * hd * s_len * s_len / 2
    student = B * (fwd(s_len) + 2 * body * s_len * (2 if full else 1) + 2 * attn)
    student += B * head * (3 if full else 2)
    return teacher + student


def gemm_seconds(torch, device, dtype, sync, n: int) -> float:
    """One ``n×n @ n×n`` matmul into a preallocated output, seconds (best of 3)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=c)
    best = math.inf
    for _ in range(3):
        sync()
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def pct(xs):
    from sgsd_bench.measure import percentiles

    return percentiles(xs) if xs else None


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    t_begin = time.perf_counter()
    import torch

    from sgsd.engine.model import QWEN3_VOCAB, RANDOM_SHAPES
    from sgsd_bench import env
    from sgsd_bench.measure import MemMeter
    from sgsd_bench.report import fmt_bytes, fmt_ms
    from sgsd_kernels import runtime

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench_train_step.py: --device cuda, but this torch sees no CUDA device")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    resolve_sizes(args, cuda)
    if args.shape not in RANDOM_SHAPES:
        raise SystemExit(f"bench_train_step.py: --shape: one of {', '.join(RANDOM_SHAPES)}")
    vocab = args.vocab or QWEN3_VOCAB
    shape = RANDOM_SHAPES[args.shape]

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def log(msg: str) -> None:
        stamp = f"[train-step {time.perf_counter() - t_begin:6.1f}s]"
        print(stamp, msg, file=sys.stderr, flush=True)

    own = "ours-triton" if cuda else "ours-native"
    names = args.methods.split(",") if args.methods else ["published", "ours-torch", own]
    known = ("published", "ours-torch", "ours-native", "ours-triton")
    if any(n not in known for n in names):
        raise SystemExit(f"bench_train_step.py: --methods: a comma list from {','.join(known)}")
    auto = runtime.resolve_backend("auto", device)
    methods = [Method(n, None if n == "published" else n.split("-", 1)[1]) for n in names]
    for m in methods:
        if m.backend == "native" and cuda:
            m.status, m.note = "n/a", "the native backend is CPU-only"
        elif m.backend == "triton" and not cuda:
            m.status, m.note = "n/a", "the triton backend needs CUDA"
        elif m.backend == "native":
            from sgsd_kernels import native

            if not native.is_built():
                m.status = "n/a"
                m.note = "native extension not built (python -m sgsd_kernels.native build)"
    log(f"{model_spec(args)} on {device}, {args.finetune}, K={args.K}, problems="
        f"{args.problems}, G={args.G}, T={args.T}; methods {','.join(names)}; auto backend "
        f"here: {auto}")  # fmt: skip

    # Build every method's model first (same seed, same weights), then the batch.
    from sgsd.engine.model import resolve_dtype

    failed = False
    for m in methods:
        if m.status == "ok":
            build(m, args, device, m.backend or "torch")
            log(f"built {m.name}")
    ready = [m for m in methods if m.status == "ok"]
    if not ready:
        raise SystemExit("bench_train_step.py: no method can run here")
    first = ready[0].objs
    model_dtype = resolve_dtype(first["cfg"], device)
    rollouts = make_rollouts(args, first["strategy"], first["tokenizer"], vocab)
    meter = MemMeter(device)
    gemm_n = 8192 if cuda else 2048
    gemm_best = gemm_seconds(torch, device, model_dtype, sync, gemm_n)
    flops = step_flops(args, vocab, shape)

    # Round 0 is the warm-up (allocator, optimizer state, kernel builds) and the step-0
    # check; the method order rotates each round so that none always runs first.
    for rnd in range(args.repeats + 1):
        order = ready[rnd % len(ready) :] + ready[: rnd % len(ready)]
        for m in order:
            if m.status != "ok":
                continue
            try:
                res = run_step(m, rollouts, device, sync, meter)
            except torch.OutOfMemoryError as e:
                m.status, m.note = "OOM", str(e).split("\n")[0][:160]
                m.objs["optimizer"].zero_grad(set_to_none=True)
                if cuda:
                    torch.cuda.empty_cache()
                log(f"{m.name}: OOM")
                continue
            except Exception as e:  # noqa: BLE001 - reported in the row and the exit status
                traceback.print_exc()
                m.status, m.note, failed = "error", f"{type(e).__name__}: {e}"[:200], True
                continue
            if rnd == 0:
                m.step0 = {"loss": res["loss"], "grad_norm": res["grad_norm"]}
            else:
                m.samples.append(res)
            log(f"round {rnd} {m.name}: step {1e3 * res['step']:.0f} ms (teacher "
                f"{1e3 * res['teacher']:.0f}, student {1e3 * res['student']:.0f}, optimizer "
                f"{1e3 * res['optimizer']:.0f}), peak {fmt_bytes(res['peak'])} MiB, "
                f"loss {res['loss']:.6g}")  # fmt: skip
        gemm_best = min(gemm_best, gemm_seconds(torch, device, model_dtype, sync, gemm_n))
    gemm_rate = 2 * gemm_n**3 / gemm_best

    # Rows.
    pub = next((m for m in methods if m.name == "published" and m.samples), None)
    tol = LOSS_TOL[str(model_dtype).removeprefix("torch.")]
    mismatch = False
    rows = []
    for m in methods:
        row = {"method": m.name, "backend": m.backend or "reference (eager)",
               "auto": m.backend == auto, "status": m.status, "note": m.note}  # fmt: skip
        if m.samples:
            step = pct([1e3 * s["step"] for s in m.samples])
            row.update(
                step_ms=step,
                teacher_ms=pct([1e3 * s["teacher"] for s in m.samples]),
                student_ms=pct([1e3 * s["student"] for s in m.samples]),
                optimizer_ms=pct([1e3 * s["optimizer"] for s in m.samples]),
                peak_bytes=max(s["peak"] for s in m.samples),
                tokens_per_s=args.problems * args.G * args.T / (step[1] / 1e3),
                model_flops_per_s=flops / (step[1] / 1e3),
                mfu=flops / (step[1] / 1e3) / gemm_rate,
            )
        if m.step0:
            row["loss_step0"], row["grad_norm_step0"] = m.step0["loss"], m.step0["grad_norm"]
        if pub is not None and m is not pub and m.step0 and pub.step0:
            errs = [
                abs(m.step0[k] - pub.step0[k]) / max(abs(pub.step0[k]), 1e-12)
                for k in ("loss", "grad_norm")
            ]
            row["loss_rel_err"] = max(errs)
            row["loss_check"] = "ok" if max(errs) <= tol else "MISMATCH"
            mismatch |= row["loss_check"] != "ok"
        if pub is not None and m.samples and m is not pub:
            row["speedup_vs_published"] = pub_step(pub) / row["step_ms"][1]
            row["mem_ratio_vs_published"] = max(s["peak"] for s in pub.samples) / max(
                row["peak_bytes"], 1
            )
        rows.append(row)

    meta = env.run_meta(args.shape, str(device), str(model_dtype).removeprefix("torch."))
    meta["timestamp"] = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    elapsed = time.perf_counter() - t_begin
    setup = dict(
        shape=args.shape, vocab=vocab, hidden=shape["hidden_size"],
        layers=shape["num_hidden_layers"], K=args.K, problems=args.problems, G=args.G,
        T=args.T, prompt_len=args.prompt_len, teacher_len=args.skill_len + args.prompt_len,
        dtype=meta["dtype"], device=meta["device"], finetune=args.finetune,
        gradient_checkpointing=args.gradient_checkpointing, repeats=args.repeats,
        gemm_flops_per_s=gemm_rate, step_flops=flops, timestamp=meta["timestamp"],
        version=meta["version"], torch=meta["torch"],
    )  # fmt: skip
    table = markdown(rows, setup, meta, args, tol, fmt_ms, fmt_bytes, elapsed, cuda)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    tag = "cuda" if cuda else "cpu"
    prefix = os.path.join(args.out, f"train-step_{args.shape}_{meta['dtype']}_{tag}")
    with open(prefix + ".md", "w") as f:
        f.write(table)
    write_csv(prefix + ".csv", rows, setup)
    log(f"wrote {prefix}.csv, {prefix}.md in {elapsed:.0f} s")
    if failed:
        return 1
    return 2 if mismatch else 0


def pub_step(pub: Method) -> float:
    return pct([1e3 * s["step"] for s in pub.samples])[1]


CSV_FIELDS = (
    "method", "backend", "auto", "status", "note", "shape", "vocab", "hidden", "layers", "K",
    "problems", "G", "T", "prompt_len", "teacher_len", "dtype", "device", "finetune",
    "gradient_checkpointing", "repeats", "step_ms_p20", "step_ms_p50", "step_ms_p80",
    "teacher_ms_p50", "student_ms_p50", "optimizer_ms_p50", "peak_bytes", "tokens_per_s",
    "step_flops", "model_flops_per_s", "gemm_flops_per_s", "mfu", "speedup_vs_published",
    "mem_ratio_vs_published", "loss_step0", "grad_norm_step0", "loss_rel_err", "loss_check",
    "timestamp", "version", "torch",
)  # fmt: skip


def write_csv(path: str, rows: list[dict], setup: dict) -> None:
    """One record per method (wide: every phase and ratio in its own column)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            rec = {k: v for k, v in {**setup, **r}.items() if k in CSV_FIELDS}
            for phase in ("step", "teacher", "student", "optimizer"):
                t = r.get(f"{phase}_ms")
                if t:
                    if phase == "step":
                        rec["step_ms_p20"], rec["step_ms_p80"] = t[0], t[2]
                    rec[f"{phase}_ms_p50"] = t[1]
            w.writerow(rec)


def markdown(rows, setup, meta, args, tol, fmt_ms, fmt_bytes, elapsed, cuda) -> str:
    unit, scale = ("TFLOP/s", 1e12) if cuda else ("GFLOP/s", 1e9)

    def f(v, spec="{:.2f}"):
        return "—" if v is None else spec.format(v)

    def p50(t):
        return "—" if not t else (f"{t[1]:.0f}" if t[1] >= 100 else f"{t[1]:.1f}")

    cmd = shlex.join(["python", "benchmarks/bench_train_step.py", *args.argv])
    out = [
        f"### One SGSD optimizer step, random-init `{setup['shape']}` (H {setup['hidden']}, "
        f"{setup['layers']} layers, V {setup['vocab']:,}) on {meta['device']} — {meta['dtype']}, "
        f"{meta['version']}, torch {meta['torch']}, {meta['timestamp']}",
        "",
        f"{setup['problems']} problems × G {setup['G']} rollouts, K {setup['K']} teachers, "
        f"T {setup['T']} completion tokens, student prompt {setup['prompt_len']}, teacher "
        f"context {setup['teacher_len']} tokens; {setup['finetune']}, gradient checkpointing "
        f"{'on' if setup['gradient_checkpointing'] else 'off'}, micro-batches "
        f"{args.micro_batch_size} (student) / {args.teacher_micro_batch_size} (teacher); "
        f"{setup['repeats']} timed rounds after a warm-up, methods interleaved. GEMM "
        f"yardstick ({'8192' if cuda else '2048'}² matmul, {meta['dtype']}, best sample): "
        f"{setup['gemm_flops_per_s'] / scale:.1f} {unit}; useful work "
        f"{setup['step_flops'] / 1e9:.1f} GFLOP per step.",
        "",
        f"Command: `{cmd}`",
        "",
        "| method | kernels | step ms (p50 [p20, p80]) | teacher scoring ms | student fwd+loss+bwd "
        "ms | optimizer ms | peak MiB | tokens/s | MFU % | × vs published | mem ÷ vs "
        "published | step-0 loss (rel. err vs published) | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kern = r["backend"] + (" (auto)" if r["auto"] else "")
        status = r["status"] if r["status"] == "ok" else f"**{r['status']}**"
        if r["note"]:
            status += f": {r['note']}"
        loss = f(r.get("loss_step0"), "{:.6g}")
        if r.get("loss_check"):
            mark = "" if r["loss_check"] == "ok" else " **MISMATCH**"
            loss += f" ({r['loss_rel_err']:.1e}{mark})"
        out.append(
            f"| {r['method']} | {kern} | {fmt_ms(r.get('step_ms'))} | {p50(r.get('teacher_ms'))} "
            f"| {p50(r.get('student_ms'))} | {p50(r.get('optimizer_ms'))} | "
            f"{fmt_bytes(r.get('peak_bytes'))} | {f(r.get('tokens_per_s'), '{:.0f}')} | "
            f"{f(r.get('mfu') and 100 * r['mfu'], '{:.1f}')} | "
            f"{f(r.get('speedup_vs_published'))} | {f(r.get('mem_ratio_vs_published'), '{:.1f}')} "
            f"| {loss} | {status} |"
        )
    mem = (
        "torch.cuda.max_memory_allocated after reset, above the memory allocated at the "
        "step's start"
        if cuda
        else "the process's RSS high-water mark (reset through /proc/self/clear_refs before "
        "each step, MALLOC_MMAP_THRESHOLD_=65536 so that freed blocks leave RSS) above RSS at "
        "the step's start"
    )
    out += [
        "",
        "Phase columns: the median of each phase on its own (they need not add up to the "
        f"step's median). Peak MiB: {mem}; the max over the timed steps of that method "
        "(its own, although all "
        "methods share the process: each step starts from a reset peak). tokens/s: completion "
        f"tokens trained per second. MFU: useful model FLOPs per step "
        "(K teacher forwards with the head at the completion positions, one student forward "
        "and backward; no recompute, not the published path's extra passes) ÷ median step "
        f"time ÷ the GEMM yardstick. Step-0 loss: the warm-up step on the same weights and "
        f"batch; rel. err = worst of loss and gradient norm against published (tolerance "
        f"{tol:g}). Kernels `(auto)`: what the trainer's `kernel_backend=auto` runs here.",
        "",
        f"Wall time of this run: {elapsed:.0f} s.",
        "",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    # RSS follows the live tensors only when glibc returns freed blocks >= 64 KiB to the OS:
    # set before the first allocation, so re-run this interpreter with it (CPU peaks).
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]])
    sys.path.insert(0, REPO)  # sgsd and sgsd_kernels from this checkout
    sys.exit(main())
