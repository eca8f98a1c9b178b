#!/usr/bin/env python3
"""chat_pty.py KVSIEVE MODEL ctrl-d|ctrl-c — `kvsieve chat` on a terminal, as a user meets it.

Starts chat on a pseudo-terminal, asks for a long answer, presses Ctrl-C while it streams and
requires the answer to stop with the program back at its prompt (alive); then presses Ctrl-D
(or Ctrl-C again) at the prompt and requires a clean exit (status 0) that ends the line.
Exit status 0 when all of that holds, 1 otherwise (with what was seen)."""
import os, pty, select, signal, sys, time

kvsieve, model, mode = sys.argv[1], sys.argv[2], sys.argv[3]
pid, fd = pty.fork()
if pid == 0:
    os.execv(kvsieve, [kvsieve, "chat", "-m", model, "--temp", "0", "-n", "4000", "-c", "4096",
                       "--ignore-eos", "-t", "1"])
out = b""


def read_until(pred, timeout):
    global out
    end = time.time() + timeout
    while time.time() < end and not pred(out):
        if select.select([fd], [], [], 0.2)[0]:
            try:
                out += os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
    return pred(out)


steps = []
steps.append(("prompt shown", read_until(lambda o: b"> " in o, 60)))
os.write(fd, b"Count from one to one thousand.\n")
n0 = len(out)
steps.append(("answer streams", read_until(lambda o: len(o) > n0 + 200, 60)))
os.write(fd, b"\x03")  # Ctrl-C while answering
steps.append(("answer stopped, prompt again",
              read_until(lambda o: b"answer stopped" in o and o.rstrip().endswith(b">"), 30)))
os.write(fd, b"\x04" if mode == "ctrl-d" else b"\x03")
rc = None
end = time.time() + 30  # the program must quit by itself; never wait forever
while rc is None and time.time() < end:
    read_until(lambda o: False, 0.5)
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        rc = os.waitstatus_to_exitcode(status)
if rc is None:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    rc = -1
steps.append(("exit status 0", rc == 0))
# the terminal echoes Ctrl-C as ^C; either way the prompt's line must be ended
steps.append(("the last line ended", out.endswith(b"\r\n") and out.rstrip().split(b"\n")[-1].startswith(b">")))
failed = [name for name, ok in steps if not ok]
if failed:
    print("chat_pty: failed: %s; exit %d (-1: still running, killed); output tail %r"
          % (", ".join(failed), rc, out[-200:]))
    sys.exit(1)
print("chat_pty: %s ok (Ctrl-C stopped the answer, then quit cleanly)" % mode)
