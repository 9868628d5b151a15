"""Benchmark: TopK SAE training throughput, jaxprobe (JAX) vs PyTorch peers, in one process.

Workload (Revelio's): d=1280, expansion 64 (m=81920 latents), k=32, batch 8192, float32, Adam,
normalised MSE, unit-norm decoder rows with the parallel gradient removed. Data are random
device-resident batches (a few, cycled), so every contender measures its training step, not I/O.

  single   one SAE: jaxprobe (dense and sparse decoder; top_k over whole rows or in 2048-latent chunks,
           the GPU default) against
           - torch:        a plain PyTorch TopK SAE written below (the same maths, eager, fused Adam)
           - overcomplete: overcomplete.sae.TopKSAE (PyPI `overcomplete`) + Adam, if importable
           - saelens:      SAELens' TopK training SAE (training_forward_pass + Adam), if importable
  stack    S SAEs (one per site; default 16): jaxprobe trains them in one jitted step (lax.map over
           groups of --saes-at-once SAEs, vmapped within a group) against S sequential runs of the
           torch peer (each built, trained --steps steps and freed in turn).

Throughput is tokens (input rows) per second over --steps timed steps after --warmup untimed ones
(compilation included in the warm-up). Ratios are jaxprobe / peer. Matmul precision is the same for
every contender (--precision tf32: TF32 tensor cores, the speed setting; fp32: full float32).
On a GPU, JAX is told not to preallocate, so the PyTorch peers have memory after it; the stack
workload needs ~3 GB per SAE for parameters and Adam state plus ~8 GB per SAE vectorised at once
(lower --saes-at-once, or --sites, if it runs out of memory).

  python scripts/bench_sae.py                      # GPU, the full workload
  python scripts/bench_sae.py --sites 16 --saes-at-once 2 --json bench_sae.json
  python scripts/bench_sae.py --smoke              # tiny shapes, CPU, < 1 min: proves the script runs
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
from collections.abc import Callable

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxprobe.sae.model import SAEConfig, init_stack, make_train_step  # noqa: E402


def timed(step: Callable[[int], None], sync: Callable[[], None], warmup: int, steps: int) -> float:
    """Seconds per step over `steps` calls after `warmup` untimed ones."""
    for i in range(warmup):
        step(i)
    sync()
    start = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    sync()
    return (time.perf_counter() - start) / steps


# --- jaxprobe ------------------------------------------------------------------------------------------


def bench_jax(n_saes: int, d: int, args, decoder: str, topk_chunk: int | None = None) -> float:
    config = SAEConfig(k=args.k, expansion=args.expansion, batch_size=args.batch, decoder=decoder, topk_chunk=topk_chunk,
                       saes_at_once=args.saes_at_once if n_saes > 1 else 0, warmup_steps=500)
    keys = jax.random.split(jax.random.key(0), args.bank)
    bank = [jax.random.normal(key, (n_saes, args.batch, d), jnp.float32) for key in keys]
    state = [init_stack(jax.random.key(1), jnp.zeros((n_saes, d)), jnp.ones(n_saes), config)]
    train_step = make_train_step(config)

    def step(i: int) -> None:
        state[0], _ = train_step(state[0], bank[i % len(bank)])

    try:
        return timed(step, lambda: jax.block_until_ready(state[0]), args.warmup, args.steps)
    finally:
        del state[0], bank
        gc.collect()


# --- PyTorch peers ---------------------------------------------------------------------------------------


def _torch():
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch, device


class TorchTopK:
    """The same maths as jaxprobe.sae.model, in plain eager PyTorch."""

    def __init__(self, d: int, m: int, k: int, lr: float, seed: int = 0):
        torch, device = _torch()
        gen = torch.Generator(device=device).manual_seed(seed)
        w_dec = torch.randn(m, d, device=device, generator=gen)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.w_enc = w_dec.T.clone().requires_grad_()
        self.w_dec = w_dec.requires_grad_()
        self.b_enc = torch.zeros(m, device=device, requires_grad=True)
        self.b_dec = torch.zeros(d, device=device, requires_grad=True)
        params = [self.w_enc, self.b_enc, self.w_dec, self.b_dec]
        self.opt = torch.optim.Adam(params, lr=lr, fused=device == "cuda")
        self.k, self.torch = k, torch

    def step(self, x) -> None:
        torch = self.torch
        pre = (x - self.b_dec) @ self.w_enc + self.b_enc
        values, indices = pre.topk(self.k, dim=-1)
        code = torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
        x_hat = code @ self.w_dec + self.b_dec
        loss = (x - x_hat).square().sum() / (x - x.mean(0)).square().sum()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            g = self.w_dec.grad
            g -= (g * self.w_dec).sum(-1, keepdim=True) * self.w_dec
            self.opt.step()
            self.w_dec /= self.w_dec.norm(dim=-1, keepdim=True)


def _nmse(torch, x, x_hat):
    return (x - x_hat).square().sum() / (x - x.mean(0)).square().sum()


class OvercompleteTopK:
    def __init__(self, d: int, m: int, k: int, lr: float):
        import matplotlib

        matplotlib.cm.get_cmap = matplotlib.colormaps.get_cmap  # overcomplete imports the removed name
        from overcomplete.sae import TopKSAE

        torch, device = _torch()
        self.sae = TopKSAE(d, nb_concepts=m, top_k=k, device=device)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=lr)
        self.torch = torch

    def step(self, x) -> None:
        _, _, x_hat = self.sae(x)
        loss = _nmse(self.torch, x, x_hat)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


class SAELensTopK:
    def __init__(self, d: int, m: int, k: int, lr: float):
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.saes.sae import TrainStepInput

        torch, device = _torch()
        self.sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=m, k=k, device=device, dtype="float32"))
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=lr)
        self.make_input = lambda x: TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None)

    def step(self, x) -> None:
        out = self.sae.training_forward_pass(self.make_input(x))
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        self.opt.step()


def bench_torch(peer: type, d: int, args, runs: int = 1) -> float:
    """Seconds per step of `runs` sequential trainings of one SAE each (the per-step mean)."""
    torch, device = _torch()
    total = 0.0
    for run in range(runs):
        gen = torch.Generator(device=device).manual_seed(run)
        bank = [torch.randn(args.batch, d, device=device, generator=gen) for _ in range(args.bank)]
        model = peer(d, args.expansion * d, args.k, 4e-4)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        total += timed(lambda i: model.step(bank[i % len(bank)]), sync, args.warmup, args.steps)
        del model, bank
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return total / runs


# --- the run ---------------------------------------------------------------------------------------------


def set_precision(precision: str) -> None:
    jax.config.update("jax_default_matmul_precision", "tensorfloat32" if precision == "tf32" else "float32")
    try:
        torch, _ = _torch()
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        torch.backends.cudnn.allow_tf32 = precision == "tf32"
    except ImportError:
        pass


def attempt(label: str, run: Callable[[], float], rows: list[dict], tokens_per_step: int, **extra) -> float | None:
    try:
        seconds = run()
    except Exception as err:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        rows.append({"contender": label, "ms_step": None, "tokens_s": None, "note": f"unavailable: {reason}", **extra})
        print(f"  {label}: unavailable ({reason})", flush=True)
        return None
    rows.append({"contender": label, "ms_step": seconds * 1e3, "tokens_s": tokens_per_step / seconds, "note": "",
                 **extra})
    print(f"  {label}: {seconds * 1e3:.2f} ms/step, {tokens_per_step / seconds:,.0f} tokens/s", flush=True)
    return tokens_per_step / seconds


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=1280)
    parser.add_argument("--expansion", type=int, default=64)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--sites", type=int, default=16, help="SAEs in the stack workload (0: skip it)")
    parser.add_argument("--saes-at-once", type=int, default=2, help="jaxprobe: SAEs vectorised together")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--bank", type=int, default=4, help="distinct device batches, cycled")
    parser.add_argument("--precision", choices=("tf32", "fp32"), default="tf32")
    parser.add_argument("--peers", default="torch,overcomplete,saelens")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: check the script on a CPU")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    if args.smoke:
        args.d, args.expansion, args.k, args.batch, args.sites, args.steps, args.warmup = 32, 4, 4, 256, 2, 3, 2
    set_precision(args.precision)
    peers = {"torch": TorchTopK, "overcomplete": OvercompleteTopK, "saelens": SAELensTopK}
    chosen = [p for p in args.peers.split(",") if p]
    device = jax.devices()[0]
    print(f"# TopK SAE training: d={args.d}, m={args.expansion * args.d}, k={args.k}, batch={args.batch}, "
          f"{args.precision}; JAX on {device.device_kind} ({jax.default_backend()})", flush=True)
    rows: list[dict] = []
    tokens = args.batch
    print("single SAE:")
    jax_dense = attempt("jaxprobe (dense decoder)", lambda: bench_jax(1, args.d, args, "dense"), rows, tokens,
                        workload="single")
    jax_sparse = attempt("jaxprobe (sparse decoder)", lambda: bench_jax(1, args.d, args, "sparse"), rows, tokens,
                         workload="single")
    decoder = "sparse" if (jax_sparse or 0) > (jax_dense or 0) else "dense"
    other_topk = 0 if jax.default_backend() == "gpu" else min(2048, args.expansion * args.d // 4)
    jax_topk = attempt(f"jaxprobe ({decoder} decoder, top_k chunk {other_topk or 'none'})",
                       lambda: bench_jax(1, args.d, args, decoder, other_topk), rows, tokens, workload="single")
    best_jax = max(filter(None, (jax_dense, jax_sparse, jax_topk)), default=None)
    topk_chunk = other_topk if (jax_topk or 0) > max(jax_dense or 0, jax_sparse or 0) else None
    peer_speed = {}
    for name in chosen:
        peer_speed[name] = attempt(name, lambda p=peers[name]: bench_torch(p, args.d, args), rows, tokens,
                                   workload="single")
    stack_jax = stack_peer = None
    if args.sites:
        print(f"{args.sites} SAEs:")
        # The peer first: JAX's allocator keeps the memory it grew to, and the stack needs the most.
        if "torch" in chosen:
            stack_peer = attempt(f"torch, {args.sites} sequential runs",
                                 lambda: bench_torch(TorchTopK, args.d, args, runs=args.sites), rows, tokens,
                                 workload=f"{args.sites} SAEs")
        stack_jax = attempt(f"jaxprobe, {args.sites} in one step (the best single setting, {args.saes_at_once} at once)",
                            lambda: bench_jax(args.sites, args.d, args, decoder, topk_chunk), rows, tokens * args.sites,
                            workload=f"{args.sites} SAEs")
    print()
    print("| workload | contender | ms/step | tokens/s | note |")
    print("|---|---|---:|---:|---|")
    for row in rows:
        ms = f"{row['ms_step']:.2f}" if row["ms_step"] else "-"
        tps = f"{row['tokens_s']:,.0f}" if row["tokens_s"] else "-"
        print(f"| {row['workload']} | {row['contender']} | {ms} | {tps} | {row['note']} |")
    print()
    for name, speed in peer_speed.items():
        print(f"single SAE, jaxprobe (best decoder) / {name}: {ratio(best_jax, speed)}  (target >= 1.5x)")
    if args.sites:
        print(f"{args.sites} SAEs, jaxprobe one step / torch sequential: {ratio(stack_jax, stack_peer)}  (target >= 3x)")
    if args.smoke:
        print("(--smoke: tiny shapes on a busy CPU; these figures only show that every path runs)")
    if args.json:
        meta = {"device": str(device.device_kind), "backend": jax.default_backend(), "jax": jax.__version__,
                "python": platform.python_version(), "args": vars(args)}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
