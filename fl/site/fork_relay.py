"""The relay a job runner starts in place of a training script when a fork server runs (see
:mod:`fl.site.fork_server`): ``python -I -S fork_relay.py SOCKET SCRIPT ARGS...``.

Standard library only (it starts in milliseconds): it hands its stdout and its channel descriptor
(``FL_CHANNEL_FD``) to the fork server with the run's argv, environment and working directory,
forwards SIGTERM, and exits with the script's status (a signal death is re-raised on itself). If it
dies, its connection closes and the server kills the script; if the server dies, the script dies
with it (PR_SET_PDEATHSIG) and the relay exits with an error.
"""

import json
import os
import signal
import socket
import sys

MAX_REPLY_BYTES = 4096


def _exit_like(status: int) -> None:
    """Exit as the script did: its exit code, or the signal that killed it."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    sys.exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)


def main(argv: list[str]) -> None:
    socket_path, command = argv[0], argv[1:]
    channel_fd = int(os.environ["FL_CHANNEL_FD"])
    request = {"argv": command, "cwd": os.getcwd(), "env": dict(os.environ)}
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect(socket_path)
        socket.send_fds(sock, [json.dumps(request).encode()], [1, channel_fd])
    except OSError as exc:
        sys.exit(f"fl: cannot reach the fork server at {socket_path}: {exc}")
    os.close(channel_fd)  # the script holds it now: its end closes the channel
    signal.signal(signal.SIGTERM, lambda signum, frame: sock.send(b'{"op": "term"}'))
    while True:
        data = sock.recv(MAX_REPLY_BYTES)
        if not data:
            sys.exit("fl: the fork server went away while the script ran")
        reply = json.loads(data)
        if "error" in reply:
            sys.exit(f"fl: the fork server could not start the script: {reply['error']}")
        if "status" in reply:
            _exit_like(int(reply["status"]))


if __name__ == "__main__":
    main(sys.argv[1:])
