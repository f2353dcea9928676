"""The simulator's ``jailhouse`` command: its grammar and output, in one place.

Standard library only, so it starts fast as a script. It implements the real tool's
grammar and output (jailhouse.md §1): it parses argv, reads the files named on the
command line (like the real tool, which hands bytes to the driver), sends requests to
the simulator daemon and prints the result. ``cell list`` and ``cell stats`` read the
simulated sysfs directly, exactly as the real tools do.

:class:`Tool` is that logic; everything it does to or through its process goes through
an ``io`` object. Two run it:

* this file as a script (``<sim root>/libexec/jailhouse-sim/jailhouse.py``, and
  ``bin/jailhouse`` itself when no C compiler is available) with :class:`ProcessIO`:
  its own argv, cwd, stdout/stderr, a unix socket to the daemon, ``execvp``;
* the daemon, for the compiled ``bin/jailhouse`` (``jailhouse_client.c``), with the
  relay in ``relay.py``: the caller's argv, cwd and PATH, output sent back as frames.

The installer prepends ``SIM_ROOT`` and ``RCPUS`` to this file.
"""

import base64
import json
import os
import re
import socket
import sys
import time

SIM_ROOT = globals().get("SIM_ROOT", os.environ.get("JAILHOUSE_SIM_ROOT", "."))
RCPUS = globals().get("RCPUS", 0)
VERSION = "v0.12 (jailhouse-sim)"
NAMELEN = 31
REAL_SYSFS = "/sys/devices/jailhouse"

USAGE = """Usage: {prog} {{ COMMAND | --help | --version }}

Available commands:
   enable SYSCONFIG
   disable
   console [-f | --follow]
   cell create CELLCONFIG
   cell list
   cell load {{ ID | [--name] NAME }} {{ IMAGE | {{ -s | --string }} "STRING" }}
             [-a | --address ADDRESS] ...{rcpu}
   cell start {{ ID | [--name] NAME }}
   cell shutdown {{ ID | [--name] NAME }}
   cell destroy {{ ID | [--name] NAME }}
   cell linux [-h] [-d DTB] [-i INITRD] [-c "CMDLINE"] [-w PARAMS_FILE]
              [-a ARCH] [-k FACTOR]
              CELLCONFIG KERNEL
   cell stats {{ ID | [--name] NAME }}
   config create [-h] [-g] [-r ROOT] [-t TEMPLATE_DIR] [-c CONSOLE]
                 [--mem-inmates MEM_INMATES] [--mem-hv MEM_HV]
                 FILE
   config collect FILE.TAR
   config check [-h] SYSCONFIG [CELLCONFIG [CELLCONFIG ...]]
   hardware check 
"""
RCPU_USAGE = "\n             [-r | --rcpu RCPU_IMAGE_NAME RCPU_MASK] ..."
EXTENSIONS = {("cell", "linux"), ("config", "create"), ("config", "collect"), ("config", "check"),
              ("hardware", "check")}
_STRTOLL = re.compile(r"[ \t\n\v\f\r]*([+-]?)(0[xX](?=[0-9a-fA-F])[0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")
_INT64_MAX = (1 << 63) - 1


class Exit(Exception):
    """Stop the run with exit status ``code``."""

    def __init__(self, code):
        self.code = code


def strtoll(text):
    """C ``strtoll(text, &end, 0)`` accepting only a full conversion; None on junk/overflow."""
    if text == "":
        return 0  # no digits: end == start, which is the terminating NUL
    m = _STRTOLL.match(text)
    if not m or m.end() != len(text):
        return None
    digits = m.group(2)
    if digits[:2] in ("0x", "0X"):
        value = int(digits[2:], 16)
    elif digits.startswith("0"):
        value = int(digits, 8)
    else:
        value = int(digits)
    value = -value if m.group(1) == "-" else value
    if value > _INT64_MAX or value < -_INT64_MAX - 1:
        return None
    return value


def parse_cell_id(args):
    """Returns (tokens consumed, {"id", "name"}); 0 consumed means a syntax error."""
    if not args:
        return 0, None
    if args[0] == "--name":
        if len(args) < 2:
            return 0, None
        return 2, {"id": -1, "name": args[1][:NAMELEN]}
    value = strtoll(args[0])
    if value is not None:
        s32 = (value & 0xFFFFFFFF) - ((value & 0x80000000) << 1)
        if s32 >= 0:
            return 1, {"id": s32, "name": ""}
    return 1, {"id": -1, "name": args[0][:NAMELEN]}


def b64(data):
    return base64.b64encode(data).decode("ascii")


class ProcessIO:
    """The script's own process: argv[0], cwd, stdout/stderr, a unix socket to the daemon, execvp."""

    def __init__(self, prog, socket_path):
        self.prog = prog  # the path this tool was run as (sys.argv[0] of the script)
        self.socket_path = socket_path
        self.environ_path = os.environ.get("PATH", "")

    def out(self, text):
        sys.stdout.write(text)

    def out_bytes(self, data):
        """Write ``data`` to stdout at once (console output streams)."""
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()

    def err(self, text):
        sys.stderr.write(text)

    def open(self, name):
        return open(name, "rb")

    def abspath(self, path):
        return os.path.abspath(path)

    def sleep(self, seconds):
        time.sleep(seconds)

    def exec(self, file, args, path):
        """Replace this process with helper ``file`` (looked up on ``path``); returns only on failure."""
        os.environ["PATH"] = path
        sys.stdout.flush()
        os.execvp(file, args)

    def call(self, request):
        """Send one request to the daemon; a missing daemon looks like a missing driver."""
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(self.socket_path)
        except OSError:
            sys.stderr.write("opening /dev/jailhouse: No such file or directory\n")
            raise Exit(1)
        with sock:
            try:
                sock.sendall(json.dumps(request).encode())
                sock.shutdown(socket.SHUT_WR)
                chunks = []
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
            except OSError as e:
                sys.stderr.write("%s: %s\n" % (request.get("ioctl", "read(console)"), os.strerror(e.errno or 5)))
                raise Exit(1)
        if not chunks:
            # The daemon vanished mid-call: report it as the device going away.
            sys.stderr.write("%s: %s\n" % (request.get("ioctl", "read(console)"), os.strerror(19)))
            raise Exit(1)
        return json.loads(b"".join(chunks))


class Tool:
    """One run of ``jailhouse``: the real tool's grammar and output over a simulator root.

    ``io`` is the process it runs for (see the module docstring); ``root`` the simulator
    root whose sysfs it reads; ``rcpus`` whether the board has rCPUs (the Omnivisor grammar).
    """

    def __init__(self, io, root, rcpus):
        self.io = io
        self.rcpus = rcpus
        self.sysfs = os.path.join(root, "sys", "devices", "jailhouse")

    def usage(self, code):
        prog = os.path.basename(self.io.prog)
        self.io.out(USAGE.format(prog=prog, rcpu=RCPU_USAGE if self.rcpus else ""))
        raise Exit(code)

    def read_file(self, name):
        try:
            with self.io.open(name) as f:
                return f.read()
        except OSError as e:
            self.io.err("opening %s: %s\n" % (name, os.strerror(e.errno)))
            raise Exit(1)

    def ioctl(self, name, request):
        request["ioctl"] = name
        reply = self.io.call(request)
        if reply.get("errno"):
            self.io.err("%s: %s\n" % (name, os.strerror(reply["errno"])))
            raise Exit(1)
        return 0

    def cmd_enable(self, argv):
        if len(argv) != 3:
            self.usage(1)
        return self.ioctl("JAILHOUSE_ENABLE", {"op": "enable", "config": b64(self.read_file(argv[2]))})

    def cmd_console(self, argv):
        if len(argv) > 2 and argv[2] not in ("-f", "--follow"):
            self.usage(1)
        follow = len(argv) > 2
        head, saved_seen = 0, 0
        while True:
            reply = self.io.call({"op": "console_read", "head": head, "saved_seen": saved_seen, "follow": follow})
            if reply.get("error"):
                self.io.err("read(console): %s\n" % os.strerror(reply["error"]))
                raise Exit(1)
            data = base64.b64decode(reply.get("data", ""))
            head, saved_seen = reply.get("head", 0), reply.get("saved_seen", 0)
            if data:
                self.io.out_bytes(data)
            elif not follow:
                return 0
            else:
                self.io.sleep(0.1)  # the driver polls the ring every 100 ms in follow mode

    def read_attr(self, cell, entry):
        shown = "%s/cells/%s/%s" % (REAL_SYSFS, cell, entry)
        try:
            with open(os.path.join(self.sysfs, "cells", cell, entry)) as f:
                value = f.read()
        except OSError as e:
            self.io.err("opening %s: %s\n" % (shown, os.strerror(e.errno)))
            raise Exit(1)
        if not value:
            self.io.err("reading %s: %s\n" % (shown, os.strerror(22)))
            raise Exit(1)
        return value[:-1] if value.endswith("\n") else value

    def cmd_cell_list(self, argv):
        if len(argv) != 3:
            self.usage(1)
        try:
            entries = sorted(e for e in os.listdir(os.path.join(self.sysfs, "cells")) if not e.startswith("."))
        except OSError:
            return 0
        if not entries:
            return 0
        rcpus = self.rcpus
        rows = []
        for cell in entries:
            row = [self.read_attr(cell, "name"), self.read_attr(cell, "state"),
                   self.read_attr(cell, "cpus_assigned_list")]
            if rcpus:
                row.append(self.read_attr(cell, "rcpus_assigned_list"))
            row.append(self.read_attr(cell, "cpus_failed_list"))
            rows.append((int(cell), row))
        titles = ["Name", "State", "Assigned CPUs"] + (["Assigned rCPUs"] if rcpus else []) + ["Failed CPUs"]
        widths = [24, 18, 24] + ([24] if rcpus else []) + [24]
        out = ["%-8s" % "ID" + "".join("%-*s" % (w, t) for w, t in zip(widths, titles))]
        for cell_id, row in rows:
            out.append("%-8d" % cell_id + "".join("%-*s" % (w, v) for w, v in zip(widths, row)))
        self.io.out("\n".join(out) + "\n")
        return 0

    def find_cell_dir(self, ref):
        cells = os.path.join(self.sysfs, "cells")
        try:
            entries = [e for e in os.listdir(cells) if not e.startswith(".")]
        except OSError:
            return None
        for entry in entries:
            if ref["id"] >= 0 and entry == str(ref["id"]):
                return entry
            if ref["id"] == -1:
                try:
                    with open(os.path.join(cells, entry, "name")) as f:
                        if f.read().rstrip("\n") == ref["name"]:
                            return entry
                except OSError:
                    continue
        return None

    def cmd_cell_stats(self, argv):
        used, ref = parse_cell_id(argv[3:])
        if used == 0 or 3 + used != len(argv):
            self.io.out("usage: jailhouse cell stats { ID | [--name] NAME }\n")
            raise Exit(1)
        cell = self.find_cell_dir(ref)
        stats_dir = os.path.join(self.sysfs, "cells", cell or "-", "statistics")
        try:
            name = self.read_attr(cell, "name") if cell else ""
            counters = sorted(e for e in os.listdir(stats_dir) if e.startswith("vmexits_"))
            values = []
            for counter in counters:
                with open(os.path.join(stats_dir, counter)) as f:
                    values.append((counter, int(f.read())))
        except OSError as e:
            self.io.err("reading stats: %s\n" % os.strerror(e.errno))
            raise Exit(1)
        lines = ["Statistics for %s cell" % name, "", "%-24s%14s" % ("COUNTER", "SUM")]
        lines += ["%-24s%14d" % (c, v) for c, v in sorted(values, key=lambda cv: (-cv[1], cv[0]))]
        self.io.out("\n".join(lines) + "\n")
        return 0

    def parse_load_specs(self, args):
        """Syntax pass over ``cell load`` image specs (usage on error)."""
        specs, rcpu_specs = [], []
        i = 0
        while i < len(args):
            if self.rcpus and args[i] in ("-r", "--rcpu"):
                break
            if args[i] in ("-s", "--string"):
                if i + 1 >= len(args):
                    self.usage(1)
                spec = {"string": args[i + 1]}
                i += 2
            else:
                spec = {"file": args[i]}
                i += 1
            spec["address"] = 0
            if i < len(args) and args[i] in ("-a", "--address"):
                if i + 1 >= len(args):
                    self.usage(1)
                value = strtoll(args[i + 1])
                if value is None:
                    self.usage(1)
                spec["address"] = value & 0xFFFFFFFFFFFFFFFF
                i += 2
            specs.append(spec)
        while i < len(args):
            # Omnivisor fork: -r groups come after every normal image spec.
            if args[i] not in ("-r", "--rcpu") or i + 2 >= len(args):
                self.usage(1)
            rcpu = re.match(r"\s*([+-]?\d+)", args[i + 2])
            rcpu_specs.append({"name": args[i + 1][:NAMELEN], "rcpu": int(rcpu.group(1)) if rcpu else 0})
            i += 3
        return specs, rcpu_specs

    def cmd_cell_load(self, argv, shutdown):
        used, ref = parse_cell_id(argv[3:])
        arg = 3 + used
        if used == 0 or (shutdown and arg != len(argv)) or (not shutdown and arg == len(argv)):
            self.usage(1)
        specs, rcpu_specs = self.parse_load_specs(argv[arg:])
        images = []
        for spec in specs:
            data = os.fsencode(spec["string"]) + b"\0" if "string" in spec else self.read_file(spec["file"])
            images.append({"address": spec["address"], "data": b64(data)})
        op = "cell_shutdown" if shutdown else "cell_load"
        return self.ioctl("JAILHOUSE_CELL_LOAD", {"op": op, "cell": ref, "images": images, "rcpu_images": rcpu_specs})

    def cmd_cell_simple(self, argv, op, name):
        if len(argv) < 4:
            self.usage(1)
        used, ref = parse_cell_id(argv[3:])
        if used == 0 or 3 + used != len(argv):
            self.usage(1)
        return self.ioctl(name, {"op": op, "cell": ref})

    def call_extension(self, argv):
        if len(argv) >= 3 and (argv[1], argv[2]) in EXTENSIONS:
            # As the real tool: the helper jailhouse-<cmd>-<sub> is looked up first next to this
            # tool (the simulator ships only jailhouse-cell-linux there), then on PATH.
            here = os.path.dirname(self.io.abspath(self.io.prog))
            try:
                self.io.exec("jailhouse-%s-%s" % (argv[1], argv[2]), argv[2:],
                             here + os.pathsep + self.io.environ_path)
            except OSError as e:
                self.io.err("execvp: %s\n" % os.strerror(e.errno))
                raise Exit(1)

    def cmd_cell(self, argv):
        if len(argv) < 3:
            self.usage(1)
        sub = argv[2]
        if sub == "create":
            if len(argv) != 4:
                self.usage(1)
            return self.ioctl("JAILHOUSE_CELL_CREATE", {"op": "cell_create", "config": b64(self.read_file(argv[3]))})
        if sub == "list":
            return self.cmd_cell_list(argv)
        if sub == "load":
            return self.cmd_cell_load(argv, shutdown=False)
        if sub == "shutdown":
            return self.cmd_cell_load(argv, shutdown=True)
        if sub == "start":
            return self.cmd_cell_simple(argv, "cell_start", "JAILHOUSE_CELL_START")
        if sub == "destroy":
            return self.cmd_cell_simple(argv, "cell_destroy", "JAILHOUSE_CELL_DESTROY")
        if sub == "stats":
            return self.cmd_cell_stats(argv)
        self.call_extension(argv)
        self.usage(1)

    def main(self, argv):
        """Run the command ``argv`` (``argv[0]``: the tool's path); returns the exit status or raises Exit."""
        if len(argv) < 2:
            self.usage(1)
        cmd = argv[1]
        if cmd == "enable":
            return self.cmd_enable(argv)
        if cmd == "disable":
            return self.ioctl("JAILHOUSE_DISABLE", {"op": "disable"})
        if cmd == "cell":
            return self.cmd_cell(argv)
        if cmd == "console":
            return self.cmd_console(argv)
        if cmd in ("config", "hardware"):
            self.call_extension(argv)
            self.usage(1)
        if cmd == "--version":
            self.io.out("Jailhouse management tool %s\n" % VERSION)
            return 0
        if cmd == "--help":
            self.usage(0)
        self.usage(1)


def run_script(argv):
    """The script's entry point; returns its exit status.

    The compiled client, when it hands a call over to this script, names the path it was
    itself run as in ``JAILHOUSE_SIM_EXECFN`` (removed here, so helpers do not inherit it).
    """
    prog = os.environ.pop("JAILHOUSE_SIM_EXECFN", None) or argv[0]
    io = ProcessIO(prog, os.path.join(SIM_ROOT, "run", "jailhouse-sim.sock"))
    try:
        code = Tool(io, SIM_ROOT, RCPUS).main([prog] + argv[1:])
    except Exit as e:
        code = e.code
    except KeyboardInterrupt:
        code = 1
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(run_script(sys.argv))
