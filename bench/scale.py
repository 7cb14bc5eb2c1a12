#!/usr/bin/python3
"""Steps per second of gradserve-optimizer on the (b) model with 1, 2 and 3 gradserve replicas
(bench/scale.sh runs this; see its header and bench/README.md).

The (b) model of bench/run.sh: 784-1024-1024-10 with ReLU, cross-entropy MEAN, batch 256,
float32, here trained with Adam from a data set of random inputs and labels (the numbers do not
matter to the time). Each configuration gets a fresh set of processes: R replicas (--threads
given by --replica-threads) on free loopback ports and one optimizer splitting each batch in R
parts (shards = R). A round runs every configuration once, in an order rotated round to round;
each run takes --warmup steps, then times --steps steps of Step(expected_step=k) one after
another. CPU time is read from /proc for the optimizer, the replicas and this process, and for
the whole machine, so "other" is what other work on the machine took.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def machine_busy_seconds():
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / TICKS


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gradserve", required=True)
    parser.add_argument("--optimizer", required=True)
    parser.add_argument("--configs", default="1x1,2x1,3x1,1x2",
                        help="REPLICASxTHREADS, comma separated: replicas and --threads each")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max-other", type=float, default=0.25,
                        help="a run during which other processes kept more than this many "
                             "cores busy is run again")
    parser.add_argument("--retries", type=int, default=2, help="runs again, at most")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "scale.md"))
    parser.add_argument("--json", default=os.path.join(HERE, "results", "scale.json"))
    args = parser.parse_args()
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]

    work = tempfile.mkdtemp(prefix="gradserve-scale-")
    try:
        run(args, configs, work)
    finally:
        subprocess.run(["rm", "-rf", work], check=False)


def run(args, configs, work):
    subprocess.run([f"{REPO}/client/python/generate.sh", f"{work}/stubs"], check=True,
                   stdout=subprocess.DEVNULL)
    sys.path[:0] = [f"{work}/stubs", f"{REPO}/client/python", f"{REPO}/tests/e2e"]
    from gradserve import client as gc
    from gradserve.optimizer.v1 import optimizer_pb2 as opb
    from gradserve.optimizer.v1 import optimizer_pb2_grpc as opb_grpc
    from gradserve.client import pb
    from local_cluster import Cluster

    data_dir = f"{work}/data"
    os.makedirs(data_dir)
    rng = np.random.default_rng(0)
    np.save(f"{data_dir}/x.npy", rng.standard_normal((2560, 784)).astype(np.float32))
    np.save(f"{data_dir}/y.npy", rng.integers(0, 10, 2560).astype(np.int64))

    def spec(replicas):
        model = pb.Model(loss=gc.loss("cross_entropy"))
        widths = [784, 1024, 1024, 10]
        for i in range(3):
            if i:
                model.layers.add().relu.SetInParent()
            model.layers.add().linear.CopyFrom(pb.Linear(in_features=widths[i],
                                                         out_features=widths[i + 1]))
        return opb.RunSpec(
            run_id="b", model=model, dtype=pb.DTYPE_FLOAT32, init_seed=1,
            optimizer=opb.OptimizerConfig(algorithm=opb.OptimizerConfig.ALGORITHM_ADAM,
                                          lr=1e-3),
            gradserve_targets=[r.target for r in replicas], shards=len(replicas),
            dataset=opb.Dataset(inputs="x.npy", targets="y.npy", batch_size=256),
            checkpoint_every=1 << 40)

    def measure(replica_count, threads, round_dir):
        with Cluster(round_dir) as cluster:
            replicas = [cluster.gradserve(args.gradserve, "--threads", str(threads),
                                          name=f"gradserve{i}") for i in range(replica_count)]
            optimizer = cluster.add("optimizer", args.optimizer, "--data-dir", data_dir,
                                    )
            stub = opb_grpc.OptimizerServiceStub(optimizer.channel())
            stub.CreateRun(opb.CreateRunRequest(spec=spec(replicas)), timeout=60)
            for k in range(args.warmup):
                stub.Step(opb.StepRequest(run_id="b", expected_step=k), timeout=120)
            pids = [p.popen.pid for p in cluster.processes] + [os.getpid()]
            cpu0 = [cpu_seconds(pid) for pid in pids]
            busy0, t0 = machine_busy_seconds(), time.monotonic()
            answers = [stub.Step(opb.StepRequest(run_id="b", expected_step=k), timeout=120)
                       for k in range(args.warmup, args.warmup + args.steps)]
            seconds = time.monotonic() - t0
            busy = machine_busy_seconds() - busy0
            cpu = [cpu_seconds(pid) - c for pid, c in zip(pids, cpu0)]
            for process in cluster.processes:
                process.stop()
        return {
            "replicas": replica_count, "threads": threads, "steps": args.steps,
            "seconds": seconds, "steps_per_second": args.steps / seconds,
            "bytes_sent": statistics.median(a.bytes_sent for a in answers),
            "bytes_received": statistics.median(a.bytes_received for a in answers),
            "loss_first_last": [answers[0].loss, answers[-1].loss],
            "cpu_replicas": sum(cpu[:replica_count]) / seconds,
            "cpu_optimizer": cpu[replica_count] / seconds,
            "cpu_driver": cpu[-1] / seconds,
            "cpu_other": max(0.0, busy - sum(cpu)) / seconds,
        }

    started = datetime.datetime.now(datetime.timezone.utc)
    rounds = []
    for r in range(args.rounds):
        order = configs[r % len(configs):] + configs[:r % len(configs)]
        results = []
        for replica_count, threads in order:
            # The machine is shared: a run that other work competed with is run again (the
            # last attempt is kept whatever happened; the report shows its "other" CPU).
            for attempt in range(args.retries + 1):
                round_dir = f"{work}/round{r}-{replica_count}x{threads}-{attempt}"
                os.makedirs(round_dir)
                result = measure(replica_count, threads, round_dir)
                result["attempts"] = attempt + 1
                print(f"round {r + 1}: {replica_count} replica(s) x {threads} thread(s): "
                      f"{result['steps_per_second']:.2f} steps/s, other CPU "
                      f"{100 * result['cpu_other']:.0f}%", file=sys.stderr, flush=True)
                if result["cpu_other"] <= args.max_other:
                    break
            results.append(result)
        rounds.append(results)

    commit = subprocess.run(["git", "-C", REPO, "describe", "--always", "--dirty"],
                            capture_output=True, text=True).stdout.strip()
    with open(args.json, "w") as f:
        json.dump({"started": started.isoformat(), "commit": commit, "rounds": rounds}, f,
                  indent=1)
    with open(args.out, "w") as f:
        f.write(report(rounds, configs, started, commit, args))
    print(open(args.out).read())


def report(rounds, configs, started, commit, args):
    def runs_of(config):
        return [x for results in rounds for x in results
                if (x["replicas"], x["threads"]) == config]

    # Ratios within a round (the machine's speed drifts over minutes), then the median.
    def ratio(config):
        values = []
        for results in rounds:
            base = [x for x in results if (x["replicas"], x["threads"]) == configs[0]]
            this = [x for x in results if (x["replicas"], x["threads"]) == config]
            if base and this:
                values.append(this[0]["steps_per_second"] / base[0]["steps_per_second"])
        return statistics.median(values)

    lines = [
        "# gradserve-optimizer scale-out on one machine (`bench/scale.sh`)",
        "",
        f"- {started:%Y-%m-%d %H:%M} UTC, commit `{commit}`, {os.cpu_count()} cores "
        f"({cpu_model()}); {args.rounds} round(s), each running every configuration once in "
        "a rotating order, each run a fresh set of processes.",
        f"- Model (b): 784-1024-1024-10 ReLU, cross-entropy MEAN, batch 256, float32, Adam; "
        f"{args.warmup} warm-up steps, then {args.steps} `Step` calls timed one after another "
        "(the optimizer reads each batch from a .npy data set, splits it in one part per "
        "replica, and applies Adam in float64).",
        "- Every figure is the median over rounds; \"vs first\" is computed within each round "
        f"against {configs[0][0]} replica x {configs[0][1]} thread(s), then the median taken.",
        "- CPU columns: cores busy during the timed steps (1.0 = one core), from /proc: the "
        "replicas together, the optimizer, the Python driver, and everything else on the "
        f"machine (\"other\"; a run with more than {args.max_other} was run again, up to "
        f"{args.retries} times: {sum(x['attempts'] > 1 for r in rounds for x in r)} were, and "
        f"{sum(x['cpu_other'] > args.max_other for r in rounds for x in r)} of the runs kept "
        "still had other work competing).",
        "",
        "| replicas x threads | steps/s | ms/step | vs first | bytes sent/step | "
        "bytes received/step | CPU replicas | CPU optimizer | CPU driver | CPU other | "
        "steps/s each round |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for config in configs:
        runs = runs_of(config)
        med = lambda key: statistics.median(x[key] for x in runs)  # noqa: E731
        sps = med("steps_per_second")
        lines.append(
            f"| {config[0]} x {config[1]} | {sps:.2f} | {1000 / sps:.1f} | {ratio(config):.2f}x |"
            f" {med('bytes_sent') / 1e6:.1f} MB | {med('bytes_received') / 1e6:.1f} MB |"
            f" {med('cpu_replicas'):.2f} | {med('cpu_optimizer'):.2f} | {med('cpu_driver'):.2f} |"
            f" {med('cpu_other'):.2f} |"
            f" {', '.join('%.2f' % x['steps_per_second'] for x in runs)} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
