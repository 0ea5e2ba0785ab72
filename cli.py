"""What train.py and evaluate.py share: TensorFlow's environment, set up before it loads (so
import this module before `ncfm_keras`), flag parsing and input errors that end in one line."""

import os
import re
import sys

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


def prepare_tensorflow(argv):
    """Sets TensorFlow's log level and, for --deterministic, turns oneDNN off (its CPU kernels
    are outside `tf.config.experimental.enable_op_determinism`: two runs with psi on drift apart
    by 1e-4 within 8 iterations), then imports TensorFlow with its start-up chatter on stderr
    (CUDA probing, oneDNN notices) hidden, so that what the user sees on stderr is ours."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if asks_for_determinism(argv):
        os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# At import, not in main: TensorFlow reads these variables only when it is imported, which the
# CLIs' `import ncfm_keras` does before absl parses the flags.
prepare_tensorflow(sys.argv[1:])

import ncfm_keras as nk  # noqa: E402  (after the set-up above)


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
