"""Regenerates the results table (RESULTS.md) end to end: distil, evaluate with repeats, tabulate.

    python benchmarks/results.py                                   # Fashion-MNIST, this CPU
    python benchmarks/results.py --budget=paper --dataset=cifar10  # paper-scale, on a GPU
    python benchmarks/results.py --only=ncfm:10 --work_dir=/tmp/check   # one cell again

Rows: a random real subset, DM (`--loss=mmd`), NCFM without psi (`--sampling_net=false`) and
NCFM; columns: IPC 1 / 10 / 50. Every distilled row uses `train.py` with the same budget and
differs only in that one flag; every cell is evaluated with `evaluate.py` (same protocol, same
epochs, `--repeats` fresh ConvNets; mean ± std over those networks). Then the IPC 10 sets are
evaluated on other architectures (cross-architecture rows).

Each cell lives in `--work_dir/<method>_ipc<N>/` (the distilled set, logs, evaluation.json and
cell.json with wall times and peak memory); a finished cell is reused, so an interrupted suite
continues where it stopped and a finished one only re-tabulates. Progress goes to stdout.
"""

import concurrent.futures
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

METHODS = {  # row -> train.py flags (None: the random real subset, no distillation)
    "random": None,
    "dm": ["--loss=mmd"],
    "ncfm_nopsi": ["--sampling_net=false"],
    "ncfm": ["--sampling_net=true"],
}
# What a budget fixes. `train`: flags of train.py shared by every distilled row (beyond the
# dataset's preset); `iterations` and evaluation `epochs` per IPC (None: the preset's 20000 /
# the protocol's 2000); `cross_methods`: the rows evaluated on other architectures.
BUDGETS = {
    "cpu": dict(
        train=["--num_pretrained=4", "--pretrain_epochs=1", "--batch_real=64",
               "--num_freqs=1024", "--image_lr=0.01"],
        iterations={1: 300, 10: 150, 50: 50}, epochs={1: 300, 10: 100, 50: 30}, repeats=3,
        cross_epochs=100, cross_repeats=1, cross_methods=["random", "ncfm"],
        note="2-core CPU budget, about 7 h of cell time: 300 iterations at IPC 1, 150 at IPC "
             "10, 50 at IPC 50 (an iteration costs ~4x there), a pool of 4 ConvNets "
             "pretrained for 1 epoch, 64 real images per class per iteration, 1024 "
             "frequencies, image lr 0.01"),
    "smoke": dict(  # checks the whole pipeline in minutes; its numbers mean nothing
        train=["--log_every=1", "--num_pretrained=1", "--pretrain_epochs=0", "--batch_real=8",
               "--num_freqs=64"],
        iterations={1: 2, 10: 2, 50: 2}, epochs={1: 2, 10: 2, 50: 2}, repeats=2,
        cross_epochs=1, cross_repeats=1, cross_methods=list(METHODS),
        note="smoke test: 2 iterations, an untrained pool of 1 ConvNet (numbers mean nothing)"),
    "paper": dict(
        train=[], iterations={}, epochs={}, repeats=5, cross_epochs=None, cross_repeats=3,
        cross_methods=list(METHODS),
        note="paper scale: the dataset's preset (20000 iterations, a pool of 20 ConvNets "
             "pretrained for 60 epochs, spec settings)"),
}
LABELS = {"random": "Random real subset", "dm": "DM (`--loss=mmd`)",
          "ncfm_nopsi": "NCFM without ψ (`--sampling_net=false`)",
          "ncfm": "NCFM (ψ on, scales bounded by 2)"}
SHORT = {"random": "random", "dm": "DM", "ncfm_nopsi": "NCFM without ψ", "ncfm": "NCFM"}
CROSS_ARCHS = ["alexnet", "vgg11", "resnet18"]
# Published ConvNet-3 accuracies at IPC 1 / 10 / 50 (None: not reported) and the whole-dataset
# accuracy: CIFAR from the NCFM paper's main results table (Random and DM as it quotes them),
# Fashion-MNIST as the DSA, IDC and KIP papers report it (NCFM reports none).
PUBLISHED = {
    "fashion_mnist": dict(methods={"DSA": (70.6, 84.6, 88.7), "IDC": (81.0, 86.0, 86.2),
                                   "KIP → ConvNet": (73.8, 86.8, 87.8),
                                   "NCFM": (None, None, None)}, whole="~93.5"),
    "cifar10": dict(methods={"Random": (14.4, 26.0, 43.4), "DM": (26.0, 48.9, 63.0),
                             "NCFM": (49.5, 71.8, 77.4)}, whole="84.8"),
    "cifar100": dict(methods={"Random": (4.2, 14.6, 30.0), "DM": (11.4, 29.7, 43.6),
                              "NCFM": (34.4, 48.7, 54.7)}, whole="56.2"),
}
PUBLISHED_IPCS = (1, 10, 50)

flags.DEFINE_string("dataset", "fashion_mnist", "Dataset, as for train.py.")
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # apt-get install dataset-fashion-mnist
flags.DEFINE_string("data_dir", None, "As for train.py (default for fashion_mnist: Debian's "
                    f"IDX files in {DEBIAN_FASHION_MNIST} when present).")
flags.DEFINE_enum("budget", "cpu", list(BUDGETS), "Distillation and evaluation budget.")
flags.DEFINE_list("ipcs", ["1", "10", "50"], "Columns.")
flags.DEFINE_list("methods", list(METHODS), "Rows.")
flags.DEFINE_integer("repeats", None, "Evaluation networks per cell (default: the budget's).")
flags.DEFINE_bool("cross_arch", True, "Also evaluate the IPC 10 sets on AlexNet, VGG-11, "
                  "ResNet-18.")
flags.DEFINE_bool("tabulate", False, "Compute nothing: write the table from the cells that "
                  "are finished (the others show as pending).")
flags.DEFINE_integer("jobs", 1, "Cells computed at once, each in its own processes.")
flags.DEFINE_string("only", None, "Run just this cell, `method:ipc` (e.g. ncfm:10).")
flags.DEFINE_string("work_dir", None, "Cells go here (default results/<dataset>_<budget>).")
flags.DEFINE_string("pool_dir", None, "Pretrained-pool cache (default: <work_dir>/pools, kept "
                    "with the cells so that cells computed on different days share one pool).")
flags.DEFINE_string("output", None, "The Markdown file (default RESULTS.md beside train.py; "
                    "with --only: <work_dir>/RESULTS.md).")
FLAGS = flags.FLAGS


def run_logged(args, log_path):
    """Runs a command with its output in `log_path`; returns (seconds, peak RSS in MiB)."""
    start = time.time()
    with open(log_path, "w") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        with open(log_path) as log:
            tail = log.read()[-2000:]
        raise SystemExit(f"failed ({process.returncode}): {' '.join(args)}\n{tail}")
    return round(time.time() - start, 1), round(usage.ru_maxrss / 1024)


def shown(args):
    """A command line as RESULTS.md shows it: without the interpreter, paths relative to the
    project (where the commands run)."""
    return " ".join(args[1:]).replace(ROOT + os.sep, "")


def log_line(path, prefix):
    with open(path) as f:
        return next((line.strip() for line in f if line.startswith(prefix)), None)


def load_record(work_dir, method, ipc):
    path = os.path.join(work_dir, f"{method}_ipc{ipc}", "cell.json")
    return json.load(open(path)) if os.path.exists(path) else {}


def run_cell(method, ipc, archs, work_dir, budget, repeats, pool_dir):
    """Distils (unless random) and evaluates one cell on `archs`; reuses whatever already
    finished."""
    cell_dir = os.path.join(work_dir, f"{method}_ipc{ipc}")
    record_path = os.path.join(cell_dir, "cell.json")
    record = load_record(work_dir, method, ipc)
    os.makedirs(cell_dir, exist_ok=True)
    data_dir = FLAGS.data_dir or (DEBIAN_FASHION_MNIST if FLAGS.dataset == "fashion_mnist" and
                                  os.path.isdir(DEBIAN_FASHION_MNIST) else None)
    data_flags = [f"--dataset={FLAGS.dataset}"] + ([f"--data_dir={data_dir}"] if data_dir else [])
    epochs = budget["epochs"].get(ipc)
    python = sys.executable
    if METHODS[method] is not None and "distill_seconds" not in record:
        iterations = budget["iterations"].get(ipc)
        args = [python, "train.py", *data_flags, f"--ipc={ipc}", *budget["train"],
                *([f"--iterations={iterations}"] if iterations else []),
                *METHODS[method], f"--output_dir={os.path.join(cell_dir, 'distill')}",
                *([f"--pool_dir={pool_dir}"] if pool_dir else [])]
        print(f"[{time.strftime('%H:%M:%S')}] {method} ipc {ipc}: distilling", flush=True)
        seconds, peak = run_logged(args, os.path.join(cell_dir, "distill.log"))
        log = os.path.join(cell_dir, "distill.log")
        record.update(distill_command=shown(args), distill_seconds=seconds,
                      distill_peak_mib=peak, pool=log_line(log, "pool ready"),
                      distilled=log_line(log, "distilled "))
        json.dump(record, open(record_path, "w"), indent=1)
    for arch in archs:
        if arch in record.get("evaluations", {}):
            continue
        cross = arch != "convnet"
        arch_epochs = budget["cross_epochs"] if cross else epochs
        source = ([f"--distilled={os.path.join(cell_dir, 'distill', 'distilled.npz')}",
                   *data_flags[1:]] if METHODS[method] is not None else
                  [*data_flags, "--baseline=random", f"--ipc={ipc}"])
        args = [python, "evaluate.py", *source, f"--arch={arch}",
                f"--repeats={budget['cross_repeats'] if cross else repeats}",
                *([f"--epochs={arch_epochs}"] if arch_epochs else []),
                f"--output_dir={os.path.join(cell_dir, 'eval_' + arch)}"]
        print(f"[{time.strftime('%H:%M:%S')}] {method} ipc {ipc}: evaluating on {arch}",
              flush=True)
        seconds, peak = run_logged(args, os.path.join(cell_dir, f"eval_{arch}.log"))
        result = json.load(open(os.path.join(cell_dir, f"eval_{arch}", "evaluation.json")))
        summary = result["archs"][arch]["summary"]
        record.setdefault("evaluations", {})[arch] = dict(
            command=shown(args), seconds=seconds, peak_mib=peak,
            final=summary["final"], best_seen=summary["best_seen"],
            runs=[r["final"] for r in result["archs"][arch]["runs"]],
            epochs=result["archs"][arch]["runs"][0]["epochs"])
        json.dump(record, open(record_path, "w"), indent=1)
    return record


def evaluation_of(record, arch="convnet"):
    """The cell's finished evaluation on `arch`, or None."""
    return (record or {}).get("evaluations", {}).get(arch)


def final_mean(record, arch="convnet"):
    evaluation = evaluation_of(record, arch)
    return evaluation["final"][0] if evaluation else None


def difference(ours, theirs, name):
    """`ours - theirs` in points, marked when it is smaller than the two cells' spreads
    combined (sqrt(s1^2 + s2^2)): such a lead or lag could be noise."""
    (mean, std), (other_mean, other_std) = ours["final"], theirs["final"]
    text = f"{mean - other_mean:+.2f} vs {name}"
    return text + (" (within noise)" if abs(mean - other_mean) < math.hypot(std, other_std)
                   else "")


def comparison(records, ipcs, methods):
    """Lines comparing each NCFM row with the other rows and the best published number."""
    lines = []
    published = PUBLISHED.get(FLAGS.dataset, {}).get("methods", {})
    for i in ipcs:
        for row in [m for m in ("ncfm", "ncfm_nopsi") if m in methods]:
            ours = final_mean(records.get((row, i)))
            if ours is None:
                continue
            differences = [difference(evaluation_of(records.get((row, i))),
                                      evaluation_of(records.get((m, i))), SHORT[m])
                           for m in methods if m != row and
                           final_mean(records.get((m, i))) is not None]
            text = f"- IPC {i}, {SHORT[row]}: {ours:.2f}, " + ", ".join(differences)
            if i in PUBLISHED_IPCS:
                column = PUBLISHED_IPCS.index(i)
                reported = {name: values[column] for name, values in published.items()
                            if values[column] is not None}
                if reported:
                    best = max(reported, key=reported.get)
                    gap = reported[best] - ours
                    text += (f"; the best published number ({best}, at its full budget) is "
                             f"{reported[best]:.1f}, {abs(gap):.1f} points "
                             f"{'above' if gap > 0 else 'below'} ours")
            lines.append(text + ".")
    return lines


def cell_text(record, arch, key="final"):
    evaluation = evaluation_of(record, arch)
    if not evaluation:
        return "pending"
    mean, std = evaluation[key]
    if len(evaluation["runs"]) == 1:  # one network: no spread to report
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {std:.2f}"


def versions():
    from importlib.metadata import version

    return (f"Python {platform.python_version()}, TensorFlow {version('tensorflow')}, "
            f"Keras {version('keras')}, NumPy {version('numpy')}; {platform.platform()}, "
            f"{os.cpu_count()} CPU cores")


def compute_hours(records):
    """Wall time summed over every recorded distillation and evaluation."""
    seconds = sum(r.get("distill_seconds", 0) + sum(e["seconds"] for e in r.get(
        "evaluations", {}).values()) for r in records.values() if r)
    return seconds / 3600


def write_table(path, records, ipcs, methods, budget_name, budget, repeats, command, seconds):
    """RESULTS.md from the cell records (cells not finished yet show as pending)."""
    lines = [f"# Results: {FLAGS.dataset}, budget `{budget_name}`", "",
             f"Regenerate with `{command}` (cells are reused from `--work_dir` when present; "
             "`--only=METHOD:IPC` re-runs one cell).", "",
             f"- Generated {datetime.date.today()}; {versions()}.",
             f"- Distillation budget: {budget['note']}. Flags of every distilled row: "
             f"`{' '.join(budget['train']) or '(preset)'}` plus the row's own flag; "
             "iterations per IPC: " + ", ".join(
                 f"IPC {i}: {budget['iterations'].get(i) or 20000}" for i in ipcs)
             + "; seed 0; factor 2, init mix.",
             "- Evaluation: `ncfm` protocol (AdamW, DSA + CutMix, ×0.5 at 20/40/60/80 %), "
             "ConvNet-3, epochs per IPC: "
             + ", ".join(f"IPC {i}: {budget['epochs'].get(i) or 2000}" for i in ipcs)
             + f"; mean ± std over {repeats} freshly trained networks per cell (one distilled "
             "set per cell; the random row draws a new subset per network).",
             "- **final** = accuracy after the last epoch (the headline); **best-seen** = best "
             "test accuracy seen during training (tested 10 times per run), which selects on "
             "the test set and is shown only because papers report it.",
             f"- Time: {compute_hours(records):.1f} h of wall time summed over the cells' "
             "distillations and evaluations (the pool they share is cached and not counted)"
             + ("." if FLAGS.tabulate else f"; this run of the suite took {seconds / 3600:.1f}"
                " h (cells reused from earlier runs cost nothing)."), "",
             "## Test accuracy (%), final", "",
             "| method | " + " | ".join(f"IPC {i}" for i in ipcs) + " |",
             "|---|" + "---|" * len(ipcs)]
    for m in methods:
        lines.append(f"| {LABELS[m]} | " + " | ".join(
            cell_text(records.get((m, i)), "convnet") for i in ipcs) + " |")
    lines += ["", "## Test accuracy (%), best-seen (selects on the test set)", "",
              "| method | " + " | ".join(f"IPC {i}" for i in ipcs) + " |",
              "|---|" + "---|" * len(ipcs)]
    for m in methods:
        lines.append(f"| {LABELS[m]} | " + " | ".join(
            cell_text(records.get((m, i)), "convnet", "best_seen") for i in ipcs) + " |")
    if FLAGS.cross_arch and 10 in ipcs:
        lines += ["", "## Cross-architecture, IPC 10 (distilled with ConvNet-3), final", "",
                  f"{budget['cross_epochs'] or 2000} epochs, {budget['cross_repeats']} "
                  "network(s) per cell for the other architectures (ConvNet column as above); "
                  "the sets are the IPC 10 sets of the table.",
                  "", "| method | ConvNet-3 | AlexNet | VGG-11 | ResNet-18 |",
                  "|---|---|---|---|---|"]
        for m in [m for m in methods if m in budget["cross_methods"]]:
            record = records.get((m, 10))
            lines.append(f"| {LABELS[m]} | " + " | ".join(
                cell_text(record, a) for a in ["convnet"] + CROSS_ARCHS) + " |")
        costs = [f"{m} {a} {e['seconds'] / 60:.1f} min ({e['peak_mib']} MiB)"
                 for m in methods if m in budget["cross_methods"]
                 for a, e in (records.get((m, 10)) or {}).get("evaluations", {}).items()
                 if a != "convnet"]
        if costs:
            lines += ["", "Their evaluations took " + ", ".join(costs) + "."]
    lines += ["", "## Cost per cell", "",
              "| cell | distillation | its peak RSS | evaluation (ConvNet, all repeats) | its "
              "peak RSS |",
              "|---|---|---|---|---|"]
    for m in methods:
        for i in ipcs:
            record = records.get((m, i)) or {}
            convnet = evaluation_of(record) or {}
            distill = (f"{record['distill_seconds'] / 60:.1f} min | "
                       f"{record['distill_peak_mib']} MiB" if "distill_seconds" in record
                       else "— | —")
            evaluation = (f"{convnet['seconds'] / 60:.1f} min | {convnet['peak_mib']} MiB"
                          if convnet else "pending | —")
            lines.append(f"| {m} IPC {i} | {distill} | {evaluation} |")
    pools = sorted({r.get("pool") for r in records.values() if r and r.get("pool")})
    if pools:
        lines += ["", "Pool: " + "; ".join(pools) + " (train.py's log line: the first "
                  "distillation trains the pool unless it is cached already; the others reuse "
                  "it)."]
    if FLAGS.dataset in PUBLISHED:
        published = PUBLISHED[FLAGS.dataset]
        lines += ["", "## Published numbers (not ours; ConvNet-3, as the papers report them, "
                  "each at its paper's full budget)", "",
                  "| method | IPC 1 | IPC 10 | IPC 50 |", "|---|---|---|---|"]
        lines += [f"| {name} (published) | " + " | ".join(
            "not reported" if v is None else f"{v:.1f}" for v in values) + " |"
            for name, values in published["methods"].items()]
        lines += [f"| whole dataset (published) | {published['whole']} | | |"]
    lines += ["", "## NCFM against the other rows and the published numbers", "",
              "Differences of final accuracy in points; *within noise* marks one smaller than "
              "the two cells' standard deviations combined, √(s₁² + s₂²).", "",
              *(comparison(records, ipcs, methods) or ["- pending"])]
    lines += ["", "## Exact commands", ""]
    for m in methods:
        for i in ipcs:
            record = records.get((m, i)) or {}
            for command in [record.get("distill_command")] + [
                    e["command"] for e in record.get("evaluations", {}).values()]:
                if command:
                    lines.append(f"    python {command}")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)


def main(argv):
    del argv
    # The cells' commands run in the project directory: paths relative to here go absolute.
    for name in ("data_dir", "work_dir", "pool_dir", "output"):
        if FLAGS[name].value:
            FLAGS[name].value = os.path.abspath(os.path.expanduser(FLAGS[name].value))
    if FLAGS.dataset.startswith("folder:"):
        FLAGS.dataset = "folder:" + os.path.abspath(os.path.expanduser(FLAGS.dataset[7:]))
    budget = dict(BUDGETS[FLAGS.budget])
    repeats = FLAGS.repeats or budget["repeats"]
    ipcs = [int(i) for i in FLAGS.ipcs]
    methods = FLAGS.methods
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise app.UsageError(f"--methods: unknown {unknown}; use {', '.join(METHODS)}")
    if FLAGS.jobs < 1:
        raise app.UsageError(f"--jobs={FLAGS.jobs}: use 1 or more")
    cells = [(m, i) for i in ipcs for m in methods]
    if FLAGS.only:
        method, _, ipc = FLAGS.only.partition(":")
        if method not in METHODS or not ipc.isdigit():
            raise app.UsageError(f"--only={FLAGS.only}: use METHOD:IPC, e.g. ncfm:10")
        cells, ipcs, methods = [(method, int(ipc))], [int(ipc)], [method]
    work_dir = FLAGS.work_dir or os.path.join(ROOT, "results", "{}_{}".format(
        FLAGS.dataset.replace(":", "_").replace("/", "_"), FLAGS.budget))
    pool_dir = FLAGS.pool_dir or os.path.join(work_dir, "pools")
    output = FLAGS.output or (os.path.join(work_dir, "RESULTS.md") if FLAGS.only else
                              os.path.join(ROOT, "RESULTS.md"))
    command = " ".join(["python benchmarks/results.py"] + [
        FLAGS[name].serialize() for name in ("dataset", "data_dir", "budget", "ipcs", "methods",
                                             "repeats", "cross_arch") if FLAGS[name].present])
    start = time.time()
    records = {cell: load_record(work_dir, *cell) for cell in cells}
    # ConvNet cells first (the table), then the cross-architecture evaluations of IPC 10.
    passes = [["convnet"]] + ([CROSS_ARCHS] if FLAGS.cross_arch and not FLAGS.only else [])
    lock = threading.Lock()

    def compute(cell, archs):
        record = run_cell(*cell, archs, work_dir, budget, repeats, pool_dir)
        with lock:
            records[cell] = record
            write_table(output, records, ipcs, methods, FLAGS.budget, budget, repeats,
                        command, time.time() - start)

    for archs in passes:
        todo = [(m, i) for m, i in cells
                if archs != CROSS_ARCHS or (i == 10 and m in budget["cross_methods"])]
        if FLAGS.tabulate:
            write_table(output, records, ipcs, methods, FLAGS.budget, budget, repeats,
                        command, time.time() - start)
            continue
        # With several jobs, the first distillation runs alone (its evaluations join the
        # others): it trains the shared pool unless cached, which the others then load
        # instead of training it concurrently.
        fresh = [c for c in todo if METHODS[c[0]] is not None and
                 "distill_seconds" not in records[c]]
        for cell in fresh[:1] if FLAGS.jobs > 1 else []:
            compute(cell, [])
        with concurrent.futures.ThreadPoolExecutor(FLAGS.jobs) as pool:
            list(pool.map(compute, todo, [archs] * len(todo)))
    print(f"wrote {output}")


if __name__ == "__main__":
    app.run(main)
