"""Benchmark: the UOT class selection at ImageNet-21k scale, end to end, against POT's solve alone and the reference
repository's cost construction and update rule.

The workload: 21,841 source x 1,000 target classes of 512-d random prototypes (float32, standard normal), selecting
N = 100 classes with the paper's settings (p_m 0.1, reg 1, reg_m (1, 100), 1000 iterations, tol 1e-6).
Measured, in the same process and BLAS threads (`--threads`, default 2):

- end to end: `uot_select_classes` (validation, the cost by one blocked float32 matrix product of unit-normalised
  rows written into the float64 cost, POT's `sinkhorn_knopp_unbalanced` with the numpy backend, row masses and top-N);
  targets <= 2 s and <= 1 GB of memory above the inputs;
- (a) POT's solve alone on the same float64 cost, as the paper's code would call it
  (`ot.unbalanced.sinkhorn_knopp_unbalanced(a, b, M, 1.0, (1.0, 100.0))`);
- (b) the reference's cost construction (`UOT_select_class_unbalanced.py` broadcasts an `(K_s, K_t, d)` product before
  summing over `d`): its temporary's size is computed and printed, never allocated;
- (c) the reference's solver (`sinkhorn_unbalanced.py`: the same update rule, `u, v` from `1/dim`, `K` by an in-place
  `exp`), transcribed here from the spec's update rule, on the same cost.

Times are medians over `--repeats` runs, interleaved. Memory is the peak above the level before the call, measured
two ways in separate passes before the timing: the resident set size sampled every 0.5 ms in a thread (psutil), and
the tracemalloc peak (numpy reports its array buffers to tracemalloc). With `--options`, POT's solve is also timed on a
float32 cost and with `method="sinkhorn_stabilized"`, once each, with the largest difference of their row masses from
the float64 solve.

    python benchmarks/uot_selection.py [--threads 2] [--repeats 5] [--options]
    python benchmarks/uot_selection.py --quick      # small sizes, to check the script end to end
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import tracemalloc

import numpy as np
import psutil
from threadpoolctl import threadpool_limits

GB = 1e9


def rss_peak(fn):
    """`(result, peak RSS above the level before the call, in bytes)`, sampling every 0.5 ms."""
    process = psutil.Process()
    baseline = process.memory_info().rss
    peak, done = [baseline], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = fn()
    finally:
        done.set()
        sampler.join()
    peak[0] = max(peak[0], process.memory_info().rss)
    return result, peak[0] - baseline


def tracemalloc_peak(fn):
    """`(result, tracemalloc peak during the call, in bytes)`."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def reference_rule(a, b, M, reg, tau_s, tau_t, max_iter=1000, tol=1e-6):
    """The reference solver's update rule: `K = exp(-M / reg)` in place, `u, v` start at `1/dim`."""
    K = np.empty_like(M)
    np.divide(M, -reg, out=K)
    np.exp(K, out=K)
    u, v = np.full(M.shape[0], 1.0 / M.shape[0]), np.full(M.shape[1], 1.0 / M.shape[1])
    for _ in range(max_iter):
        u_prev, v_prev = u, v
        u = (a / K.dot(v)) ** (tau_s / (tau_s + reg))
        v = (b / K.T.dot(u)) ** (tau_t / (tau_t + reg))
        change_u = np.abs(u - u_prev).max() / max(np.abs(u).max(), np.abs(u_prev).max(), 1.0)
        change_v = np.abs(v - v_prev).max() / max(np.abs(v).max(), np.abs(v_prev).max(), 1.0)
        if (change_u + change_v) / 2 < tol:
            break
    return u[:, None] * K * v[None, :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="BLAS threads")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each kind")
    parser.add_argument("--source-classes", type=int, default=21841)
    parser.add_argument("--target-classes", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--n", type=int, default=100, help="classes selected")
    parser.add_argument("--options", action="store_true", help="also time POT on float32 and sinkhorn_stabilized")
    parser.add_argument("--quick", action="store_true", help="2,000 x 100 classes of 64-d, 2 repeats")
    args = parser.parse_args()
    if args.quick:
        args.source_classes, args.target_classes, args.dim, args.repeats = 2000, 100, 64, 2

    import ot

    from hf_regtools.data_selection.uot import prototype_cost, uot_select_classes

    ks, kt, d = args.source_classes, args.target_classes, args.dim
    rng = np.random.default_rng(0)
    source = rng.standard_normal((ks, d), dtype=np.float32)
    target = rng.standard_normal((kt, d), dtype=np.float32)
    ones_s, ones_t = np.ones(ks), np.ones(kt)
    settings = dict(p_m=0.1, reg=1.0, reg_m=(1.0, 100.0), max_iter=1000, tol=1e-6)

    def end_to_end():
        return uot_select_classes(source, target, args.n, **settings)

    def pot_alone(M):
        return ot.unbalanced.sinkhorn_knopp_unbalanced(ones_s, ones_t, M, 1.0, (1.0, 100.0), numItermax=1000,
                                                       stopThr=1e-6)

    with threadpool_limits(limits=args.threads):
        print(f"UOT selection: {ks:,} source x {kt:,} target classes, d={d}, float32 prototypes "
              f"({(source.nbytes + target.nbytes) / 1e6:.1f} MB), N={args.n}, {args.threads} BLAS threads, "
              f"POT {ot.__version__}, numpy {np.__version__}")
        selection, e2e_rss = rss_peak(end_to_end)
        _, e2e_traced = tracemalloc_peak(end_to_end)
        cost = prototype_cost(source, target, p_m=0.1)
        plan, pot_rss = rss_peak(lambda: pot_alone(cost))
        _, pot_traced = tracemalloc_peak(lambda: pot_alone(cost))
        del plan
        times = {"end to end": [], "  cost construction": [], "(a) POT solve alone": [],
                 "(c) reference solver (transcribed)": []}
        for _ in range(args.repeats):
            start = time.perf_counter()
            end_to_end()
            times["end to end"].append(time.perf_counter() - start)
            start = time.perf_counter()
            prototype_cost(source, target, p_m=0.1)
            times["  cost construction"].append(time.perf_counter() - start)
            start = time.perf_counter()
            pot_plan = pot_alone(cost)
            times["(a) POT solve alone"].append(time.perf_counter() - start)
            del pot_plan
            start = time.perf_counter()
            reference_plan = reference_rule(ones_s, ones_t, cost, 1.0, 1.0, 100.0)
            times["(c) reference solver (transcribed)"].append(time.perf_counter() - start)
        medians = {key: statistics.median(values) for key, values in times.items()}

        pot_plan = pot_alone(cost)
        w = selection.importance
        same_top = set(np.argsort(-pot_plan.sum(1), kind="stable")[:args.n]) == set(selection.class_ids) == set(
            np.argsort(-reference_plan.sum(1), kind="stable")[:args.n])
        print(f"\n{'':38s}{'median s':>10s}{'min s':>8s}{'/ (a)':>8s}")
        for key, values in times.items():
            ratio = medians[key] / medians["(a) POT solve alone"]
            print(f"{key:38s}{medians[key]:10.3f}{min(values):8.3f}{ratio:7.2f}x")
        print(f"  end to end <= 2 s: {'yes' if medians['end to end'] <= 2 else 'NO'} (runs: "
              f"{', '.join(f'{t:.2f}' for t in times['end to end'])} s; load average {psutil.getloadavg()[0]:.2f})")
        print(f"\n{'peak memory above the inputs':38s}{'RSS GB':>10s}{'traced GB':>11s}")
        print(f"{'end to end':38s}{e2e_rss / GB:10.3f}{e2e_traced / GB:11.3f}")
        print(f"{'(a) POT solve alone (cost held)':38s}{pot_rss / GB:10.3f}{pot_traced / GB:11.3f}")
        print(f"{'(b) reference cost temporary, float64':38s}{ks * kt * d * 8 / GB:10.1f}"
              "   (the shipped prototypes are float64; not allocated)")
        print(f"{'    the same on float32 prototypes':38s}{ks * kt * d * 4 / GB:10.1f}")
        print(f"  end to end <= 1 GB: {'yes' if max(e2e_rss, e2e_traced) <= GB else 'NO'}; "
              f"(b) / end to end = {ks * kt * d * 8 / max(e2e_rss, e2e_traced):,.0f}x")
        print(f"\nsame fixed point: max |plan - POT default plan| = {np.abs(selection.plan - pot_plan).max():.2e}, "
              f"vs the reference rule {np.abs(selection.plan - reference_plan).max():.2e} (plan max "
              f"{selection.plan.max():.3f}); same top-{args.n}: {same_top}; target marginal error "
              f"{selection.target_marginal_error:.4f}; w in [{w.min():.2e}, {w.max():.2e}]")

        if args.options:
            print("\nPOT options (one run each):")
            cost32 = cost.astype(np.float32)
            for name, call in (
                    ("float32 cost", lambda: ot.unbalanced.sinkhorn_knopp_unbalanced(
                        ones_s.astype(np.float32), ones_t.astype(np.float32), cost32, 1.0, (1.0, 100.0))),
                    ('method="sinkhorn_stabilized"', lambda: ot.unbalanced.sinkhorn_unbalanced(
                        ones_s, ones_t, cost, 1.0, (1.0, 100.0), method="sinkhorn_stabilized"))):
                start = time.perf_counter()
                other = call()
                seconds = time.perf_counter() - start
                difference = np.abs(other.sum(1).astype(np.float64) - pot_plan.sum(1)).max() / pot_plan.sum(1).max()
                top = set(np.argsort(-other.sum(1), kind="stable")[:args.n]) == set(selection.class_ids)
                print(f"  {name:36s}{seconds:8.3f} s ({seconds / medians['(a) POT solve alone']:.2f}x (a)); max "
                      f"relative row-mass difference {difference:.1e}; same top-{args.n}: {top}")
                del other


if __name__ == "__main__":
    main()
