"""A process that has imported torch and transformers once and forks a child per ``softlabels`` command.

Each child runs ``python -m softlabels.cli ARGV`` as a new process would (its own pid and exit status,
uncaught exceptions printed by the interpreter), without paying the seconds of a fresh interpreter's
imports. Two ways to ask:

    python tests/cli_fork_server.py --stdin
        one JSON request per line on stdin ({"argv", "cwd", "stdout", "stderr"}: the child writes its
        output to those files); one JSON reply per line on stdout ({"status": waitpid status}).
        conftest.run_cli_subprocess uses it.
    python tests/cli_fork_server.py --socket PATH
        requests on a Unix socket from the ``softlabels`` shim (``write_shim``), which a pipeline script
        finds first on its PATH: the shim passes its stdin, stdout and stderr and its environment; the
        server replies {"pid"} and then {"status"}, or {"fallback": reason} when the shim's environment
        differs from the server's in a variable read at import (threads, HF offline flags, ...), in which
        case the shim runs ``python -m softlabels.cli`` itself.

Only the suite uses this; softlabels does not.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import runpy
import signal
import socket
import sys

IMPORT_TIME = ("OMP_", "MKL_", "KMP_", "OPENBLAS_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "TORCH", "PYTORCH", "PYTHON")
"""Variables a library may read when it is imported: a request must agree with the server on these."""


def import_time_environ(environ: "dict[str, str] | os._Environ[str]") -> dict[str, str]:
    return {k: v for k, v in environ.items() if k.startswith(IMPORT_TIME)}


def run_child(argv: list[str], cwd: str) -> None:
    """In a forked child: run ``softlabels ARGV`` in CWD as ``python -m softlabels.cli`` does, then exit."""
    os.chdir(cwd)
    signal.alarm(600)
    sys.argv = ["softlabels", *argv]
    code = 0
    try:
        runpy.run_module("softlabels.cli", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())
        code = -signal.SIGINT
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    atexit._run_exitfuncs()  # then exit without tearing down the modules (that would copy every shared page)
    sys.stdout.flush()
    sys.stderr.flush()
    if code == -signal.SIGINT:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code & 0xFF)


def serve_stdin() -> None:
    replies = os.fdopen(os.dup(1), "w")
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            replies.close()
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
            run_child(request["argv"], request["cwd"])
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"status": status}) + "\n")
        replies.flush()


def receive(connection: socket.socket) -> tuple[dict, list[int]]:
    """One request: an 8-byte length, that many bytes of JSON, and the shim's three descriptors."""
    data, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
    while len(data) < 8 or len(data) < 8 + int.from_bytes(data[:8], "big"):
        more = connection.recv(1 << 20)
        if not more:
            raise ConnectionError("the shim closed the connection mid-request")
        data += more
    return json.loads(data[8:8 + int.from_bytes(data[:8], "big")]), fds


def serve_socket(path: str, before_imports: dict[str, str]) -> None:
    """Serve the shims on PATH. BEFORE_IMPORTS: the environment this process started with (its imports
    may add variables, as torch does: a child gets those too, as a fresh interpreter would)."""
    added = {k: v for k, v in os.environ.items() if k not in before_imports}
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)
    print("ready", flush=True)
    served = 0
    mine = import_time_environ(before_imports)
    while True:
        connection, _ = server.accept()
        with connection:
            try:
                request, fds = receive(connection)
            except (OSError, ValueError, ConnectionError):
                continue
            theirs = import_time_environ(request["env"])
            if theirs != mine or len(fds) != 3:
                differ = sorted(k for k in theirs.keys() | mine.keys() if theirs.get(k) != mine.get(k))
                connection.sendall((json.dumps({"fallback": f"environment differs in {differ}"}) + "\n").encode())
                for fd in fds:
                    os.close(fd)
                continue
            pid = os.fork()
            if pid == 0:
                server.close()
                connection.close()
                for fd, received in zip((0, 1, 2), fds):
                    os.dup2(received, fd)
                    os.close(received)
                os.environ.clear()
                os.environ.update({**request["env"], **added})
                run_child(request["argv"], request["cwd"])
            for fd in fds:
                os.close(fd)
            connection.sendall((json.dumps({"pid": pid}) + "\n").encode())
            _, status = os.waitpid(pid, 0)
            served += 1
            with open(f"{path}.served", "w") as count:
                count.write(str(served))
            try:
                connection.sendall((json.dumps({"status": status}) + "\n").encode())
            except OSError:
                pass


SHIM = '''\
import json, os, signal, socket, sys

def fallback():
    os.execv({python!r}, [{python!r}, "-m", "softlabels.cli", *sys.argv[1:]])

try:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.connect(os.environ["SOFTLABELS_TEST_CLI_SERVER"])
    payload = json.dumps({{"argv": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd()}}).encode()
    socket.send_fds(server, [len(payload).to_bytes(8, "big") + payload], [0, 1, 2])
    replies = server.makefile("r")
    first = json.loads(replies.readline())
except (OSError, KeyError, ValueError):
    fallback()
if "fallback" in first:
    fallback()
child = first["pid"]
for forwarded in (signal.SIGINT, signal.SIGTERM):
    signal.signal(forwarded, lambda number, frame: os.kill(child, number))
line = replies.readline()
status = os.waitstatus_to_exitcode(json.loads(line)["status"]) if line else 1
if status < 0:
    signal.signal(-status, signal.SIG_DFL)
    os.kill(os.getpid(), -status)
sys.exit(status)
'''


def write_shim(folder: str) -> str:
    """Write an executable ``softlabels`` into FOLDER that asks the socket server (or falls back)."""
    path = os.path.join(folder, "softlabels")
    with open(path, "w") as shim:
        shim.write(f"#!{sys.executable} -S\n" + SHIM.format(python=sys.executable))
    os.chmod(path, 0o755)
    return path


if __name__ == "__main__":
    started_with = dict(os.environ)
    import numpy  # noqa: F401  no thread starts on these imports (Polars and Arrow start some: the child imports them)
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import typer  # noqa: F401

    import softlabels  # noqa: F401  not softlabels.cli: runpy runs that as __main__

    if sys.argv[1:2] == ["--socket"]:
        from transformers.models.llama import modeling_llama  # noqa: F401  the LLM pipelines' teacher and students
    gc.freeze()  # the child's garbage collector leaves the server's objects alone: their pages stay shared
    serve_socket(sys.argv[2], started_with) if sys.argv[1:2] == ["--socket"] else serve_stdin()
