"""What a run of train.py needs around `fit()`: the resumable state and its checkpoint, the
check that a resumed run is the run it continues, `metrics.csv`, plots and image grids, signals
and evaluation during training, as small Keras callbacks (`callbacks` builds them in order).

`ncfm_keras` holds the method; nothing here changes what it computes.
"""

import contextlib
import csv
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import zipfile

import keras
import numpy as np

import ncfm_keras as nk

CSV_COLUMNS = ("iteration", "matching_loss", "sampler_loss", "calibration_loss",
               "image_grad_norm", "frequency_norm", "learning_rate", "test_accuracy")
# A part of the state that is not finite -> what it is, the likely cause's flag.
STATE_PARTS = {"synthetic": ("the synthetic images", "--image_lr"),
               "image_optimizer": ("the image optimizer's slots", "--image_lr"),
               "sampler": ("psi's weights or batch-norm statistics", "--sampler_lr"),
               "sampler_optimizer": ("psi's optimizer slots", "--sampler_lr")}
# The panels of loss_curves.png: title, CSV columns.
PANELS = (("matching / psi", ("matching_loss", "sampler_loss")),
          ("calibration", ("calibration_loss",)),
          ("image gradient norm", ("image_grad_norm",)),
          ("psi: mean |t|", ("frequency_norm",)),
          ("test accuracy (%)", ("test_accuracy",)))


# --- The resumable state and the checkpoint file ---------------------------------------------

def resumable_variables(model):
    """The variables a resumed `NCFM` needs, by name, found rather than listed: the model's own
    (the images, the iteration that seeds the randomness, the plateau) by their names, then
    psi's weights (with its batch-norm statistics) and both optimizers' variables in order;
    not the extractor's, which are placeholders for the pool's weights, nor the last step's
    values, which the next step overwrites."""
    model.build_optimizers()
    sampler = [] if model.sampler is None else model.sampler.weights
    not_own = {id(v) for v in [*model.extractor.variables, *sampler,
                                *model.last_step.values()]}
    named = {v.name: v for v in model.variables if id(v) not in not_own}
    groups = {"image_optimizer": model.optimizer.variables}
    if model.sampler is not None:
        groups["sampler"] = sampler
        groups["sampler_optimizer"] = model.sampler_optimizer.variables
    for prefix, variables in groups.items():
        named.update({f"{prefix}/{i:03d}": v for i, v in enumerate(variables)})
    return named


def get_state(model):
    """The resumable state of an `NCFM` as numpy arrays, by name."""
    return {name: np.array(v.numpy()) for name, v in resumable_variables(model).items()}


def set_state(model, arrays):
    """Restores `get_state` output; NCFMError for the state of a differently configured model."""
    variables = resumable_variables(model)
    mismatched = sorted(set(variables) ^ set(arrays))
    mismatched += [name for name, variable in variables.items()
                   if name in arrays and arrays[name].shape != variable.shape]
    if mismatched:
        raise nk.NCFMError(f"the checkpoint does not fit this model ({', '.join(mismatched)}); "
                           "pass --noresume to start over")
    for name, variable in variables.items():
        variable.assign(arrays[name])


def save_checkpoint(path, meta, epochs_done, state):
    """`checkpoint.npz`: the state, the epochs done and `meta` (the settings a resume must
    share), written atomically."""
    header = json.dumps(dict(meta=meta, epochs_done=epochs_done))
    nk.save_npz(path, header=header, **{f"state/{k}": v for k, v in state.items()})


def load_checkpoint(path):
    """Reads a checkpoint: `{"meta", "epochs_done", "state"}`."""
    try:
        with np.load(path, allow_pickle=False) as f:
            header = json.loads(str(f["header"]))
            header["state"] = {name[len("state/"):]: f[name] for name in f.files
                               if name.startswith("state/")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise nk.NCFMError(f"{path} is not a readable checkpoint ({e}); delete it to start "
                           "over")
    return header


def run_meta(data, config, steps, image_size, precision, jit_compile, devices, deterministic):
    """What a resumed run must share with its checkpoint: the data (its digest), every setting
    of `config` but `iterations` (which may grow), and how the step computes — precision, XLA
    (it draws other random numbers from a seed than TensorFlow's kernels do), the number of
    devices (each steps its own classes), deterministic mode (oneDNN off) and the version of
    the step's random draws (`nk.DRAWS`) — since a run resumed otherwise would not be the run
    it continues."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "iterations"}
    return dict(data_digest=data.digest, image_size=image_size, log_every=steps,
                precision=precision, jit_compile=jit_compile, devices=devices,
                deterministic=deterministic, draws=nk.DRAWS, config=settings)


def announce_resume(run, restore, steps):
    """Says where a resumed run continues; the epoch it starts from (0 without `restore`)."""
    if restore is None:
        return 0
    print(f"resuming from iteration {restore['epochs_done'] * steps} "
          f"({run.path('checkpoint.npz')})", flush=True)
    return restore["epochs_done"]


def resume_point(path, meta, iterations):
    """The checkpoint at `path` to continue from, or None when there is none. `NCFMError` when
    it is from a run with other settings than `meta` (all but `iterations`, which may grow) or
    holds more than `iterations`."""
    if not os.path.exists(path):
        return None
    restore = load_checkpoint(path)
    saved = {"draws": 1, **restore["meta"]}  # checkpoints without it drew as version 1
    conflicts = [f"{k}={saved[k]!r} there, {v!r} now" for k, v in meta.items()
                 if k != "config" and k in saved and saved[k] != v]  # older files lack some
    conflicts += [f"--{k}={saved['config'].get(k)!r} there, {v!r} now"
                  for k, v in meta["config"].items() if saved["config"].get(k) != v]
    if conflicts:
        raise nk.NCFMError(f"{path} is from a run with other settings "
                           f"({'; '.join(conflicts)}); rerun with its settings, pass --noresume "
                           "to start over, or choose another --output_dir")
    done = restore["epochs_done"] * meta["log_every"]
    if done > iterations:
        raise nk.NCFMError(f"{path} already holds {done} iterations, more than "
                           f"--iterations={iterations}; a run cannot be shortened: pass "
                           f"--iterations={done} (or more, to continue), --noresume to start "
                           "over, or another --output_dir")
    return restore


# --- Pictures: image grids and loss curves ---------------------------------------------------

def save_grid(path, images, rows):
    """Tiles `[rows*cols, H, W, C]` images in [0, 1] as a `[rows*H, cols*W, C]` PNG, atomically."""
    n, height, width, channels = images.shape
    cols = n // rows
    grid = images.reshape(rows, cols, height, width, channels).transpose(0, 2, 1, 3, 4)
    pixels = np.round(np.clip(grid, 0, 1) * 255).astype(np.uint8)
    pixels = pixels.reshape(rows * height, cols * width, channels)

    def write(f):
        keras.utils.save_img(f, pixels, file_format="png", scale=False)

    nk.atomic_write(path, write, "wb")


def plot_metrics(csv_path, png_path):
    """Draws the `PANELS` that hold values in a `metrics.csv` side by side, as a PNG: the
    matching loss with the loss psi saw before its step, and when evaluated the test accuracy."""
    from matplotlib.figure import Figure  # no pyplot: no global figures, no GUI backend

    table = np.atleast_1d(np.genfromtxt(csv_path, delimiter=",", names=True))
    drawn = {c for c in table.dtype.names if np.isfinite(table[c]).any()}
    panels = [(title, [c for c in columns if c in drawn]) for title, columns in PANELS
              if drawn & set(columns)]
    figure = Figure(figsize=(4 * len(panels), 3.2))
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for axis, (title, columns) in zip(axes, panels):
        for column in columns:
            valid = np.isfinite(table[column])
            marker = "o" if valid.sum() < 20 else None
            axis.plot(table["iteration"][valid], table[column][valid], label=column,
                      marker=marker)
        axis.set(title=title, xlabel="iteration")
        if len(columns) > 1:
            axis.legend()
    figure.tight_layout()

    def write(f):
        figure.savefig(f, format="png", dpi=80)

    nk.atomic_write(png_path, write, "wb")


def file_name(text, limit=200):
    """`text` as a file name: characters other than letters, digits, '-', '_' and '.' become
    '_', and it is cut to at most `limit` bytes of UTF-8 (file systems take 255), so that a
    name made from user text (a class, a dataset) can always be written."""
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
    return name.encode("utf-8")[:limit].decode("utf-8", errors="ignore")


@contextlib.contextmanager
def keeping(run, steps):
    """Adds what is still intact (`Run.status`) to the `WriteError` of an output that could not
    be written inside."""
    try:
        yield
    except nk.WriteError as e:
        raise nk.WriteError(f"{e}; stopped, and {run.status(steps)}") from None


# --- The callbacks of a run ------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    """What the callbacks of one `fit` run share: where it writes, the settings a resume must
    share (`meta`), the epochs the checkpoint holds (`saved`), and what happened."""
    data: nk.Dataset
    output_dir: str
    meta: dict
    saved: int = 0              # epochs in the last checkpoint written (or restored)
    distilled: nk.DistilledSet = None  # the set written last
    evaluations: list = dataclasses.field(default_factory=list)  # (epoch, final, best_seen)
    interrupted: int = None     # the signal that asked the run to stop
    error: nk.NCFMError = None  # a failure for the caller to raise after `fit`
    watcher: "SignalWatcher" = None

    def path(self, name):
        return os.path.join(self.output_dir, name)

    def status(self, steps):
        """One clause saying what the checkpoint file holds (for messages), `steps` iterations
        per epoch."""
        if not self.saved:
            return "no checkpoint had been written yet"
        return (f"the last checkpoint ({self.path('checkpoint.npz')}, iteration "
                f"{self.saved * steps}) is intact")


def callbacks(run, restore=None, skipped_ok=False, eval_every=0, eval_epochs=0,
              protocol="ncfm"):
    """The callbacks of a distillation, in the one order that keeps a killed run resumable:
    every epoch checks the state, writes the set, evaluates it, appends the CSV rows and draws
    them, and only then writes the checkpoint, so a checkpoint never claims more than the files
    beside it hold. Keras calls callbacks in list order."""
    return [Restore(run, restore),
            FiniteCheck(run, skipped_ok),
            SetWriter(run),
            Evaluator(run, eval_every, eval_epochs, protocol),
            MetricsCsv(run),
            LossCurves(run),
            Signals(run),
            Checkpointer(run)]


class Restore(keras.callbacks.Callback):
    """At the start: removes what a killed run's `atomic_write` left, and applies `restore`
    (a `load_checkpoint`)."""

    def __init__(self, run, restore):
        super().__init__()
        self.run = run
        self.restore = restore
        if restore is not None:
            run.saved = restore["epochs_done"]

    def on_train_begin(self, logs=None):
        for parent, _, names in os.walk(self.run.output_dir):
            for name in names:
                if name.startswith(".") and name.endswith(".tmp"):
                    os.remove(os.path.join(parent, name))
        if self.restore is not None:
            set_state(self.model, self.restore["state"])


class FiniteCheck(keras.callbacks.Callback):
    """Stops on non-finite state at the end of an epoch (raising an `NCFMError` naming the
    likely learning rate), and on a skipped non-finite update (unless `skipped_ok`: loss
    scaling skips routinely), leaving that error in `run.error` for the caller. Skipped updates
    do not catch every case: psi's batch-norm variance, updated outside the optimizer,
    overflows once a too high --sampler_lr has blown up psi's weights."""

    def __init__(self, run, skipped_ok):
        super().__init__()
        self.run = run
        self.skipped_ok = skipped_ok
        self.nonfinite_at = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1
        skipped = float(logs.get("nonfinite_steps", 0)) > 0
        if skipped and not self.skipped_ok and self.nonfinite_at is None:
            self.nonfinite_at = self.epoch * self.params["steps"] + batch + 1
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        steps = self.params["steps"]
        state = get_state(self.model)
        if self.batches < steps:  # stopped mid-epoch: only the images will be written
            state = {"synthetic": state["synthetic"]}
        bad = sorted({name.split("/")[0] for name, v in state.items()
                      if v.dtype.kind == "f" and not np.isfinite(v).all()})
        if bad:
            iteration = self.nonfinite_at or (epoch + 1) * steps
            parts = " and ".join(STATE_PARTS[b][0] for b in bad)
            self.run.watcher.close()  # `on_train_end` will not run
            raise self.failure(f"after iteration {iteration}, {parts} are not finite, so the "
                               "run cannot be saved", STATE_PARTS[bad[0]][1])

    def on_train_end(self, logs=None):
        if self.nonfinite_at is not None:  # raised after `fit`: TensorBoard still ends cleanly
            self.run.error = self.failure(
                f"iteration {self.nonfinite_at}: the loss or a gradient is not finite; the "
                "update was skipped, so nothing non-finite reached the images",
                "a learning rate", " (--image_lr, --sampler_lr)")

    def failure(self, problem, cause, flags=""):
        again = ""
        if self.run.saved:
            again = " (with --noresume)"  # a checkpoint refuses another learning rate
        status = self.run.status(self.params["steps"])
        return nk.NCFMError(f"{problem}; stopped, and {status}. Likely cause: {cause} too high "
                            f"for this data{flags}; lower it{again}")


class SetWriter(keras.callbacks.Callback):
    """Every epoch: `distilled.npz` and `grid.png` (one row per class) of the current images.
    At the end: the decoded images as an image folder, `images/<NNN>_<class>/<i>.png` (loadable
    again with `folder:`), after writing the set if no epoch ran."""

    def __init__(self, run):
        super().__init__()
        self.run = run

    def on_epoch_end(self, epoch, logs=None):
        self.write_set()

    def write_set(self):
        self.run.distilled = nk.distilled_set(self.model, self.run.data)
        nk.save_distilled(self.run.path("distilled.npz"), self.run.distilled)
        save_grid(self.run.path("grid.png"), self.run.distilled.images,
                  self.run.data.num_classes)

    def on_train_end(self, logs=None):
        if self.run.distilled is None:  # nothing to do: from the restored state
            self.write_set()
        x, y = self.run.distilled.decoded()
        for i, (image, label) in enumerate(zip(x, y)):
            folder = file_name(f"{label:03d}_{self.run.data.class_names[label]}")
            save_grid(self.run.path(f"images/{folder}/{i:05d}.png"), image[None], 1)


class Evaluator(keras.callbacks.Callback):
    """Trains a fresh ConvNet on the set just written every `eval_every` iterations (at least
    an epoch) and after the last, for `eval_epochs` epochs (0: the protocol's); its final
    accuracy goes into the epoch's logs as `test_accuracy` and `(epoch, final, best_seen)` into
    `run.evaluations`. Off when both are 0."""

    def __init__(self, run, eval_every, eval_epochs, protocol):
        super().__init__()
        self.run = run
        self.eval_every = eval_every
        self.eval_epochs = eval_epochs
        self.protocol = protocol

    def on_epoch_end(self, epoch, logs=None):
        if not (self.eval_every or self.eval_epochs):
            return
        done, epochs = epoch + 1, self.params["epochs"]
        every = epochs
        if self.eval_every:
            every = max(1, self.eval_every // self.params["steps"])
        if done % every and done != epochs:
            return
        x, y = self.run.distilled.decoded()
        result = nk.evaluate_images(x, y, self.run.data, "convnet", self.protocol,
                                    self.eval_epochs or None)
        self.run.evaluations.append((done, result["final"], result["best_seen"]))
        logs["test_accuracy"] = result["final"]
        print(f"evaluation after epoch {done}: final {result['final']:.2f}  "
              f"best-seen {result['best_seen']:.2f}")


class MetricsCsv(keras.callbacks.Callback):
    """`metrics.csv`, one row per iteration of `CSV_COLUMNS`, appended once per epoch (the one
    write that is not atomic). A value is left empty where its step did not run or was skipped.
    At the start it keeps the rows up to the restored iteration, and drops a torn last one."""

    def __init__(self, run):
        super().__init__()
        self.run = run

    def on_train_begin(self, logs=None):
        path = self.run.path("metrics.csv")
        start = self.run.saved * self.params["steps"]
        kept = []
        if start and os.path.exists(path):
            with open(path, newline="") as f:
                for row in csv.DictReader(f):
                    whole = None not in row.values() and len(row) == len(CSV_COLUMNS)
                    if whole and float(row["iteration"]) <= start:
                        kept.append(row)

        def write(f):
            writer = csv.DictWriter(f, CSV_COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(kept)

        nk.atomic_write(path, write, "w")

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.rows = []

    def on_train_batch_end(self, batch, logs=None):
        learning_rate = keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
        row = {"iteration": self.epoch * self.params["steps"] + batch + 1,
               "learning_rate": float(learning_rate)}
        # The step's own values; the norm of a step that loss scaling skipped is NaN: no value.
        for key, variable in self.model.last_step.items():
            value = float(variable.numpy())
            if key != "image_grad_norm" or math.isfinite(value):
                row[key] = value
        self.rows.append(row)

    def on_epoch_end(self, epoch, logs=None):
        if "test_accuracy" in logs:
            self.rows[-1]["test_accuracy"] = logs["test_accuracy"]
        path = self.run.path("metrics.csv")
        try:
            with nk.WRITING, open(path, "a", newline="") as f:
                writer = csv.writer(f, lineterminator="\n")
                for row in self.rows:
                    writer.writerow([format_value(row.get(column)) for column in CSV_COLUMNS])
        except OSError as e:  # its rows past the checkpoint are dropped when the run resumes
            raise nk.WriteError(f"cannot write {path}: {nk._cause(e)}") from None


def format_value(value):
    """A `metrics.csv` cell: 6 significant digits, empty for a value its step did not give."""
    if value is None:
        return ""
    return f"{value:.6g}"


class LossCurves(keras.callbacks.Callback):
    """Every epoch, `loss_curves.png` drawn from `metrics.csv` (`plot_metrics`)."""

    def __init__(self, run):
        super().__init__()
        self.run = run

    def on_epoch_end(self, epoch, logs=None):
        plot_metrics(self.run.path("metrics.csv"), self.run.path("loss_curves.png"))


class Signals(keras.callbacks.Callback):
    """SIGINT / SIGTERM during `fit` (`SignalWatcher`): the first stops the run at the end of
    its epoch, once that epoch is saved."""

    def __init__(self, run):
        super().__init__()
        self.run = run

    def on_train_begin(self, logs=None):
        self.run.watcher = SignalWatcher(self.run, self.params["steps"])

    def on_epoch_end(self, epoch, logs=None):
        if self.run.interrupted is not None:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        self.run.watcher.close()


class Checkpointer(keras.callbacks.Callback):
    """Last every epoch: `checkpoint.npz` (`save_checkpoint`), unless the epoch was cut short."""

    def __init__(self, run):
        super().__init__()
        self.run = run

    def on_epoch_begin(self, epoch, logs=None):
        self.batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1

    def on_epoch_end(self, epoch, logs=None):
        if self.batches == self.params["steps"]:
            save_checkpoint(self.run.path("checkpoint.npz"), self.run.meta, epoch + 1,
                            get_state(self.model))
            self.run.saved = epoch + 1


class SignalWatcher:
    """Catches SIGINT / SIGTERM for a `Run`: the first sets its `interrupted` (the signal
    number; the run then saves at the end of the epoch and stops), a second ends the process at
    once with status 128 + its number, after any `atomic_write` in progress. A thread reads
    them (`signal.set_wakeup_fd`): Python-level handlers run only between TensorFlow calls."""

    def __init__(self, run, steps):
        self.run = run
        self.steps = steps
        read, self.wakeup = os.pipe()
        os.set_blocking(self.wakeup, False)
        self.handlers = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.handlers[signum] = signal.signal(signum, self.ignore)  # the thread acts
        self.previous_wakeup = signal.set_wakeup_fd(self.wakeup)
        threading.Thread(target=self._watch, args=(read,), daemon=True).start()

    @staticmethod
    def ignore(signum, frame):
        """The Python-level handler: the watching thread acts on the signal instead."""

    def _watch(self, read):
        with os.fdopen(read, "rb", buffering=0) as pipe:  # until `close` closes the other end
            while byte := pipe.read(1):
                signum = byte[0]
                if signum not in self.handlers:
                    continue
                name = signal.Signals(signum).name
                if self.run.interrupted is None:
                    self.run.interrupted = signum
                    print(f"\n{name}: finishing this epoch to save a checkpoint (send it "
                          "again to stop at once)")
                    continue
                with nk.WRITING:  # held until the process ends: no file is left half-written
                    sys.stdout.flush()
                    print(f"\n{name} again: stopped at once; {self.run.status(self.steps)}",
                          file=sys.stderr, flush=True)
                    os._exit(128 + signum)

    def close(self):
        """Restores the handlers; the thread reads the end of the pipe and returns."""
        if self.wakeup is None:
            return
        for signum, handler in self.handlers.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(self.previous_wakeup)
        os.close(self.wakeup)
        self.wakeup = None


def report(run, model, initial_epoch, seconds, protocol, device, peak):
    """What the run did, on stdout, ending in a line with the `peak` memory (`(MiB, what)`) on
    `device` (its name); `run.json` (what it ran on and cost) and `evaluation.json` when it
    evaluated. An interrupted run exits 128 + the signal number."""
    steps, epochs = model.history.params["steps"], model.history.params["epochs"]
    config = model.config
    if run.interrupted is not None:
        done = (initial_epoch + len(model.history.epoch)) * steps
        print(f"stopped by {signal.Signals(run.interrupted).name} after iteration {done}; "
              f"{run.status(steps)}. Re-run the same command to continue.", file=sys.stderr)
        sys.exit(128 + run.interrupted)
    ran = (epochs - initial_epoch) * steps
    if not ran:
        print(f"nothing to do: {run.path('checkpoint.npz')} already holds all "
              f"{config.iterations} iterations; rewrote {run.output_dir}/distilled.npz and "
              "images/ from it (pass a larger --iterations to continue)")
        return
    print(f"distilled {config.iterations} iterations ({ran} in this run, {seconds:.0f} s, "
          f"{seconds / ran:.2f} s/iter); wrote {run.output_dir}/distilled.npz")
    if run.evaluations:
        history = [dict(iteration=e * steps, final=f, best_seen=b)
                   for e, f, b in run.evaluations]
        nk.write_json(run.path("evaluation.json"), {
            "dataset": run.data.name, "protocol": protocol, "history": history,
            "distill_seconds": round(seconds, 1), "config": dataclasses.asdict(config)})
    mib, what = peak
    nk.write_json(run.path("run.json"), {
        "dataset": run.data.name, "device": device, "precision": run.meta["precision"],
        "jit_compile": run.meta["jit_compile"], "devices": run.meta["devices"],
        "iterations": config.iterations, "iterations_this_run": ran,
        "distill_seconds": round(seconds, 1), "seconds_per_iteration": round(seconds / ran, 3),
        "peak_memory_mib": mib, "peak_memory_of": what})
    print(f"peak memory {mib} MiB ({what}) on {device}; wrote {run.path('run.json')}")
