"""Regenerates the results table (RESULTS.md) end to end: distil, evaluate, tabulate.

    python benchmarks/results.py                                   # Fashion-MNIST, this CPU
    python benchmarks/results.py --budget=paper --dataset=cifar10  # paper scale, on a GPU
    python benchmarks/results.py --only=ncfm:10 --work_dir=/tmp/check   # one row's cells again
    python benchmarks/results.py --tabulate                        # only rewrite RESULTS.md

The table takes the form the field now expects (DD-Ranking, NUS-HPC-AI-Lab, 2025): final-epoch
accuracy as the headline, a random real subset under the identical recipe, the improvement over
it, and hard and soft labels never mixed. Rows: a random real subset and herding
(`evaluate.py --baseline=...`), DM (`--loss=mmd`), NCFM without psi (`--sampling_net=false`),
NCFM (train.py's defaults) and the whole training set (`--baseline=whole`, the ceiling);
columns: IPC 1 / 10 / 50. Every distilled row runs `train.py` with the budget's flags plus its
own, once per distillation seed of the budget at that IPC. Every set is evaluated by
`evaluate.py` under the ncfm protocol on ConvNet-3 with hard labels; a cell shows the mean ±
std of the final accuracy over all networks of all its seeds, and every row its improvement
over random (IOR) and its gap to the whole set. Then, at the budget's focus IPC (10) and on the
seed-0 sets: soft labels (`--labels=teacher`, `teacher_per_batch`) with the random subset under
the same teacher, the other architectures, and NCFM's accuracy against iterations (`train.py
--eval_every`, drawn into accuracy_vs_iterations.png). A last section reads the held-out
equal-budget check against the official code (results/equal_budget_b0/, made by
`benchmarks/ablation_b0.py --split=test`) without recomputing it.

Each cell lives in `--work_dir/<cell>/`: the distilled set, the logs, every evaluation.json and
cell.json, which records each step's command, wall time, peak RSS, machine and how many cells
ran at once. A finished step is reused, so an interrupted suite continues where it stopped and
a finished one only re-tabulates; a recorded step whose command differs from the one this run
would issue is refused (the budget changed). Timings are clean only with `--jobs=1` on a
machine that runs nothing else. Progress goes to stdout.
"""

import concurrent.futures
import datetime
import glob
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import typing

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DISTILLED = {  # row -> its train.py flags beyond the budget's
    "dm": ["--loss=mmd"],
    "ncfm_nopsi": ["--sampling_net=false"],
    "ncfm": [],  # the defaults
}
ROWS = ["random", "herding", "dm", "ncfm_nopsi", "ncfm", "whole"]  # the others: --baseline=row
LABELS = {"random": "Random real subset", "herding": "Herding",
          "dm": "DM (`--loss=mmd`)", "ncfm_nopsi": "NCFM without ψ (`--sampling_net=false`)",
          "ncfm": "NCFM (the defaults: ψ on)", "whole": "Whole training set"}
SHORT = {"random": "random", "herding": "herding", "dm": "DM", "ncfm_nopsi": "NCFM without ψ",
         "ncfm": "NCFM", "whole": "the whole set"}
SOFT_MODES = ["teacher", "teacher_per_batch"]
CROSS_ARCHS = ["alexnet", "vgg11", "resnet18"]
ARCH_NAMES = {"convnet": "ConvNet-3", "alexnet": "AlexNet", "vgg11": "VGG-11",
              "resnet18": "ResNet-18"}
# What a budget fixes. `train`: train.py flags of every distilled row (beyond the dataset's
# preset); per IPC: `iterations` (absent: the preset's 20000), distillation `seeds` (absent:
# [0]) and evaluation `repeats`; `epochs`: of every evaluation (None: the protocol's 2000) but
# the whole set's (`whole_epochs`, `whole_repeats`); at `focus_ipc`, on the seed-0 sets: soft
# labels for `soft_rows` (random needs ncfm: its teacher's set), the last `hard_label_epochs`
# hard (None: the official 101), other architectures for `cross_rows`, and the curve: NCFM
# evaluated every `curve_every` iterations for `curve_epochs` epochs. `note`: RESULTS.md's top
# line.
BUDGETS = {
    "cpu": dict(
        train=["--num_pretrained=2", "--pretrain_epochs=1", "--batch_real=256",
               "--num_freqs=4096"],
        iterations={1: 100, 10: 100, 50: 50}, seeds={10: [0, 1]},
        epochs=300, repeats={1: 3, 10: 3, 50: 2}, whole_epochs=3, whole_repeats=3,
        focus_ipc=10, soft_rows=["random", "ncfm"], hard_label_epochs=15,
        cross_rows=["random", "ncfm"], cross_epochs=100, cross_repeats=2,
        curve_every=20, curve_epochs=300,
        note="this 2-core CPU, about 7.8 h of cells run one at a time (estimated from measured "
             "paces, docs/measurements.md): 100 distillation iterations at IPC 1 and 10, 50 at "
             "IPC 50, seeds 0 and 1 at IPC 10, a pool of 2 ConvNets pretrained for 1 epoch per "
             "seed, 256 real images per class, 4096 frequencies; ncfm protocol, 300 epochs, 3 "
             "networks per set (2 at IPC 50); the whole training set 3 epochs, 3 networks; "
             "at IPC 10 soft labels, other architectures (100 epochs, 2 networks) and the "
             "curve (every 20 iterations)"),
    "smoke": dict(  # checks the whole pipeline in minutes; its numbers mean nothing
        train=["--log_every=1", "--num_pretrained=1", "--pretrain_epochs=0", "--batch_real=8",
               "--num_freqs=64"],
        iterations={1: 2, 10: 2, 50: 2}, seeds={1: [0, 1], 10: [0, 1], 50: [0, 1]},
        epochs=1, repeats={1: 2, 10: 2, 50: 2}, whole_epochs=1, whole_repeats=1,
        focus_ipc=10, soft_rows=["random", "ncfm"], hard_label_epochs=0,
        cross_rows=["ncfm"], cross_epochs=1, cross_repeats=1, curve_every=1, curve_epochs=1,
        note="smoke test: 2 iterations, an untrained pool of 1 ConvNet, 1 epoch (numbers mean "
             "nothing)"),
    "paper": dict(
        train=[], iterations={}, seeds={1: [0, 1, 2], 10: [0, 1, 2], 50: [0, 1, 2]},
        epochs=None, repeats={1: 5, 10: 5, 50: 5}, whole_epochs=100, whole_repeats=3,
        focus_ipc=10, soft_rows=["random", *DISTILLED], hard_label_epochs=None,
        cross_rows=["random", *DISTILLED], cross_epochs=None, cross_repeats=3,
        curve_every=2000, curve_epochs=None,
        note="paper scale, on a GPU: the dataset's preset (20000 iterations, a pool of 20 "
             "ConvNets pretrained for 60 epochs), 3 seeds, the protocol's 2000 epochs, 5 "
             "networks per set; the whole training set 100 epochs"),
}
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
flags.DEFINE_list("methods", ROWS, "Rows.")
flags.DEFINE_integer("repeats", None, "Evaluation networks per set in the main table "
                     "(default: the budget's).")
flags.DEFINE_bool("cross_arch", True, "Also evaluate the focus IPC's sets on AlexNet, VGG-11, "
                  "ResNet-18.")
flags.DEFINE_bool("tabulate", False, "Compute nothing: write the table from the steps that "
                  "are finished (the others show as pending).")
flags.DEFINE_integer("jobs", 1, "Cells computed at once, each in its own processes (their "
                     "timings then share the CPU).")
flags.DEFINE_string("only", None, "Run just this row's cells at this IPC, `row:ipc` (e.g. "
                    "ncfm:10, every seed), or `whole`.")
flags.DEFINE_string("work_dir", None, "Cells go here (default results/table/<dataset>_<budget>).")
flags.DEFINE_string("pool_dir", None, "Pretrained-pool cache (default: <work_dir>/pools, kept "
                    "with the cells so that cells computed on different days share one pool).")
flags.DEFINE_string("equal_budget_dir", os.path.join(ROOT, "results", "equal_budget_b0"),
                    "The committed cells of `benchmarks/ablation_b0.py --split=test`.")
flags.DEFINE_string("output", None, "The Markdown file (default RESULTS.md beside train.py; "
                    "with --only: <work_dir>/RESULTS.md).")
FLAGS = flags.FLAGS


class Cell(typing.NamedTuple):
    """One folder of the suite: a row's set at an IPC and distillation seed (`seed` None for
    the real-data rows, `ipc` None for the whole set); row "curve" is NCFM distilled again with
    evaluations along the way."""
    row: str
    ipc: typing.Optional[int] = None
    seed: typing.Optional[int] = None

    @property
    def name(self):
        if self.ipc is None:
            return self.row
        name = f"{self.row}_ipc{self.ipc}"
        return name if self.seed is None else f"{name}_seed{self.seed}"

    @property
    def title(self):
        if self.ipc is None:
            return SHORT[self.row]
        name = "NCFM, the curve" if self.row == "curve" else SHORT[self.row]
        return f"{name} IPC {self.ipc}" + ("" if self.seed is None else f" seed {self.seed}")


class Evaluation(typing.NamedTuple):
    """One evaluate.py run on a cell's set: its folder and cell.json entry are `key`."""
    key: str
    archs: list
    labels: str
    epochs: typing.Optional[int]
    repeats: int


class Suite(typing.NamedTuple):
    """What every command of a run shares."""
    budget: dict
    work_dir: str
    pool_dir: str
    data_flags: list  # --dataset, --data_dir


def seeds(budget, ipc):
    return budget["seeds"].get(ipc, [0])


def repeats(budget, ipc):
    """Evaluation networks per set at `ipc` (one the budget does not list: the focus IPC's)."""
    return FLAGS.repeats or budget["repeats"].get(ipc, budget["repeats"][budget["focus_ipc"]])


def cells_of(row, ipc, budget):
    """The cells that make a row's entry at an IPC: one per distillation seed."""
    if row == "whole":
        return [Cell("whole")]
    if row in DISTILLED:
        return [Cell(row, ipc, seed) for seed in seeds(budget, ipc)]
    return [Cell(row, ipc)]


def main_evaluation(cell, budget):
    """The table's evaluation: ConvNet-3, hard labels."""
    if cell.row == "whole":
        return Evaluation("convnet", ["convnet"], "hard", budget["whole_epochs"],
                          FLAGS.repeats or budget["whole_repeats"])
    return Evaluation("convnet", ["convnet"], "hard", budget["epochs"],
                      repeats(budget, cell.ipc))


def extra_evaluations(cell, budget, rows):
    """Soft labels and other architectures, for the focus IPC's seed-0 (or real-data) sets."""
    if cell.ipc != budget["focus_ipc"] or cell.seed not in (None, 0):
        return []
    extras = []
    if cell.row in budget["soft_rows"] and "ncfm" in rows:
        extras += [Evaluation(f"convnet_{mode}", ["convnet"], mode, budget["epochs"],
                              repeats(budget, cell.ipc)) for mode in SOFT_MODES]
    if cell.row in budget["cross_rows"] and FLAGS.cross_arch:
        extras.append(Evaluation("cross", CROSS_ARCHS, "hard", budget["cross_epochs"],
                                 budget["cross_repeats"]))
    return extras


def plan(budget, ipcs, rows):
    """The suite's work in two passes of `(cell, evaluations)`: the table's cells, then the
    focus IPC's extras and the curve (after the table's cells: random's soft labels take their
    teacher from the NCFM set)."""
    cells = []
    for ipc in ipcs:
        for row in rows:
            cells += [cell for cell in cells_of(row, ipc, budget) if cell not in cells]
    table = [(cell, [main_evaluation(cell, budget)]) for cell in cells]
    extras = [(cell, extra_evaluations(cell, budget, rows)) for cell in cells]
    extras = [(cell, evaluations) for cell, evaluations in extras if evaluations]
    if "ncfm" in rows and budget["focus_ipc"] in ipcs:
        extras.append((Cell("curve", budget["focus_ipc"], 0), []))
    return [table, extras]


def optional(name, value):
    """`[--name=value]`, or nothing for None (the command's default)."""
    return [] if value is None else [f"--{name}={value}"]


def cell_dir(suite, cell):
    return os.path.join(suite.work_dir, cell.name)


def distilled_path(suite, cell):
    return os.path.join(cell_dir(suite, cell), "distill", "distilled.npz")


def distill_args(suite, cell):
    """train.py's command line for a distilled cell (or the curve)."""
    budget = suite.budget
    curve = cell.row == "curve"
    own = DISTILLED["ncfm" if curve else cell.row]
    evaluations = ([f"--eval_every={budget['curve_every']}",
                    *optional("eval_epochs", budget["curve_epochs"])] if curve else [])
    return [sys.executable, "train.py", *suite.data_flags, f"--ipc={cell.ipc}",
            *budget["train"], *optional("iterations", budget["iterations"].get(cell.ipc)),
            *own, f"--seed={cell.seed}", *evaluations,
            f"--output_dir={os.path.join(cell_dir(suite, cell), 'distill')}",
            f"--pool_dir={suite.pool_dir}"]


def evaluate_args(suite, cell, evaluation):
    """evaluate.py's command line for one evaluation of a cell."""
    if cell.seed is not None:
        source = [f"--distilled={distilled_path(suite, cell)}", *suite.data_flags[1:]]
    elif cell.row == "whole":
        source = [*suite.data_flags, "--baseline=whole"]
    else:
        source = [*suite.data_flags, f"--baseline={cell.row}", f"--ipc={cell.ipc}"]
    labels = []
    if evaluation.labels != "hard":
        teacher = [] if cell.seed is not None else [
            f"--teacher_of={distilled_path(suite, Cell('ncfm', cell.ipc, 0))}"]
        labels = [f"--labels={evaluation.labels}", *teacher, f"--pool_dir={suite.pool_dir}",
                  *optional("hard_label_epochs", suite.budget["hard_label_epochs"])]
    return [sys.executable, "evaluate.py", *source, "--protocol=ncfm",
            f"--arch={','.join(evaluation.archs)}", f"--repeats={evaluation.repeats}",
            *optional("epochs", evaluation.epochs), *labels,
            f"--output_dir={os.path.join(cell_dir(suite, cell), 'eval_' + evaluation.key)}"]


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


def machine():
    """The CPU a step ran on (cells may be computed on several machines): its model where
    Linux names it (`platform` does not), and its cores."""
    model = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), model)
    return f"{model}, {os.cpu_count()} cores"


def load_record(suite, cell):
    path = os.path.join(cell_dir(suite, cell), "cell.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def save_record(suite, cell, record):
    path = os.path.join(cell_dir(suite, cell), "cell.json")
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)


def steps_of(suite, cell, evaluations):
    """`(key, args)` of the cell's steps: its distillation (unless a real-data row), then its
    evaluations."""
    steps = [("distill", distill_args(suite, cell))] if cell.seed is not None else []
    return steps + [(e.key, evaluate_args(suite, cell, e)) for e in evaluations]


def recorded(record, key):
    return record.get("distill") if key == "distill" else record.get("evaluations", {}).get(key)


def check_current(suite, cell, evaluations, record):
    """Refuses a finished step that another command made: the table would misstate it."""
    for key, args in steps_of(suite, cell, evaluations):
        step = recorded(record, key)
        if step and step["command"] != shown(args):
            raise SystemExit(f"{cell_dir(suite, cell)}: its step {key} was made by\n  "
                             f"{step['command']}\nthis budget makes it by\n  {shown(args)}\n"
                             "delete that folder to recompute it, or pass another --work_dir")


def run_cell(suite, cell, evaluations, record, jobs):
    """Runs the cell's steps that have not finished, recording each in cell.json as it ends
    (with `jobs`, the most cells that may run at once)."""
    os.makedirs(cell_dir(suite, cell), exist_ok=True)
    for key, args in steps_of(suite, cell, evaluations):
        if recorded(record, key):
            continue
        what = "distilling" if key == "distill" else f"evaluating {key}"
        print(f"[{time.strftime('%H:%M:%S')}] {cell.title}: {what}", flush=True)
        folder = "distill" if key == "distill" else f"eval_{key}"  # the command's output_dir
        log = os.path.join(cell_dir(suite, cell), f"{folder}.log")
        seconds, peak = run_logged(args, log)
        step = dict(command=shown(args), seconds=seconds, peak_mib=peak, machine=machine(),
                    jobs=jobs)
        if key == "distill":
            step.update(pool=log_line(log, "pool ready"), distilled=log_line(log, "distilled "))
            if cell.row == "curve":
                with open(os.path.join(cell_dir(suite, cell), folder, "evaluation.json")) as f:
                    step["curve"] = json.load(f)["history"]
            record["distill"] = step
        else:
            with open(os.path.join(cell_dir(suite, cell), folder, "evaluation.json")) as f:
                result = json.load(f)
            step.update(
                epochs=next(iter(result["archs"].values()))["runs"][0]["epochs"],
                images=result["source"].get("images"),
                teacher_accuracy=result["labels"].get("teacher_accuracy"),
                archs={arch: dict(final=[r["final"] for r in a["runs"]],
                                  best_seen=[r["best_seen"] for r in a["runs"]])
                       for arch, a in result["archs"].items()})
            record.setdefault("evaluations", {})[key] = step
        save_record(suite, cell, record)
    return record


# --- The table ------------------------------------------------------------------------------

def pooled(records, cells, key="convnet", arch="convnet", stat="final"):
    """Every network's `stat` over the finished evaluations `key` of `cells` (all seeds of a
    row), and how many of the cells have finished it."""
    finished = [e for e in (recorded(records.get(c, {}), key) for c in cells) if e]
    return [v for e in finished for v in e["archs"][arch][stat]], len(finished)


def spread(values):
    """`(mean, std)` of networks' accuracies (population std, as evaluate.py's summary)."""
    return statistics.fmean(values), statistics.pstdev(values)


def entry(values, finished=1, total=1):
    """A table entry: mean ± std (a mean alone for one network), or pending."""
    if not values:
        return "pending"
    mean, std = spread(values)
    text = f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ± {std:.2f}"
    return text + (f" ({finished} of {total} seeds)" if finished < total else "")


def mean_of(records, cells):
    """The mean final accuracy of the table's entry of `cells`, or None when pending."""
    values, _ = pooled(records, cells)
    return statistics.fmean(values) if values else None


def difference(ours, theirs):
    """`ours - theirs` (value lists) in points and the combined spread sqrt(s1^2 + s2^2)."""
    (mean, std), (other, other_std) = spread(ours), spread(theirs)
    return mean - other, math.hypot(std, other_std)


def noise_text(delta, combined):
    verdict = "within noise" if abs(delta) < combined else "beyond the spread"
    return f"{delta:+.2f} (combined spread {combined:.2f}: {verdict})"


def versions():
    from importlib.metadata import version

    return (f"Python {platform.python_version()}, TensorFlow {version('tensorflow')}, "
            f"Keras {version('keras')}, NumPy {version('numpy')}; {platform.platform()}, "
            f"{os.cpu_count()} CPU cores")


def all_steps(records):
    """Every finished step as `(cell, name, step)`."""
    for cell, record in records.items():
        if record.get("distill"):
            yield cell, "distill", record["distill"]
        for key, step in record.get("evaluations", {}).items():
            yield cell, key, step


def header(suite, ipcs, command, seconds, records):
    """The top of the page: the budget in one line, how to regenerate, the versions, the
    recipe and the time the cells took."""
    budget = suite.budget
    networks = ", ".join(f"IPC {i}: {len(seeds(budget, i))} seed(s) × {repeats(budget, i)} "
                         "networks" for i in ipcs)
    hours = sum(step["seconds"] for _, _, step in all_steps(records)) / 3600
    this_run = "" if FLAGS.tabulate else (f"; this run of the suite took {seconds / 3600:.1f} h "
                                          "(cells reused from earlier runs cost nothing)")
    return [
        f"# Results: {FLAGS.dataset}, budget `{FLAGS.budget}`", "",
        f"**Budget:** {budget['note']}.", "",
        f"Regenerate with `{command}` (finished cells are reused from `--work_dir`; "
        "`--only=ROW:IPC` re-runs one row's cells, `--tabulate` only rewrites this file).", "",
        f"- Generated {datetime.date.today()}; tabulated on {versions()}.",
        f"- Distillation: `train.py` with `{' '.join(budget['train']) or '(the preset)'}` plus "
        "the row's own flag and `--seed`, the defaults otherwise (factor 2, mix init, "
        "per-class image steps); iterations per IPC: " + ", ".join(
            f"IPC {i}: {budget['iterations'].get(i) or 20000}" for i in ipcs) + ".",
        f"- Evaluation: `evaluate.py --protocol=ncfm` (AdamW, DSA + CutMix, ×0.5 at "
        f"20/40/60/80 %), ConvNet-3, hard labels, {budget['epochs'] or 2000} epochs; "
        f"{networks}. A cell is the mean ± std of the final accuracy over **all networks of all "
        "distillation seeds** (the random row draws a new subset per network). The whole "
        f"training set trains {budget['whole_epochs'] or 2000} epochs, not "
        f"{budget['epochs'] or 2000}: a lower bound on the ceiling, at the cost this budget "
        "allows.",
        "- **final** = accuracy after the last epoch (the headline); **best-seen** = the best "
        "of the tests every 100 epochs and after the last, which selects on the test set and is "
        "shown only because papers report it.",
        f"- Time: {hours:.1f} h of wall time summed over every step of every cell{this_run}.",
        ""]


def main_tables(records, ipcs, rows, budget):
    """Final and best-seen accuracy, then IOR and the gap to the whole set."""
    head = ["| method | " + " | ".join(f"IPC {i}" for i in ipcs) + " |",
            "|---|" + "---|" * len(ipcs)]
    labels = dict(LABELS)
    whole = recorded(records.get(Cell("whole"), {}), "convnet")
    labels["whole"] += (f" (`--baseline=whole`, {whole['images'] if whole else 'all'} images, "
                        f"{budget['whole_epochs'] or 2000} epochs)")
    lines = []
    for title, stat in (("final", "final"), ("best-seen (selects on the test set)", "best_seen")):
        lines += [f"## Test accuracy (%), {title}: ConvNet-3, hard labels", "", *head]
        for row in rows:
            entries = []
            for i in ipcs:
                cells = cells_of(row, i, budget)
                values, finished = pooled(records, cells, stat=stat)
                entries.append(entry(values, finished, len(cells)))
            lines.append(f"| {labels[row]} | " + " | ".join(entries) + " |")
        lines.append("")
    lines += ["## Improvement over random (IOR) and gap to the whole set, points (final)", "",
              "IOR = the row's mean − the random subset's; gap = the whole set's mean − the "
              "row's (how far below the ceiling).", "",
              "| method | " + " | ".join(f"IOR, IPC {i} | gap, IPC {i}" for i in ipcs) + " |",
              "|---|" + "---|---|" * len(ipcs)]
    whole_mean = mean_of(records, [Cell("whole")])
    for row in [r for r in rows if r not in ("random", "whole")]:
        entries = []
        for i in ipcs:
            mean = mean_of(records, cells_of(row, i, budget))
            random = mean_of(records, [Cell("random", i)])
            entries.append("pending" if mean is None or random is None
                           else f"{mean - random:+.2f}")
            entries.append("pending" if mean is None or whole_mean is None
                           else f"{whole_mean - mean:.2f}")
        lines.append(f"| {LABELS[row]} | " + " | ".join(entries) + " |")
    return lines + [""]


def verdicts(records, rows, budget):
    """NCFM against DM and against NCFM without psi at the focus IPC, over its seeds: the
    difference, the combined spread and each seed's mean."""
    focus = budget["focus_ipc"]
    ncfm, _ = pooled(records, cells_of("ncfm", focus, budget))
    lines, within = [], False
    for other in [r for r in ("dm", "ncfm_nopsi") if r in rows]:
        theirs, _ = pooled(records, cells_of(other, focus, budget))
        if not (ncfm and theirs):
            continue
        delta, combined = difference(ncfm, theirs)
        within |= abs(delta) < combined
        per_seed = " / ".join(entry(pooled(records, [cell])[0])
                              for cell in cells_of(other, focus, budget))
        lines.append(f"- **IPC {focus}, NCFM − {SHORT[other]}: {noise_text(delta, combined)}**;"
                     f" {SHORT[other]} per seed: {per_seed}.")
    if not lines:
        return []
    per_seed = " / ".join(entry(pooled(records, [cell])[0])
                          for cell in cells_of("ncfm", focus, budget))
    lines.append(f"- NCFM per seed at IPC {focus}: {per_seed}.")
    if within:
        lines.append(f"- At this budget NCFM is within noise of the other method(s) at IPC "
                     f"{focus}; the accuracy against iterations below shows whether more "
                     "iterations would separate them.")
    return lines + [""]


def comparison(records, ipcs, rows, budget):
    """The focus IPC's verdicts, then each NCFM row against the others and the best published
    number at every IPC."""
    published = PUBLISHED.get(FLAGS.dataset, {}).get("methods", {})
    lines = []
    for i in ipcs:
        for row in [r for r in ("ncfm", "ncfm_nopsi") if r in rows]:
            ours, _ = pooled(records, cells_of(row, i, budget))
            if not ours:
                continue
            others = []
            for other in [r for r in rows if r not in (row, "whole")]:
                theirs, _ = pooled(records, cells_of(other, i, budget))
                if theirs:
                    delta, combined = difference(ours, theirs)
                    others.append(f"{delta:+.2f} vs {SHORT[other]}"
                                  + (" (within noise)" if abs(delta) < combined else ""))
            text = f"- IPC {i}, {SHORT[row]}: {statistics.fmean(ours):.2f}, " + ", ".join(others)
            if i in PUBLISHED_IPCS:
                column = PUBLISHED_IPCS.index(i)
                reported = {name: values[column] for name, values in published.items()
                            if values[column] is not None}
                if reported:
                    best = max(reported, key=reported.get)
                    gap = reported[best] - statistics.fmean(ours)
                    text += (f"; the best published number ({best}, at its full budget) is "
                             f"{reported[best]:.1f}, {abs(gap):.1f} points "
                             f"{'above' if gap > 0 else 'below'} ours")
            lines.append(text + ".")
    return ["## NCFM against the other rows and the published numbers", "",
            "Differences of final accuracy in points; the combined spread is √(s₁² + s₂²) of "
            "the two entries' std over all their networks and seeds, and *within noise* marks "
            "a difference smaller than it.", "", *verdicts(records, rows, budget),
            *(lines or ["- pending"]), ""]


def soft_table(records, rows, budget):
    """Soft labels beside hard ones, the same sets, under one teacher."""
    focus = budget["focus_ipc"]
    soft_rows = [r for r in budget["soft_rows"] if r in rows]
    if "ncfm" not in rows or not soft_rows:
        return []
    cells = [Cell(r, focus, None if r == "random" else 0) for r in soft_rows]
    steps = [recorded(records.get(cell, {}), f"convnet_{mode}") for cell in cells
             for mode in SOFT_MODES]
    teachers = sorted({step["teacher_accuracy"] for step in steps if step})  # one, if all's well
    teacher_text = " / ".join(f"{accuracy:.2f} %" for accuracy in teachers) or "pending"
    hard_epochs = budget["hard_label_epochs"]
    lines = [f"## Soft labels, IPC {focus}: ConvNet-3, final (%)", "",
             f"The seed-0 sets and the random subset, each under the same teacher: member 0 of "
             f"the seed-0 pool (its own test accuracy: **{teacher_text}**). `teacher`: its "
             "softmax on each image, the official recipe; `teacher_per_batch`: its softmax on "
             f"every augmented batch; both train on the hard labels in the last "
             f"{101 if hard_epochs is None else hard_epochs} epochs. The hard column is the "
             "same set with hard labels (seed 0 only, so it can differ from the main table). "
             "Never compare a soft entry with a hard one.", "",
             "| set | hard | " + " | ".join(f"`{m}`" for m in SOFT_MODES) + " |",
             "|---|---|" + "---|" * len(SOFT_MODES)]
    for cell in cells:
        entries = [entry(pooled(records, [cell], key)[0])
                   for key in ["convnet"] + [f"convnet_{m}" for m in SOFT_MODES]]
        lines.append(f"| {LABELS[cell.row]} | " + " | ".join(entries) + " |")
    return lines + [""]


def cross_table(records, rows, budget):
    """The focus IPC's seed-0 sets on other architectures, beside ConvNet-3."""
    focus = budget["focus_ipc"]
    cross_rows = [r for r in budget["cross_rows"] if r in rows]
    if not FLAGS.cross_arch or not cross_rows:
        return []
    lines = [f"## Cross-architecture, IPC {focus}: final (%)", "",
             f"The seed-0 sets (distilled with ConvNet-3) and the random subset; "
             f"{budget['cross_epochs'] or 2000} epochs, {budget['cross_repeats']} networks per "
             f"entry on the other architectures (the ConvNet-3 column: the main table's "
             f"evaluation of the same set, {budget['epochs'] or 2000} epochs).", "",
             "| method | " + " | ".join(ARCH_NAMES[a] for a in ["convnet"] + CROSS_ARCHS) + " |",
             "|---|" + "---|" * (1 + len(CROSS_ARCHS))]
    for row in cross_rows:
        cell = Cell(row, focus, None if row == "random" else 0)
        entries = [entry(pooled(records, [cell])[0])] + [
            entry(pooled(records, [cell], "cross", arch)[0]) for arch in CROSS_ARCHS]
        lines.append(f"| {LABELS[row]} | " + " | ".join(entries) + " |")
    return lines + [""]


def draw_curve(path, points, references):
    """The curve's final accuracies against iterations, the table's entries as dashed lines."""
    from matplotlib.figure import Figure  # no pyplot: no global figures, no GUI backend

    figure = Figure(figsize=(6, 4))
    axis = figure.subplots()
    axis.plot([p["iteration"] for p in points], [p["final"] for p in points], marker="o",
              label="NCFM (one network per point)")
    for n, (label, value) in enumerate(references.items()):
        axis.axhline(value, linestyle="--", linewidth=1, color=f"C{n + 1}", label=label)
    axis.set(xlabel="distillation iterations", ylabel="test accuracy (%), final")
    axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path + ".tmp", format="png", dpi=100)
    os.replace(path + ".tmp", path)


def curve_section(suite, records, rows, output):
    """NCFM's accuracy against iterations: the picture (drawn here) and its points."""
    budget = suite.budget
    cell = Cell("curve", budget["focus_ipc"], 0)
    if cell not in records:
        return []
    epochs = budget["curve_epochs"] or 2000
    lines = [f"## Accuracy against iterations: NCFM, IPC {cell.ipc}, seed 0", "",
             f"NCFM distilled again with the table's flags, a fresh ConvNet-3 trained on the "
             f"set every {budget['curve_every']} iterations ({epochs} epochs, one network per "
             f"point, final accuracy); dashed: the table's IPC {cell.ipc} entries (means over "
             "their networks and seeds). A curve still rising at the end says the budget, "
             "not the method, limits the numbers.", ""]
    step = recorded(records[cell], "distill")
    if not step:
        return lines + ["pending", ""]
    references = {f"{SHORT[row]} (the table)": mean_of(records, cells_of(row, cell.ipc, budget))
                  for row in rows if row != "whole"}
    picture = os.path.join(suite.work_dir, "accuracy_vs_iterations.png")
    draw_curve(picture, step["curve"], {k: v for k, v in references.items() if v is not None})
    lines += [f"![accuracy against iterations]"
              f"({os.path.relpath(picture, os.path.dirname(output))})", "",
              "| iterations | " + " | ".join(str(p["iteration"]) for p in step["curve"]) + " |",
              "|---|" + "---|" * len(step["curve"]),
              "| final (%) | " + " | ".join(f"{p['final']:.2f}" for p in step["curve"]) + " |"]
    return lines + [""]


def equal_budget(directory, output):
    """The held-out equal-budget check, read from its committed cells: ours at B0 (cell
    `defaults`, every seed) and the official code's own set, on the test split."""
    sets, epochs = {"defaults": [], "official": []}, set()
    for name, finals in sets.items():
        for path in sorted(glob.glob(os.path.join(directory, name, "seed*",
                                                  "evaluation.json"))):
            with open(path) as f:
                result = json.load(f)
            if result["complete"] and result["tested_on"] == "test split":
                runs = result["archs"]["convnet"]["runs"]
                finals += [r["final"] for r in runs]
                epochs |= {r["epochs"] for r in runs}
    page = os.path.relpath(directory + ".md", os.path.dirname(output))
    lines = ["## Beside the official code at equal budget", "",
             f"The held-out check of [{os.path.basename(page)}]({page}), read from its committed "
             "cells, not recomputed: Fashion-MNIST IPC 10 at budget B0 (the budget the official "
             "PyTorch code's own set was made at; that page states it), ours being train.py's "
             "defaults at the commit it names; both evaluated under one protocol (ncfm, "
             f"{' / '.join(map(str, sorted(epochs)))} epochs) on the test split, "
             "mean ± std over all networks of all seeds.", ""]
    if not all(sets.values()):
        return lines + ["pending: run `python benchmarks/ablation_b0.py --split=test`", ""]
    ours, official = sets["defaults"], sets["official"]
    delta, combined = difference(ours, official)
    lines += ["| set | test accuracy (%) | networks |", "|---|---|---|",
              f"| ours at B0 | {entry(ours)} | {len(ours)} |",
              f"| the official code's own set | {entry(official)} | {len(official)} |", "",
              f"Ours − the official: **{noise_text(delta, combined)}**.", ""]
    return lines


def costs(records):
    """One row per step: wall time, peak RSS, machine, and whether it ran alone."""
    lines = ["## Cost per cell", "",
             "Wall time and peak resident memory (RSS, the process and its children) of every "
             "step; a distillation includes its pool when that seed's pool was not cached yet "
             "(train.py's `pool ready` line), the curve's its evaluations.", "",
             "| cell | step | wall time | peak RSS | machine | ran |", "|---|---|---|---|---|---|"]
    for cell, key, step in all_steps(records):
        if key == "distill":
            what = f"distillation ({step['pool']})"
        else:
            archs = ", ".join(ARCH_NAMES[a] for a in step["archs"])
            networks = len(next(iter(step["archs"].values()))["final"])
            labels = key.partition("_")[2] or "hard"
            what = f"{archs}, {labels} labels: {networks} network(s) × {step['epochs']} epochs"
        ran = "alone" if step["jobs"] == 1 else f"up to {step['jobs']} cells at once"
        lines.append(f"| {cell.title} | {what} | {step['seconds'] / 60:.1f} min | "
                     f"{step['peak_mib']} MiB | {step['machine']} | {ran} |")
    return lines + [""]


def published_table():
    if FLAGS.dataset not in PUBLISHED:
        return []
    published = PUBLISHED[FLAGS.dataset]
    lines = ["## Published numbers (not ours; ConvNet-3, as the papers report them, each at its "
             "paper's full budget)", "", "| method | IPC 1 | IPC 10 | IPC 50 |",
             "|---|---|---|---|"]
    lines += [f"| {name} (published) | " + " | ".join(
        "not reported" if v is None else f"{v:.1f}" for v in values) + " |"
        for name, values in published["methods"].items()]
    return lines + [f"| whole dataset (published) | {published['whole']} | | |", ""]


def write_table(path, suite, records, ipcs, rows, command, seconds):
    """RESULTS.md from the cell records (steps not finished yet show as pending)."""
    budget = suite.budget
    lines = [*header(suite, ipcs, command, seconds, records),
             *main_tables(records, ipcs, rows, budget),
             *comparison(records, ipcs, rows, budget),
             *soft_table(records, rows, budget),
             *cross_table(records, rows, budget),
             *curve_section(suite, records, rows, path),
             *equal_budget(FLAGS.equal_budget_dir, path),
             *costs(records),
             *published_table(),
             "## Exact commands", "",
             *[f"    python {step['command']}" for _, _, step in all_steps(records)]]
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)


def main(argv):
    del argv
    # The cells' commands run in the project directory: paths relative to here go absolute.
    for name in ("data_dir", "work_dir", "pool_dir", "output", "equal_budget_dir"):
        if FLAGS[name].value:
            FLAGS[name].value = os.path.abspath(os.path.expanduser(FLAGS[name].value))
    if FLAGS.dataset.startswith("folder:"):
        FLAGS.dataset = "folder:" + os.path.abspath(os.path.expanduser(FLAGS.dataset[7:]))
    budget = BUDGETS[FLAGS.budget]
    ipcs = [int(i) for i in FLAGS.ipcs]
    rows = [r for r in ROWS if r in FLAGS.methods]  # in the table's order
    unknown = [m for m in FLAGS.methods if m not in ROWS]
    if unknown:
        raise app.UsageError(f"--methods: unknown {unknown}; use {', '.join(ROWS)}")
    if FLAGS.jobs < 1:
        raise app.UsageError(f"--jobs={FLAGS.jobs}: use 1 or more")
    if FLAGS.only:  # one row's cells at one IPC, the table's evaluation alone
        row, _, ipc = FLAGS.only.partition(":")
        if row not in ROWS or (row != "whole" and not ipc.isdigit()):
            raise app.UsageError(f"--only={FLAGS.only}: use ROW:IPC (e.g. ncfm:10) or whole")
        rows = [row]
        if row != "whole":
            ipcs = [int(ipc)]
        passes = [[(cell, [main_evaluation(cell, budget)])
                   for cell in cells_of(row, ipcs[0], budget)]]
    else:
        passes = plan(budget, ipcs, rows)
    work_dir = FLAGS.work_dir or os.path.join(ROOT, "results", "table", "{}_{}".format(
        FLAGS.dataset.replace(":", "_").replace("/", "_"), FLAGS.budget))
    data_dir = FLAGS.data_dir or (DEBIAN_FASHION_MNIST if FLAGS.dataset == "fashion_mnist" and
                                  os.path.isdir(DEBIAN_FASHION_MNIST) else None)
    suite = Suite(budget, work_dir, FLAGS.pool_dir or os.path.join(work_dir, "pools"),
                  [f"--dataset={FLAGS.dataset}", *optional("data_dir", data_dir)])
    output = FLAGS.output or (os.path.join(work_dir, "RESULTS.md") if FLAGS.only else
                              os.path.join(ROOT, "RESULTS.md"))
    command = " ".join(["python benchmarks/results.py"] + [
        FLAGS[name].serialize() for name in ("dataset", "data_dir", "budget", "ipcs", "methods",
                                             "repeats", "cross_arch") if FLAGS[name].present])
    start = time.time()
    records = {}
    for tasks in passes:
        for cell, evaluations in tasks:
            if cell not in records:
                records[cell] = load_record(suite, cell)
            check_current(suite, cell, evaluations, records[cell])
    lock = threading.Lock()

    def compute(cell, evaluations, jobs=FLAGS.jobs):
        record = run_cell(suite, cell, evaluations, records[cell], jobs)
        with lock:
            records[cell] = record
            write_table(output, suite, records, ipcs, rows, command, time.time() - start)

    for tasks in [] if FLAGS.tabulate else passes:
        # With several jobs, the first distillation of each seed runs alone (its evaluations
        # join the others): it trains that seed's pool unless cached, which the others then
        # load instead of training it concurrently.
        firsts = {}
        for cell, _ in tasks:
            if cell.seed is not None and not recorded(records[cell], "distill"):
                firsts.setdefault(cell.seed, cell)
        for cell in firsts.values() if FLAGS.jobs > 1 else []:
            compute(cell, [], jobs=1)
        with concurrent.futures.ThreadPoolExecutor(FLAGS.jobs) as pool:
            list(pool.map(lambda task: compute(*task), tasks))
    write_table(output, suite, records, ipcs, rows, command, time.time() - start)
    print(f"wrote {output}")


if __name__ == "__main__":
    app.run(main)
