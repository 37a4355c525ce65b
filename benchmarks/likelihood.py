"""PF-ODE likelihood: difftime's default solve against the score_sde approach at the same accuracy.

The peer is a transcription of score_sde's likelihood.py: scipy solve_ivp RK45 in t on the flattened
state, tensors moved to numpy at every evaluation, drift and divergence from separate network
calls. Both use the same network, data, dequantization and Rademacher probe (fixed for the solve).
Accuracy is each solve's largest per-example |bits/dim| difference from a tight reference solve
(float64 copy of the network, difftime's dopri5 in log-SNR at --ref-tol, the same probe; cached
in benchmarks/.cache). The peer runs down the ladder --peer-tols (loosest first) until it is as
accurate as ours and has run at difftime's default tolerance. Three comparisons come of it:
  - equal error, the headline: the peer's wall time at exactly our error, log time interpolated
    linearly in log error between the two ladder steps that bracket it (``equal_error_wall``), so
    the ratio neither flatters ours (a step far more accurate than needed) nor the peer;
  - the first ladder step at least as accurate as ours (a bound: the peer at equal or better accuracy);
  - the same nominal tolerance, 1e-5 for both (score_sde's own default), with both errors, which
    is what a reader comparing defaults sees.

Two cases: the digits preset model (8x8, 16 test digits), and a 28x28 U-Net of the MNIST CPU size
(unet ch 32, ch_mult [1,2,2], 1 residual block; --run28 for a trained run, otherwise seeded random
weights) on MNIST-shaped inputs. Also measured: NFE and network rows of each, difftime's time per
NFE against a bare forward-plus-VJP loop on the very inputs the solve evaluated, and per-example
against batch-wide error control. On digits, the accuracy gate of the solver alone: the default
solve with the exact divergence against a float64 exact-divergence reference (--n-exact digits;
no probe noise enters, and this reference takes about an hour at one thread the first time).

    python benchmarks/likelihood.py [--run RUN] [--n 16] [--run28 RUN] [--n28 8] [--skip28]
    python benchmarks/likelihood.py --rescore benchmarks/results/likelihood.json   # re-report stored ladders
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from common import CACHE, digits_run, row, standalone
from scipy import integrate

from difftime.likelihood import ode_flow

PEER_TOLS = (1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 3e-7)
DEFAULT_TOL = 1e-5  # difftime's default rtol = atol of the PF-ODE solve, and score_sde's likelihood default


def log_standard_normal(x: torch.Tensor) -> torch.Tensor:
    return -0.5 * x.flatten(1).double().pow(2).sum(1) - 0.5 * x[0].numel() * math.log(2 * math.pi)


def to_bpd(log_p: torch.Tensor, d: int) -> torch.Tensor:
    """-log p / (d ln 2): bits/dim up to the dequantization offset, which cancels in every difference."""
    return -log_p.double() / (d * math.log(2))


def probability_flow_drift(model, sde, x, t):
    eps_hat = model(x, t).to(x.dtype)
    return sde.alpha(t)[:, None, None, None] * x + (0.5 * sde.g2(t) / sde.sigma(t))[:, None, None, None] * eps_hat


def score_sde_style(model, sde, x, T, eps, probe, rtol, atol):
    """A faithful transcription of score_sde's likelihood.py loop, with its numpy round trips."""
    shape = x.shape
    nfe = 0

    def drift_fn(sample, t):
        with torch.no_grad():
            return probability_flow_drift(model, sde, sample, t)

    def div_fn(sample, t):
        with torch.enable_grad():
            sample = sample.detach().requires_grad_(True)
            fn_eps = torch.sum(probability_flow_drift(model, sde, sample, t) * probe)
            grad = torch.autograd.grad(fn_eps, sample)[0]
        return torch.sum(grad * probe, dim=tuple(range(1, len(shape))))

    def ode_func(t, state):
        nonlocal nfe
        nfe += 1
        sample = torch.from_numpy(state[: -shape[0]].reshape(shape)).float()
        vec_t = torch.ones(shape[0]) * t
        drift = drift_fn(sample, vec_t).numpy().reshape(-1)
        logp_grad = div_fn(sample, vec_t).numpy().reshape(-1)
        return np.concatenate([drift, logp_grad], axis=0)

    init = np.concatenate([x.numpy().reshape(-1), np.zeros(shape[0])], axis=0)
    solution = integrate.solve_ivp(ode_func, (eps, T), init, rtol=rtol, atol=atol, method="RK45")
    zp = solution.y[:, -1]
    z = torch.from_numpy(zp[: -shape[0]].reshape(shape)).float()
    delta_logp = torch.from_numpy(zp[-shape[0]:]).double()
    return log_standard_normal(z) + delta_logp, nfe


class Recorded(torch.nn.Module):
    """The network, recording the inputs (x, t) of every call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.inputs = model, []

    def forward(self, x, t):
        self.inputs.append((x.detach().clone(), t.detach().clone()))
        return self.model(x, t)


def bare_forward_vjp(model, inputs, probe) -> float:
    """Wall seconds of a bare loop: forward pass plus one VJP with the probe, over the given inputs."""
    start = time.perf_counter()
    for x, t in inputs:
        xg = x.requires_grad_(True)
        eps_hat = model(xg, t)
        torch.autograd.grad(eps_hat, xg, probe[: len(x)])
    return time.perf_counter() - start


def reference(model, sde, x, tol: float, probe_seed: int | None = None) -> torch.Tensor:
    """log p from a float64 solve at ``tol``, cached by network, data and settings: with the
    Rademacher probe of ``probe_seed`` (fixed for the solve), or with the exact divergence (None).

    Dormand-Prince 5(4) in log-SNR: another pair and another variable than the default it checks."""
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256()
    for name, value in model.state_dict().items():
        key.update(name.encode())
        key.update(value.detach().cpu().double().numpy().tobytes())
    key.update(x.double().numpy().tobytes())
    key.update(f"{'exact' if probe_seed is None else probe_seed} {tol} {sde!r}".encode())
    path = CACHE / "likelihood-reference" / f"{key.hexdigest()[:24]}.safetensors"
    if path.is_file():
        return load_file(path)["log_p"]
    divergence = "exact" if probe_seed is None else "hutchinson"
    print(f"tight reference solve (float64, tol {tol:g}, {divergence} divergence) for {len(x)} examples, "
          f"cached in {path}", flush=True)
    model64 = copy.deepcopy(model).double()
    generator = None if probe_seed is None else torch.Generator().manual_seed(probe_seed)
    x_T, integral, _ = ode_flow(model64, sde, x.double(), 1.0, rtol=tol, atol=tol, divergence=divergence,
                                generator=generator, method="dopri5", variable="logsnr")
    log_p = log_standard_normal(x_T) + integral
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"log_p": log_p.contiguous()}, str(path))
    return log_p


def exact_gate(model, sde, x, tol: float) -> tuple[dict, dict]:
    """The accuracy gate on the solver alone: difftime's default solve (float32) with the exact
    divergence against the float64 exact-divergence reference at ``tol``, so no probe noise enters."""
    d = x[0].numel()
    ref = to_bpd(reference(model, sde, x, tol), d)
    start = time.perf_counter()
    x_T, integral, nfe = ode_flow(model, sde, x, 1.0, divergence="exact")
    wall = time.perf_counter() - start
    err = (to_bpd(log_standard_normal(x_T) + integral, d) - ref).abs()
    result = {"n": len(x), "reference_tol": tol, "nfe": nfe, "wall_s": wall, "err_bpd": err.tolist(),
              "max_err_bpd": err.max().item()}
    print(f"  exact-divergence gate: {result}", flush=True)
    return result, gate_row(result)


def gate_row(gate: dict) -> dict:
    return row("likelihood", f"PF-ODE accuracy gate, {gate['n']} digits, exact divergence: largest per-example "
               f"absolute bits/dim difference from a float64 dopri5 solve at tol {gate['reference_tol']:g}",
               gate["max_err_bpd"], 0.002, "bits/dim", "difftime default tolerance (bosh3 in t, rtol = atol = 1e-5)",
               "target")


def compare(name: str, model, sde, x, args, n_label: str) -> tuple[dict, list[dict]]:
    """Ours (default settings) and the peer at equal accuracy on one network and batch."""
    model.eval()
    d, T, eps = x[0].numel(), 1.0, sde.eps
    probe_seed = 1
    probe = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(probe_seed)).float() * 2 - 1
    ref = to_bpd(reference(model, sde, x, args.ref_tol, probe_seed), d)

    def ours(control: str = "example", net=model, **tol):
        gen = torch.Generator().manual_seed(probe_seed)  # the same probe: a generator in the state that drew it
        start = time.perf_counter()
        x_T, integral, nfe = ode_flow(net, sde, x, T, divergence="hutchinson", generator=gen, error_control=control,
                                      **tol)
        wall = time.perf_counter() - start
        return wall, nfe, (to_bpd(log_standard_normal(x_T) + integral, d) - ref).abs().max().item()

    recorded = Recorded(model)
    _, nfe, err = ours(net=recorded)
    rows_used = sum(len(x_in) for x_in, _ in recorded.inputs)
    print(f"  {name}: difftime default: NFE {nfe}, {rows_used / len(x):.0f} network rows per example, "
          f"max error {err:.2g} bits/dim", flush=True)
    wall = float(np.median([ours()[0] for _ in range(args.repeats)]))
    batch_wall, batch_nfe, batch_err = ours("batch")

    # Time per NFE: the solve against a bare forward + VJP loop over the very inputs it evaluated, paired
    # and interleaved so that a change in the machine's load hits both; the solve's per-NFE cost does not
    # depend on the tolerance, so a shorter solve (--nfe-tol) is repeated instead of the default one.
    recorded = Recorded(model)
    ours(net=recorded, rtol=args.nfe_tol, atol=args.nfe_tol)
    pairs = []
    for i in range(args.nfe_repeats):  # the order alternates, so neither side always runs first
        if i % 2:
            bare = bare_forward_vjp(model, recorded.inputs, probe)
            pairs.append((ours(rtol=args.nfe_tol, atol=args.nfe_tol)[0], bare))
        else:
            pairs.append((ours(rtol=args.nfe_tol, atol=args.nfe_tol)[0], bare_forward_vjp(model, recorded.inputs,
                                                                                          probe)))
    nfe_ratio = float(np.median([a / b for a, b in pairs]))

    peers = []
    chosen = None
    for tol in args.peer_tols:  # loosest first, until the peer is as accurate as ours and has run at DEFAULT_TOL
        start = time.perf_counter()
        log_p, peer_nfe = score_sde_style(model, sde, x, T, eps, probe, tol, tol)
        peer = {"tol": tol, "wall_s": time.perf_counter() - start, "nfe": peer_nfe,
                "max_err_bpd": (to_bpd(log_p, d) - ref).abs().max().item()}
        peers.append(peer)
        print(f"  {name}: score_sde-style RK45 tol {tol:g}: {peer}", flush=True)
        if chosen is None and peer["max_err_bpd"] <= err:
            chosen = peer
        if chosen is not None and any(p["tol"] == DEFAULT_TOL for p in peers):
            break
    reached = chosen is not None
    if not reached:  # the peer's most accurate run, still less accurate than ours: the ratio is a bound
        chosen = min(peers, key=lambda p: p["max_err_bpd"])
        print(f"  {name}: no peer tolerance in {args.peer_tols} reached difftime's accuracy {err:.2g}; "
              f"comparing with the peer's most accurate run (ratio is an upper bound)", flush=True)
    result = {
        "n": len(x), "dim": d, "reference_tol": args.ref_tol, "n_label": n_label,
        "difftime": {"wall_s": wall, "nfe": nfe, "network_rows": rows_used,
                     "rows_per_example": rows_used / len(x), "max_err_bpd": err},
        "difftime_batch_control": {"wall_s": batch_wall, "nfe": batch_nfe, "max_err_bpd": batch_err},
        "time_per_nfe": {"tol": args.nfe_tol, "nfe": len(recorded.inputs), "solve_and_bare_s": pairs,
                         "median_ratio": nfe_ratio, "repeats": args.nfe_repeats},
        "score_sde": chosen, "score_sde_reached_our_accuracy": reached, "score_sde_ladder": peers,
        "ratio": wall / chosen["wall_s"],
    }
    add_equal_error(result)
    print(f"  {name}: {json.dumps({k: v for k, v in result.items() if k != 'score_sde_ladder'})}", flush=True)
    return result, case_rows(result)


def add_equal_error(result: dict) -> None:
    """The peer at exactly our error (interpolated on its ladder) and at our nominal tolerance."""
    ours = result["difftime"]
    equal = equal_error_wall(result["score_sde_ladder"], ours["max_err_bpd"])
    result["score_sde_at_equal_error"] = equal
    result["ratio_at_equal_error"] = ours["wall_s"] / equal["wall_s"] if equal else None
    result["same_nominal_tolerance"] = {
        "tol": DEFAULT_TOL, "difftime": ours,
        "score_sde": next((p for p in result["score_sde_ladder"] if p["tol"] == DEFAULT_TOL), None)}


def case_rows(result: dict) -> list[dict]:
    """The BENCHMARKS.md rows of one case, from its result alone (so stored results can be re-reported)."""
    n_label, ours, chosen = result["n_label"], result["difftime"], result["score_sde"]
    wall, err, nfe = ours["wall_s"], ours["max_err_bpd"], ours["nfe"]
    batch, per_nfe = result["difftime_batch_control"], result["time_per_nfe"]
    equal, same_tol = result["score_sde_at_equal_error"], result["same_nominal_tolerance"]["score_sde"]
    rows = []
    if equal is not None:
        rows.append(row("likelihood", f"PF-ODE log p of {n_label}, equal error {err:.1e} bits/dim (peer's wall "
                        f"interpolated in log time against log error between its tol {equal['between'][0]:g} and "
                        f"{equal['between'][1]:g} runs)", wall, equal["wall_s"], "s",
                        "difftime default (bosh3 in t, per-example control)",
                        "score_sde-style scipy RK45 at the same error"))
    reached = result["score_sde_reached_our_accuracy"]
    which = "first ladder step at least as accurate" if reached else "peer at lower accuracy"
    rows += [
        row("likelihood", f"PF-ODE log p of {n_label}, {which} "
            f"(max err {err:.1e} vs {chosen['max_err_bpd']:.1e} bits/dim; NFE {nfe} vs {chosen['nfe']})", wall,
            chosen["wall_s"], "s", "difftime default (bosh3 in t, per-example control)",
            f"score_sde-style scipy RK45, tol {chosen['tol']:g}"),
    ]
    if same_tol is not None:
        rows.append(row("likelihood", f"PF-ODE log p of {n_label}, the same nominal tolerance {DEFAULT_TOL:g} "
                        f"(max err {err:.1e} vs {same_tol['max_err_bpd']:.1e} bits/dim; NFE {nfe} vs "
                        f"{same_tol['nfe']})", wall, same_tol["wall_s"], "s", "difftime default",
                        f"score_sde-style scipy RK45, tol {DEFAULT_TOL:g} (score_sde's default)"))
    rows += [
        row("likelihood", f"PF-ODE solve time per NFE, {n_label} (median of {per_nfe.get('repeats', 9)} paired "
            f"ratios, {per_nfe['nfe']} NFE at tol {per_nfe['tol']:g})", per_nfe["median_ratio"], 1.0, "ratio",
            "difftime solve", "bare forward + VJP on the same inputs"),
        row("likelihood", f"PF-ODE error control, {n_label} (max err {err:.1e} vs {batch['max_err_bpd']:.1e} "
            "bits/dim)", wall, batch["wall_s"], "s", "per-example", "batch-wide (worst example)"),
    ]
    return rows


def equal_error_wall(ladder: list[dict], err: float) -> dict | None:
    """The peer's wall time at exactly our error ``err``: log wall interpolated linearly in log error
    between the two ladder steps whose errors bracket ``err`` (the last step above it and the first at
    or below it). None when no two steps bracket it (the peer never got there, or its loosest step
    was already as accurate: then only a bound is known)."""
    for a, b in zip(ladder, ladder[1:], strict=False):
        if a["max_err_bpd"] > err >= b["max_err_bpd"]:
            u = (math.log(err) - math.log(a["max_err_bpd"])) / (math.log(b["max_err_bpd"]) - math.log(a["max_err_bpd"]))
            wall = math.exp(math.log(a["wall_s"]) + u * (math.log(b["wall_s"]) - math.log(a["wall_s"])))
            return {"wall_s": wall, "between": [a["tol"], b["tol"]], "error": err, "position": u}
    return None


def mnist_cpu_net(run_dir: str | None):
    """The 28x28 U-Net of the MNIST CPU size: a trained run's network, or seeded random weights."""
    if run_dir:
        from difftime.run import load_run

        run = load_run(run_dir)
        return run.model, run.sde, "trained " + str(run.path)
    from difftime.nets import net_from_config
    from difftime.sde import VPSDE

    torch.manual_seed(0)
    net = net_from_config({"kind": "unet", "in_channels": 1, "ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1,
                           "attn_levels": [], "mid_attention": True, "dropout": 0.0})
    return net, VPSDE(), "random weights (seed 0)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", help="a trained digits run dir (default: the cached digits preset model)")
    parser.add_argument("--n", type=int, default=16, help="test digits in the batch")
    parser.add_argument("--run28", help="a trained 28x28 run (default: the MNIST-CPU-size U-Net, random weights)")
    parser.add_argument("--n28", type=int, default=8, help="28x28 images in the batch")
    parser.add_argument("--skip28", action="store_true", help="only the digits case")
    parser.add_argument("--ref-tol", type=float, default=1e-7, help="tolerance of the float64 reference solves")
    parser.add_argument("--n-exact", type=int, default=3,
                        help="test digits in the exact-divergence accuracy gate (0: skip it)")
    parser.add_argument("--peer-tols", type=lambda s: tuple(float(v) for v in s.split(",")), default=PEER_TOLS,
                        help="the peer's tolerances, tried loosest first")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats of difftime's default solve")
    parser.add_argument("--nfe-tol", type=float, default=1e-4, help="tolerance of the time-per-NFE solves")
    parser.add_argument("--nfe-repeats", type=int, default=9, help="paired repeats for the time per NFE")


def rescore(path: Path) -> dict:
    """The result stored in ``path``, re-reported: the equal-error and same-tolerance comparisons
    recomputed from the ladders it measured (no new timing), and its rows rebuilt from the result."""
    stored = json.loads(path.read_text())
    results, rows = stored["results"], []
    for case, label in (("digits", lambda r: f"{r['n']} digits"),
                        ("mnist28", lambda r: f"{r['n']} 28x28 images ({r['weights']})")):
        if case in results:
            r = results[case]
            r.setdefault("n_label", label(r))
            add_equal_error(r)
            rows += case_rows(r)
            if case == "digits" and "exact_gate" in r:
                rows.append(gate_row(r["exact_gate"]))
    return {**stored, "results": results, "rows": rows,
            "rescored": "equal-error and same-tolerance rows recomputed from the stored ladders; no new timing"}


def run(args: argparse.Namespace) -> dict:
    from difftime.data import load_data

    model_run = digits_run(args.run)
    data = load_data("digits")
    x = model_run.scaler.encode(data.test[: args.n], generator=torch.Generator().manual_seed(0))
    results, rows = {}, []
    results["digits"], digits_rows = compare("digits", model_run.model, model_run.sde, x, args, f"{args.n} digits")
    results["digits"]["run"] = str(model_run.path)
    rows += digits_rows
    if args.n_exact:
        results["digits"]["exact_gate"], gate_row = exact_gate(model_run.model, model_run.sde, x[: args.n_exact],
                                                               args.ref_tol)
        rows.append(gate_row)
    if not args.skip28:
        net, sde, weights = mnist_cpu_net(args.run28)
        mnist = load_data("mnist")
        x28 = (mnist.test[: args.n28].float() + torch.rand(args.n28, *mnist.test.shape[1:],
                                                             generator=torch.Generator().manual_seed(0))) / 128 - 1
        results["mnist28"], rows28 = compare("28x28", net, sde, x28, args, f"{args.n28} 28x28 images ({weights})")
        results["mnist28"]["weights"] = weights
        rows += rows28
    return {"results": results, "rows": rows}


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--rescore"]:  # python benchmarks/likelihood.py --rescore benchmarks/results/likelihood.json
        from difftime.io import atomic_write_bytes

        target = Path(sys.argv[2])
        atomic_write_bytes(target, (json.dumps(rescore(target), indent=2) + "\n").encode())
        print(f"rescored {target}")
    else:
        standalone("likelihood", add_arguments, run, __doc__.splitlines()[0])
