"""The suite needs nothing that a clean Debian 12 machine plus ``bash setup.sh`` lacks.

* Every QEMU command line the project builds (argv lists in Python) or documents
  (code blocks in Markdown, shell scripts) says which devices it wants
  (``-nodefaults``, or at least ``-nic none``): QEMU's default NIC needs a ROM
  from ipxe-qemu, which setup.sh's ``--no-install-recommends`` leaves out.
* The QEMU ``virt`` device-tree dump the tests use works with those ROMs absent,
  whether or not ipxe-qemu is installed here.
* Every command the code (and the doc blocks the tests run) runs comes from a
  Debian package that setup.sh installs by name (a Recommends is not installed)
  or that every Debian system has.
* Every third-party Python module the code imports is declared in pyproject.toml.
"""

from __future__ import annotations

import ast
import ctypes
import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tools.linux_guest.testing import QEMU, virt_dtb_argv, virt_dtb_or_skip

PYTHON_ROOTS = ("runphi", "tools", "tests")
SKIPPED_DIRS = {".git", ".venv", "__pycache__", ".hypothesis", ".pytest_cache", "out", "build"}
SETUP_SH = REPO_ROOT / "setup.sh"

#: Every command the code runs → the Debian package that ships it (``dpkg -S``).
#: A new command fails the test until it is added here and its package is installed.
COMMAND_PACKAGES = {
    "qemu-system-aarch64": "qemu-system-arm",
    "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu",
    "aarch64-linux-gnu-objcopy": "binutils-aarch64-linux-gnu",
    "make": "make",
    "gcc": "gcc",
    "cc": "gcc",  # an alternative that gcc's maintainer script registers, so dpkg owns no file
    "objcopy": "binutils",
    "dtc": "device-tree-compiler",
    "containerd": "containerd",
    "containerd-shim-runc-v2": "containerd",
    "ctr": "containerd",
    "runc": "runc",
    "busybox": "busybox-static",
    "kubectl": "kubernetes-client",
    "ps": "procps",
    "nft": "nftables",
    "nsenter": "util-linux",
    "apt-get": "apt",
    "apt-cache": "apt",
    "dpkg": "dpkg",
    "dpkg-deb": "dpkg",
    "dpkg-query": "dpkg",
    "sh": "dash",
    "bash": "bash",
    "cat": "coreutils",
    "head": "coreutils",
    "mkdir": "coreutils",
    "mktemp": "coreutils",
    "sleep": "coreutils",
    "stty": "coreutils",
    "true": "coreutils",
}

#: Files (not commands) the suite needs → their package, for what the code scan cannot see.
FILE_PACKAGES = {
    # The host gcc compiles runphi's rendered cell C, which includes <stdint.h>; in hosted
    # mode gcc's own header includes libc's, and libc6-dev is only a Recommends of gcc.
    # (The aarch64 inmates are freestanding: libc6-dev-arm64-cross is not needed.)
    "/usr/include/stdint.h": "libc6-dev",
    # containerd's CRI runs the CNI plugins of a pod network (tests/cri/node.py, cni_bin_dir).
    "/usr/lib/cni/bridge": "containernetworking-plugins",
    "/usr/lib/cni/host-local": "containernetworking-plugins",
    "/usr/lib/cni/loopback": "containernetworking-plugins",
}

#: Other packages that may ship a command instead (setup.sh accepts any kubectl).
OTHER_PROVIDERS = {"kubectl": {"kubectl"}}  # the Google Cloud SDK's

#: Packages every Debian 12 system has, so setup.sh need not list them: Essential ones
#: and apt (Priority: required); debootstrap's minbase installs exactly these priorities.
#: Anything else (procps, gcc, ...) is on some images and not others.
ON_EVERY_DEBIAN = {"apt", "bash", "coreutils", "dash", "dpkg", "util-linux"}

#: The code that must be found, so the QEMU scan cannot pass by finding nothing.
KNOWN_QEMU_ARGV_FILES = {
    "tools/jailhouse_sim/engines/qemu.py",
    "tools/jailhouse_sim/engines/qemu_linux.py",
    "tools/linux_guest/guest.py",
    "tools/linux_guest/testing.py",
    "tools/bench/qemu_first_byte.py",
    "tools/jailhouse_sim/tests/test_qemu_engine.py",
}
KNOWN_QEMU_DOC_FILES = {"tools/inmates/README.md"}

_RUNNERS = {"run", "_run", "Popen", "check_output", "check_call", "call", "run_process", "open_process"}
_EXECS = {"execv", "execve", "execvp", "execvpe", "execl", "execlp"}


# ---------------------------------------------------------------- reading the tree


def tree_files(pattern: str, roots: tuple[str, ...] = (".",)) -> Iterator[Path]:
    """Files matching ``pattern`` under ``roots`` of the checkout, without venvs, caches and outputs."""
    for root in roots:
        for path in sorted((REPO_ROOT / root).rglob(pattern)):
            relative = path.relative_to(REPO_ROOT)
            if path.is_file() and not SKIPPED_DIRS & set(relative.parts) and not relative.parts[0].endswith(
                    ".egg-info"):
                yield path


@functools.cache
def python_modules() -> dict[str, ast.Module]:
    """Every Python source of the project, parsed, by path relative to the checkout (parsed once)."""
    return {str(p.relative_to(REPO_ROOT)): ast.parse(p.read_text(), str(p)) for p in tree_files("*.py", PYTHON_ROOTS)}


_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.Module)


def _own_nodes(scope: ast.AST) -> Iterator[ast.AST]:
    """The nodes of ``scope`` outside the functions and classes nested in it."""
    stack = list(ast.iter_child_nodes(scope))
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            stack.extend(ast.iter_child_nodes(node))


class Strings:
    """What an expression may evaluate to as a string, as far as the code's constants tell.

    A name is looked up in its own function, then the enclosing ones, then its module
    (Python's scoping, without class scopes); a name a module imports takes the values
    that any module assigns to it at module level. Bindings followed: assignments of
    strings or tuples/lists of strings, string defaults of parameters and
    ``for name in <strings>`` (comprehensions too). Anything else is unknown (an empty set).
    """

    def __init__(self, modules: dict[str, ast.Module]) -> None:
        self.parents = {child: node for module in modules.values() for node in ast.walk(module)
                        for child in ast.iter_child_nodes(node)}
        self._indexes: dict[int, dict[str, list[ast.AST]]] = {}
        self._cache: dict[tuple[int, str], set[str] | None] = {}
        self._busy: set[tuple[int, str]] = set()
        self.exported: dict[str, set[str]] = {}
        for module in modules.values():
            for name, nodes in self._index(module).items():
                if not any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in nodes):
                    self.exported.setdefault(name, set()).update(self._bound(module, name) or ())
        self._cache.clear()  # some entries were made while ``exported`` was still filling

    def of(self, node: ast.AST) -> set[str]:
        """The strings ``node`` may evaluate to (a tuple or list: its elements')."""
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return {node.value}
        if isinstance(node, (ast.Tuple, ast.List)):
            return set().union(*(self.of(elt) for elt in node.elts))
        if isinstance(node, ast.JoinedStr):
            parts = [self.of(v.value if isinstance(v, ast.FormattedValue) else v) for v in node.values]
            return {"".join(next(iter(p)) for p in parts)} if all(len(p) == 1 for p in parts) else set()
        if isinstance(node, ast.Name):
            return self._lookup(node.id, node)
        return set()

    def _lookup(self, name: str, at: ast.AST) -> set[str]:
        scope = self.parents.get(at)
        while scope is not None:
            if isinstance(scope, _SCOPES) and (found := self._bound(scope, name)) is not None:
                return found
            scope = self.parents.get(scope)
        return set()

    def _index(self, scope: ast.AST) -> dict[str, list[ast.AST]]:
        """Name → the nodes of ``scope`` that bind it (made once per scope)."""
        if (index := self._indexes.get(id(scope))) is None:
            index = {}
            for node in _own_nodes(scope):
                for name in _names_bound(node):
                    index.setdefault(name, []).append(node)
            self._indexes[id(scope)] = index
        return index

    def _bound(self, scope: ast.AST, name: str) -> set[str] | None:
        """The strings ``name`` is bound to in ``scope``, or None when ``scope`` does not bind it."""
        key = (id(scope), name)
        if key in self._cache:
            return self._cache[key]
        if key in self._busy:
            return set()  # a name defined from itself adds nothing
        nodes = self._index(scope).get(name)
        if nodes is None:
            return None
        self._busy.add(key)
        found = set().union(*(self._binding(node, name) for node in nodes))
        self._busy.discard(key)
        self._cache[key] = found
        return found

    def _binding(self, node: ast.AST, name: str) -> set[str]:
        if isinstance(node, (ast.For, ast.comprehension)):
            return self.of(node.iter)
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            return self.of(node.value) if node.value is not None else set()
        if isinstance(node, ast.arguments):
            positional = node.posonlyargs + node.args
            defaults = dict(zip(positional[len(positional) - len(node.defaults):], node.defaults))
            defaults.update((a, d) for a, d in zip(node.kwonlyargs, node.kw_defaults) if d is not None)
            return set().union(*(self.of(d) for a, d in defaults.items() if a.arg == name))
        return set(self.exported.get(name, ()))  # an import


def _names_bound(node: ast.AST) -> list[str]:
    """The names ``node`` binds in its scope (the ones :class:`Strings` follows)."""
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, (ast.AnnAssign, ast.For, ast.comprehension)) and isinstance(node.target, ast.Name):
        return [node.target.id]
    if isinstance(node, ast.arguments):
        args = [*node.posonlyargs, *node.args, *node.kwonlyargs, node.vararg, node.kwarg]
        return [a.arg for a in args if a is not None]
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return [a.asname or a.name.split(".")[0] for a in node.names]
    return []


def _call_name(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def argv_lists(module: ast.Module) -> Iterator[ast.List]:
    """List literals used as a command line: passed to a runner, assigned to ``*argv``, or returned by ``*argv()``."""
    for node in ast.walk(module):
        if isinstance(node, ast.Call) and _call_name(node) in _RUNNERS and node.args:
            if isinstance(node.args[0], ast.List):
                yield node.args[0]
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.List):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id.endswith("argv") for t in targets):
                yield node.value
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.endswith("argv"):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Return) and isinstance(inner.value, ast.List):
                    yield inner.value


@functools.cache
def strings() -> Strings:
    """The resolver over :func:`python_modules` (built once)."""
    return Strings(python_modules())


def commands_run(modules: dict[str, ast.Module], resolver: Strings) -> dict[str, set[str]]:
    """Command name → the files that run it or look it up (``shutil.which``, argv lists, ``os.exec*``)."""
    found: dict[str, set[str]] = {}
    for path, module in modules.items():
        names: set[str] = set()
        for node in ast.walk(module):
            if isinstance(node, ast.Call) and node.args and _call_name(node) in {"which", *_EXECS}:
                names |= resolver.of(node.args[0])
        for argv in argv_lists(module):
            if argv.elts and not isinstance(argv.elts[0], ast.Starred):
                names |= resolver.of(argv.elts[0])
        for name in names:
            if re.fullmatch(r"[a-z][a-z0-9.+_-]*", name):
                found.setdefault(name, set()).add(path)
    return found


# ---------------------------------------------------------------- QEMU command lines


def names_its_devices(args: list[str]) -> bool:
    """True when a QEMU command line turns the default devices off (or at least the NIC)."""
    pairs = set(zip(args, args[1:]))
    return "-nodefaults" in args or ("-nic", "none") in pairs or ("-net", "none") in pairs


def qemu_argv_lists(modules: dict[str, ast.Module], resolver: Strings) -> list[tuple[str, int, list[str]]]:
    """(file, line, constant arguments) of every argv list literal that starts QEMU.

    A list is QEMU's when its first element may be a ``qemu-system-*`` name or it
    carries ``-M``/``-machine`` (which no other command here takes).
    """
    found = []
    for path, module in modules.items():
        for node in ast.walk(module):
            if not isinstance(node, ast.List) or not isinstance(node.ctx, ast.Load) or not node.elts:
                continue
            constants = [e.value if isinstance(e, ast.Constant) and isinstance(e.value, str) else "" for e in node.elts]
            first = resolver.of(node.elts[0]) if not isinstance(node.elts[0], ast.Starred) else set()
            if any(v.startswith("qemu-system-") for v in first) or {"-M", "-machine"} & set(constants):
                found.append((path, node.lineno, constants))
    return found


def code_blocks(markdown: str) -> Iterator[tuple[int, str]]:
    """(first line number, text) of each fenced or indented code block."""
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].lstrip().startswith("```"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].lstrip().startswith("```")), len(lines))
            yield i + 2, "\n".join(lines[i + 1:end])
            i = end + 1
        elif lines[i].startswith(("    ", "\t")) and (i == 0 or not lines[i - 1].strip()):
            end = i
            while end < len(lines) and (lines[end].startswith(("    ", "\t")) or not lines[end].strip()):
                end += 1
            yield i + 1, "\n".join(lines[i:end])
            i = end
        else:
            i += 1


def qemu_shell_lines(text: str) -> Iterator[tuple[int, list[str]]]:
    """(line offset, words) of each shell command line in ``text`` that runs ``qemu-system-*`` with options."""
    logical = ""
    start = 0
    for offset, line in enumerate(text.splitlines()):
        if not logical:
            start = offset
        logical += line.rstrip()
        if logical.endswith("\\"):
            logical = logical[:-1] + " "
            continue
        try:
            words = shlex.split(logical, comments=True)
        except ValueError:
            words = logical.split()
        logical = ""
        for i, word in enumerate(words[:-1]):
            if re.fullmatch(r"(.*/)?qemu-system-[\w-]+", word) and words[i + 1].startswith("-"):
                yield start, words[i:]
                break


def documented_qemu_lines() -> list[tuple[str, int, list[str]]]:
    """(file, line, words) of every QEMU command line in Markdown code blocks and shell scripts."""
    found = []
    for path in tree_files("*.md"):
        for first, block in code_blocks(path.read_text()):
            found += [(str(path.relative_to(REPO_ROOT)), first + n, words) for n, words in qemu_shell_lines(block)]
    scripts = [*tree_files("*.sh"), *tree_files("*", (".ci",))]
    for path in scripts:
        found += [(str(path.relative_to(REPO_ROOT)), n + 1, words) for n, words in qemu_shell_lines(path.read_text())]
    return found


def test_every_qemu_argv_in_the_code_names_its_devices():
    modules = python_modules()
    found = qemu_argv_lists(modules, strings())
    assert len(found) >= len(KNOWN_QEMU_ARGV_FILES) and KNOWN_QEMU_ARGV_FILES <= {f for f, _, _ in found}, found
    bare = [f"{path}:{line}" for path, line, args in found if not names_its_devices(args)]
    assert not bare, f"QEMU command lines relying on QEMU's default devices (add -nodefaults): {bare}"


def test_every_documented_qemu_command_names_its_devices():
    found = documented_qemu_lines()
    assert KNOWN_QEMU_DOC_FILES <= {path for path, _, _ in found}, found
    bare = [f"{path}:{line}" for path, line, words in found if not names_its_devices(words)]
    assert not bare, f"documented QEMU command lines relying on QEMU's default devices (add -nodefaults): {bare}"


# ---------------------------------------------------------------- QEMU without ipxe-qemu


_libc = ctypes.CDLL(None, use_errno=True)  # resolved here: a forked child must not dlopen
_CLONE_NEWNS, _MS_BIND, _MS_REC, _MS_PRIVATE = 0x20000, 0x1000, 0x4000, 0x40000


def nic_rom_dirs() -> list[Path]:
    """QEMU's firmware directories that hold the default NIC's ROM (ipxe-qemu's)."""
    listing = subprocess.run([QEMU, "-nodefaults", "-L", "help"], capture_output=True, text=True, timeout=60,
                             check=True).stdout
    return [Path(d).resolve() for d in listing.split() if (Path(d) / "efi-virtio.rom").exists()]


def run_without(hidden: list[Path], empty: Path, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with an empty directory mounted over each of ``hidden`` (its own mount namespace)."""

    def hide() -> None:
        if _libc.unshare(_CLONE_NEWNS) or _libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None):
            raise OSError(ctypes.get_errno(), "cannot make a private mount namespace")
        for directory in hidden:
            if _libc.mount(bytes(empty), bytes(directory), None, _MS_BIND, None):
                raise OSError(ctypes.get_errno(), f"cannot hide {directory}")

    return subprocess.run(argv, capture_output=True, text=True, timeout=60, preexec_fn=hide if hidden else None)


def test_the_device_tree_dump_is_a_device_tree(tmp_path):
    dtb = virt_dtb_or_skip(tmp_path / "virt.dtb")
    assert dtb[:4] == b"\xd0\x0d\xfe\xed"


def test_the_device_tree_dump_needs_no_nic_rom(tmp_path):
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} not found (apt-get install qemu-system-arm)")
    hidden = nic_rom_dirs()  # empty where ipxe-qemu is not installed: the clean machine as it is
    if hidden and os.geteuid() != 0:
        pytest.skip(f"ipxe-qemu is installed here and hiding its ROMs ({hidden}) needs root")
    empty = tmp_path / "empty"
    empty.mkdir()
    done = run_without(hidden, empty, virt_dtb_argv(tmp_path / "virt.dtb"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "virt.dtb").read_bytes()[:4] == b"\xd0\x0d\xfe\xed"
    # The control: QEMU's default devices do need the ROM here, so the run above did without it.
    defaults = run_without(hidden, empty, [a for a in virt_dtb_argv(tmp_path / "again.dtb") if a != "-nodefaults"])
    assert defaults.returncode != 0 and "efi-virtio.rom" in defaults.stderr, defaults


# ---------------------------------------------------------------- Debian packages


def setup_packages() -> set[str]:
    """Every package setup.sh may install: its DEBIAN_PACKAGES list and what it adds to it."""
    words: set[str] = set()
    inside = False
    for line in SETUP_SH.read_text().splitlines():
        code = re.sub(r"(^|\s)#.*", "", line)  # a comment may hold parentheses
        if not inside and (opening := re.search(r"\bDEBIAN_PACKAGES\+?=\(", code)):
            inside, code = True, code[opening.end():]
        if inside:
            body, closed, _ = code.partition(")")
            words.update(body.split())
            inside = not closed
    assert words, "setup.sh has no DEBIAN_PACKAGES=( ... ) list"
    return words


def setup_install_flags() -> list[str]:
    """The options of setup.sh's ``apt-get install`` (the one that installs DEBIAN_PACKAGES)."""
    [line] = [line for line in SETUP_SH.read_text().splitlines() if re.search(r"apt-get install\b", line)]
    words = line.split()
    return [w for w in words[words.index("install") + 1:] if w.startswith("-")]


def package_hints(modules: dict[str, ast.Module]) -> dict[str, set[str]]:
    """Packages the code's messages tell a person to install (``apt-get install X``, ``Debian: X``)."""
    hints: dict[str, set[str]] = {}
    pattern = re.compile(r"apt-get install ((?:[a-z0-9][a-z0-9.+-]+ ?)+)|Debian(?: package|:) ([a-z0-9][a-z0-9.+-]+)\)"
                         r"|\(install ([a-z0-9][a-z0-9.+-]+)\)")
    for path, module in modules.items():
        for node in ast.walk(module):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for match in pattern.finditer(node.value):
                    for name in " ".join(g for g in match.groups() if g).split():
                        hints.setdefault(name, set()).add(path)
    return hints


def dpkg_owners(paths: list[str]) -> dict[str, set[str]]:
    """Path → the packages that ship it (or its pre-usrmerge /bin twin); paths no package ships are left out."""
    twins = {path: {path, re.sub(r"^/usr(?=/s?bin/)", "", path)} for path in paths}
    done = subprocess.run(["dpkg-query", "-S", *set().union(*twins.values())], capture_output=True, text=True)
    shipped: dict[str, set[str]] = {}
    for line in done.stdout.splitlines():
        packages, _, file = line.rpartition(": ")
        if not packages.startswith("diversion by"):
            shipped.setdefault(file, set()).update(name.strip().split(":")[0] for name in packages.split(","))
    owners = {path: set().union(*(shipped.get(twin, set()) for twin in candidates))
              for path, candidates in twins.items()}
    return {path: found for path, found in owners.items() if found}


_NOT_RUN = re.compile(r"<!--\s*not run:")
_COMMAND_START = {";", "&&", "||", "|", "|&", "&", "(", ";;"}
_LEADING_KEYWORDS = {"do", "then", "else", "elif", "if", "while", "until", "!", "time", "exec", "command", "{"}
_BUILTINS = {"cd", "echo", "export", "false", "kill", "printf", "read", "set", "source", "test", "trap", "true",
             "unset", "wait", ".", "[", "done", "fi", "esac", "}", "for", "case", "in"}

#: The Markdown whose shell blocks tests run (tests/test_e2e_readme.py, tests/test_docs_blocks.py).
RUN_DOCS = ("README.md", "docs/*.md", "tools/jailhouse_sim/README.md", "tools/inmates/README.md")


def run_shell_blocks() -> Iterator[tuple[str, str]]:
    """(file, text) of every shell block in RUN_DOCS that is not marked ``<!-- not run: ... -->``."""
    for path in sorted({p for pattern in RUN_DOCS for p in REPO_ROOT.glob(pattern)}):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if re.fullmatch(r"\s*```(sh|bash|shell)\s*", line) and not (i and _NOT_RUN.search(lines[i - 1])):
                end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("```")), len(lines))
                yield str(path.relative_to(REPO_ROOT)), "\n".join(lines[i + 1:end])


def shell_commands(text: str) -> set[str]:
    """The external commands a shell text runs by name (not by path, not builtins or keywords)."""
    found = set()
    for line in text.replace("\\\n", " ").splitlines():  # shlex would lose the line ends
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        try:
            tokens = list(lexer)
        except ValueError:  # an unbalanced quote: not a command line
            continue
        at_start, after_redirect = True, False
        for token in tokens:
            if after_redirect:
                after_redirect = False
            elif token in _COMMAND_START:
                at_start = True
            elif "<" in token or ">" in token:
                after_redirect = True
            elif at_start and (token in _LEADING_KEYWORDS or re.match(r"\w+=", token)):
                continue  # the command comes next: `do cmd`, `VAR=value cmd`, `x=$(cmd)`
            elif at_start:
                at_start = False
                if re.fullmatch(r"[a-z][a-z0-9.+_-]*", token) and token not in _BUILTINS:
                    found.add(token)
    return found


def test_setup_sh_installs_the_slimmest_way():
    # The tables here assume no Recommends: each needed package is named in setup.sh.
    assert "--no-install-recommends" in setup_install_flags()


def commands_everywhere() -> dict[str, set[str]]:
    """Command name → files, for the Python code and the doc blocks the tests run."""
    modules = python_modules()
    found = commands_run(modules, strings())
    for path, block in run_shell_blocks():
        for name in shell_commands(block):
            found.setdefault(name, set()).add(path)
    return found


def test_every_command_the_code_runs_has_its_package_in_the_table():
    found = commands_everywhere()
    assert {"qemu-system-aarch64", "runc", "containerd", "busybox", "aarch64-linux-gnu-gcc", "ctr",
            "mktemp"} <= set(found), found
    # The venv's own programs (python, runphi, jailhouse-sim) come with setup.sh's venv.
    ours = {name for name in found if (Path(sys.executable).parent / name).exists()}
    unknown = {name: sorted(paths) for name, paths in found.items() if name not in {*COMMAND_PACKAGES, *ours}}
    assert not unknown, f"commands run by the code with no Debian package in COMMAND_PACKAGES: {unknown}"
    stale = set(COMMAND_PACKAGES) - set(found)
    assert not stale, f"COMMAND_PACKAGES names commands nothing runs any more: {stale}"


def test_every_needed_package_is_installed_by_setup_sh_or_on_every_debian():
    listed = setup_packages()
    needed = {*COMMAND_PACKAGES.values(), *FILE_PACKAGES.values()}
    missing = sorted(needed - listed - ON_EVERY_DEBIAN)
    assert not missing, f"add to setup.sh's DEBIAN_PACKAGES: {missing}"


def test_every_package_the_messages_name_is_installed_by_setup_sh():
    hints = package_hints(python_modules())
    assert {"qemu-system-arm", "gcc-aarch64-linux-gnu", "kubernetes-client", "busybox-static"} <= set(hints), hints
    missing = {name: sorted(paths) for name, paths in hints.items() if name not in setup_packages() | ON_EVERY_DEBIAN}
    assert not missing, f"messages tell people to install packages setup.sh does not: {missing}"


def test_the_tables_name_the_packages_that_really_ship_the_files():
    if shutil.which("dpkg-query") is None:
        pytest.skip("not a Debian system (no dpkg-query)")
    expected = {where: {package} | OTHER_PROVIDERS.get(command, set())
                for command, package in COMMAND_PACKAGES.items() if (where := shutil.which(command))}
    expected |= {path: {package} for path, package in FILE_PACKAGES.items() if Path(path).exists()}
    owners = dpkg_owners(sorted(expected))
    assert len(owners) >= 10, owners  # this is a Debian system with the suite's tools: most are found
    wrong = {path: (sorted(packages), sorted(owners[path])) for path, packages in expected.items()
             if path in owners and not owners[path] & packages}
    assert not wrong, f"path → (the tables' package, the packages dpkg says ship it): {wrong}"


# ---------------------------------------------------------------- Python packages


def _normalized(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group()).lower()


def third_party_imports(modules: dict[str, ast.Module]) -> dict[str, set[str]]:
    """Top-level module → the files importing it, for modules neither stdlib nor the project's own."""
    local = {p.stem for root in PYTHON_ROOTS for p in (REPO_ROOT / root).rglob("*.py")} | set(PYTHON_ROOTS)
    found: dict[str, set[str]] = {}
    for path, module in modules.items():
        for node in ast.walk(module):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local and top != "__future__":
                    found.setdefault(top, set()).add(path)
    return found


def test_every_imported_package_is_declared_in_pyproject():
    from importlib.metadata import packages_distributions

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    runtime = {_normalized(r) for r in project["dependencies"]}
    declared = runtime | {_normalized(r) for r in project["optional-dependencies"]["test"]}
    providers = packages_distributions()
    imports = third_party_imports(python_modules())
    assert {"trio", "msgspec", "pytest"} <= set(imports), imports
    undeclared = {}
    for module, paths in imports.items():
        dists = {_normalized(d) for d in providers.get(module, [])}
        allowed = runtime if any(p.startswith("runphi/") for p in paths) else declared
        if not dists & (allowed | {_normalized(project["name"])}):
            undeclared[module] = (sorted(dists) or "not installed in this environment", sorted(paths))
    assert not undeclared, f"imports not declared in pyproject.toml: {undeclared}"
