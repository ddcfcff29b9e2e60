"""Running a function in a child process, so that a crash in native code (an
onnxruntime segfault, a folding tool that dies) becomes an error message; and the
one-line form of an error message. Shared by ``bnfast.onnx.check`` and
benchmarks/compare_folders.py."""
import multiprocessing

__all__ = ["call_in_child", "ChildFailed", "first_line"]


def first_line(err):
    """The first line of an exception's message, or its type name when it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class ChildFailed(RuntimeError):
    """The child process of ``call_in_child`` died (a crash) or ran out of time.
    ``started``: whether it got as far as running `function` (a child cannot
    start when the parent's ``__main__`` was read from stdin)."""

    def __init__(self, message, started=True):
        super().__init__(message)
        self.started = started


def call_in_child(function, *args, timeout=None):
    """``function(note, *args)`` in a spawned child process; its return value here.

    `note(text)` tells the parent what the child is doing, so that a crash can be
    named. An exception in the child is raised here as RuntimeError with its type
    and first line (ValueError stays ValueError); a crash or timeout raises
    ChildFailed saying what the child was doing. `function` and `args` must pickle.
    """
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(send, function, args), daemon=True)
    child.start()
    send.close()
    doing, started = None, False
    try:
        while True:
            if timeout is not None and not receive.poll(timeout):
                child.kill()
                raise ChildFailed(f"no result after {timeout} s"
                                  + (f" {doing}" if doing else ""))
            message = receive.recv()
            started = True
            if message[0] == "note":
                doing = message[1] or doing
            elif message[0] == "error":
                kind = ValueError if message[1] == "ValueError" else RuntimeError
                raise kind(message[2])
            else:
                return message[1]
    except EOFError:
        child.join()
        code = child.exitcode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        raise ChildFailed(f"the process died ({how})" + (f" {doing}" if doing else ""),
                          started) from None
    finally:
        receive.close()
        child.join(5)


def _child(send, function, args):
    def note(text):
        send.send(("note", text))
    note(None)    # started: a crash from here on is the function's
    try:
        result = function(note, *args)
    except Exception as err:   # noqa: BLE001 - every failure goes back to the parent
        send.send(("error", type(err).__name__, str(err)))
    else:
        send.send(("done", result))
    send.close()
