"""What train.py and evaluate.py share: TensorFlow's environment, set up before it loads (so
import this module before `ncfm_keras`), flag parsing and input errors that end in one line."""

import glob
import os
import re
import resource
import shutil
import sys
import tempfile
import time

from absl import flags, logging


def asks_for_determinism(argv):
    """Whether the command line sets --deterministic, read as absl will read it (any of its
    spellings, the last one winning) but before absl parses it."""
    wanted = False
    for arg in argv:
        if arg == "--":
            break
        match = re.fullmatch(r"--?(no)?deterministic(?:=(.*))?", arg)
        if match is None:
            continue
        if match[1] or match[2] is None:
            wanted = not match[1]
        else:
            try:
                wanted = flags.BooleanParser().parse(match[2])
            except ValueError:
                pass  # absl reports the malformed value itself
    return wanted


def gpu_evidence():
    """What says this machine has an NVIDIA GPU, whatever TensorFlow sees: a list of
    `CUDA_VISIBLE_DEVICES=...`, a `/dev/nvidia*` node, `nvidia-smi on the path`."""
    found = []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible not in (None, "", "-1"):
        found.append(f"CUDA_VISIBLE_DEVICES={visible}")
    nodes = sorted(glob.glob("/dev/nvidia[0-9]*"))
    if nodes:
        found.append(nodes[0])
    if shutil.which("nvidia-smi"):
        found.append("nvidia-smi on the path")
    return found


GPU_EVIDENCE = []  # set by prepare_tensorflow
CUDA_ERRORS = []   # TensorFlow's start-up lines about CUDA, kept when a GPU seems present


def prepare_tensorflow(argv):
    """Sets TensorFlow's log level and, for --deterministic, turns oneDNN off (its CPU kernels
    are outside `tf.config.experimental.enable_op_determinism`: two runs with psi on drift apart
    by 1e-4 within 8 iterations), then imports TensorFlow and lists its GPUs with its start-up
    chatter on stderr (CUDA probing, oneDNN notices) captured, so that what the user sees on
    stderr is ours. Where a GPU seems present (`gpu_evidence`), TensorFlow's errors are kept
    (log level 2): the CUDA lines among them say why a GPU goes unused (`say_devices`)."""
    GPU_EVIDENCE[:] = gpu_evidence()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2" if GPU_EVIDENCE else "3")
    if asks_for_determinism(argv):
        os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"
    with tempfile.TemporaryFile() as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        failed = True
        try:
            import tensorflow
            tensorflow.config.list_physical_devices("GPU")  # CUDA is probed here
            failed = False
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode(errors="replace")
            if failed:
                sys.stderr.write(text)  # why the import failed
        lines = text.splitlines()
    CUDA_ERRORS[:] = [line.strip() for line in lines if re.search("cuda|cudnn|libcu|gpu", line,
                                                                  re.I)]


# At import, not in main: TensorFlow reads these variables only when it is imported, which the
# CLIs' `import ncfm_keras` does before absl parses the flags.
prepare_tensorflow(sys.argv[1:])

import keras  # noqa: E402  (these three after the set-up above)
import ncfm_keras as nk  # noqa: E402
import tensorflow as tf  # noqa: E402


def require(condition, message):
    """Raises a user-facing error unless `condition` holds."""
    if not condition:
        raise nk.NCFMError(message)


def parse_archs(value):
    archs = [a.strip() for a in value.split(",") if a.strip()]
    require(archs and all(a in nk.ARCHITECTURES for a in archs),
            f"--arch={value}: use a comma list of {', '.join(nk.ARCHITECTURES)}")
    return archs


def parse_flags(argv):
    """absl's flag parser, with a malformed or unknown flag reported in one line (exit 2), and
    so is an argument that is no flag: the CLIs take none, and an unquoted path with a space
    (`--output_dir=/content/drive/My Drive/ncfm`) would silently lose its end (`Drive/ncfm`)."""
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if len(rest) > 1:  # rest[0] is the program
        stray = rest[1]
        position = argv.index(stray)
        after = f" (after {argv[position - 1]})" if position > 1 else ""
        print(f"error: unexpected argument '{stray}'{after}: flags take the form --name=value; "
              "quote a path that holds spaces (--output_dir=\"/content/drive/My Drive/ncfm\")",
              file=sys.stderr)
        sys.exit(2)
    return rest


def guarded(main):
    """Wraps an absl main so that input errors print one line and exit 2, no traceback."""
    def run(argv):
        logging.set_verbosity(logging.WARNING)  # TFDS logs its look-ups at INFO
        try:
            return main(argv)
        except nk.NCFMError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
    return run


def device_name():
    """`'1 GPU (NVIDIA T4)'` or `'CPU (2 cores), no GPU'`: what TensorFlow computes on."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return f"CPU ({os.cpu_count()} cores), no GPU"
    names = [tf.config.experimental.get_device_details(g).get("device_name", g.name)
             for g in gpus]
    noun = "GPU" if len(gpus) == 1 else "GPUs"
    return f"{len(gpus)} {noun} ({', '.join(names)})"


def say_devices(policy, jit, replicas=1):
    """Prints one line naming the devices, the precision, XLA and the replicas of a strategy;
    with a warning line (and TensorFlow's CUDA errors) when a GPU seems present but TensorFlow
    sees none."""
    gpus = tf.config.list_physical_devices("GPU")
    line = f"device: {device_name()}; precision {policy}; XLA {'on' if jit else 'off'}"
    if replicas > 1:
        line += f"; {replicas} replicas (MirroredStrategy)"
    print(line, flush=True)
    if GPU_EVIDENCE and not gpus:
        print(f"warning: a GPU seems present ({', '.join(GPU_EVIDENCE)}) but TensorFlow sees "
              "none: most likely this TensorFlow was built without CUDA (pip install "
              "'tensorflow[and-cuda]'); see README 'On a GPU / on Colab'", file=sys.stderr)
        for message in CUDA_ERRORS[:5]:
            print(f"  {message}", file=sys.stderr)


def peak_memory():
    """`(MiB, what)`: the GPUs' peak allocated memory (summed), else the process's peak
    resident memory on the host."""
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        peak = sum(tf.config.experimental.get_memory_info(g.name)["peak"] for g in gpus)
        return round(peak / 2 ** 20), "GPU peak"
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return round(kib / 1024), "host peak RSS"


def duration(seconds):
    """`95` -> `'2 min'`, `7200` -> `'2.0 h'`, `200000` -> `'2.3 days'`."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


CPU_SCALE_SECONDS = 3 * 3600  # on a CPU, a longer estimate is GPU-scale work


class Estimate(keras.callbacks.Callback):
    """Prints how long a stage of `epochs` epochs still takes: after its first epoch, at that
    epoch's pace (it traces the step, so this errs long), and after the second at the second's,
    when that differs by more than a quarter. Pass the same one to every `fit` of the stage
    (the pool's members, an architecture's networks). On a CPU, a second-epoch estimate above
    CPU_SCALE_SECONDS is warned about with the README's CPU settings. `later` says what the
    estimate leaves out."""

    def __init__(self, epochs, what, later=""):
        super().__init__()
        self.epochs = epochs
        self.what = what
        self.later = later
        self.starts = []  # of the epochs seen
        self.first = None  # the first estimate, in seconds

    def on_epoch_begin(self, epoch, logs=None):
        self.starts.append(time.time())
        seen = len(self.starts) - 1  # epochs finished
        if seen not in (1, 2):
            return
        seconds = (self.starts[-1] - self.starts[-2]) * (self.epochs - seen)
        if seen == 1:
            self.first = seconds
            self.say(seconds, "its first epoch")
            return
        if abs(seconds - self.first) > 0.25 * self.first:
            self.say(seconds, "its second epoch")
        if seconds > CPU_SCALE_SECONDS and not tf.config.list_physical_devices("GPU"):
            print(f"warning: that is GPU-scale work on a CPU ({duration(seconds)}); README "
                  "'On a CPU' gives settings that fit one (fewer pool members, epochs and "
                  "iterations), or run it on a GPU", file=sys.stderr, flush=True)

    def say(self, seconds, pace):
        lead = "\n" if sys.stdout.isatty() else ""  # off a progress bar's line
        print(f"{lead}estimate: {self.what} takes about {duration(seconds)} more at the pace of "
              f"{pace}{self.later}", flush=True)
