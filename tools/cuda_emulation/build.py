"""Builds the emulated CUDA module: csrc/cuda's real sources (api.cu, every other .cu,
the kernels they include) and csrc/python/cuda_module.cpp compiled with g++ as C++17
against the shim in include/, linked with the emulator's runtime (src/) into a
`_cuda` extension module that runs the kernels on the CPU. Also builds the probe
library (probe/probe.cpp) the emulator's own tests load with ctypes.

Variants: "plain" (-O2), "asan" (AddressSanitizer + UBSan) and "tsan"
(ThreadSanitizer; the runtime itself is left uninstrumented, see src/scheduler.cpp).
Objects are cached by a hash of their sources and flags, so a rebuild after a kernel
edit recompiles only the kernels.

    python tools/cuda_emulation/build.py [--variant plain|asan|tsan] [--out DIR]

prints the paths of the module and the probe. BSPF_EMULATION_CSRC points the build at
another copy of csrc/ (a development aid); BSPF_EMULATION_BUILD_JOBS runs that many
compilers at once (default 1); CXX names the compiler (default g++).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.machinery
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

# -fno-extern-tls-init: the shared-memory pointers (thread_local, see cuda_runtime.h) need no
# dynamic initialisation, so references to them call no TLS wrapper.
COMMON = ["-std=c++17", "-fPIC", "-fvisibility=hidden", "-pthread", "-DBSPF_CUDA_EMULATION", "-ffp-contract=off",
          "-fno-extern-tls-init"]
SANITIZE_ASAN = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
# (kernel flags, runtime flags, link flags) per variant.
VARIANTS = {
    "plain": (["-O2"], ["-O2"], []),
    "asan": (["-O1", "-g"] + SANITIZE_ASAN, ["-O1", "-g"] + SANITIZE_ASAN, SANITIZE_ASAN),
    "tsan": (["-O1", "-g", "-fsanitize=thread"], ["-O2", "-g", "-DBSPF_EMULATION_TSAN"], ["-fsanitize=thread"]),
}
RUNTIME_SOURCES = ["src/scheduler.cpp", "src/context.cpp", "src/runtime_api.cpp"]


class BuildError(RuntimeError):
    """A compile or link step failed; the message holds the command and its output."""


class SanitizerUnavailable(BuildError):
    """The compiler cannot build or link this sanitizer variant."""


@dataclass
class Built:
    cuda_module: Path  # the _cuda extension module
    probe: Path  # the probe shared library


def compiler() -> str:
    return os.environ.get("CXX", "g++")


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        output = proc.stdout if len(proc.stdout) < 20000 else proc.stdout[:20000] + "\n[...]"
        raise BuildError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{output}")


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:24]


def _tree_digest(*dirs: Path) -> bytes:
    """Names and contents of every file under dirs: what a translation unit may include."""
    h = hashlib.sha256()
    for d in dirs:
        for path in sorted(p for p in d.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            h.update(str(path.relative_to(d)).encode())
            h.update(path.read_bytes())
    return h.digest()


def _compiler_identity(cxx: str) -> bytes:
    return subprocess.run([cxx, "--version"], stdout=subprocess.PIPE, text=True, check=True).stdout.encode()


def check_sanitizer(variant: str, cxx: str | None = None) -> None:
    """Raises SanitizerUnavailable when `cxx` cannot compile and link the variant."""
    cxx = cxx or compiler()
    if shutil.which(cxx) is None:
        raise SanitizerUnavailable(f"no C++ compiler: {cxx} is not on PATH")
    kernel_flags, _, link_flags = VARIANTS[variant]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "t.cpp"
        src.write_text("extern \"C\" int probe(int x) { return x + 1; }\n")
        try:
            _run([cxx, *COMMON, *kernel_flags, "-shared", str(src), *link_flags, "-o", str(Path(tmp) / "t.so")])
        except BuildError as e:
            raise SanitizerUnavailable(f"{cxx} cannot build the {variant} variant:\n{e}") from None


def sanitizer_runtime(variant: str, cxx: str | None = None) -> Path | None:
    """The runtime library to LD_PRELOAD into an uninstrumented python (None for plain)."""
    name = {"asan": "libasan.so", "tsan": "libtsan.so"}.get(variant)
    if name is None:
        return None
    out = subprocess.run([cxx or compiler(), f"-print-file-name={name}"], stdout=subprocess.PIPE, text=True)
    path = Path(out.stdout.strip())
    if out.returncode != 0 or not path.is_absolute() or not path.exists():
        raise SanitizerUnavailable(f"{cxx or compiler()} has no {name}")
    return path.resolve()


class _Builder:
    def __init__(self, variant: str, csrc: Path, out: Path, jobs: int, cxx: str):
        self.variant, self.csrc, self.out, self.jobs, self.cxx = variant, csrc, out, jobs, cxx
        self.kernel_flags, self.runtime_flags, self.link_flags = VARIANTS[variant]
        self.identity = _compiler_identity(cxx)
        include = HERE / "include"
        self.includes = ["-I", str(include), "-I", str(csrc / "include"), "-I", str(csrc / "cuda")]
        shim = _tree_digest(include)
        headers = _tree_digest(csrc / "include")
        self.groups = {  # what each kind of translation unit may depend on
            "kernel": shim + headers + _tree_digest(csrc / "cuda"),
            "python": shim + headers + _tree_digest(csrc / "python") + self._python_identity(),
            "runtime": shim + _tree_digest(HERE / "src"),
            "probe": shim + _tree_digest(csrc / "cuda") + _tree_digest(HERE / "probe"),
        }

    @staticmethod
    def _python_identity() -> bytes:
        import pybind11

        return f"{sysconfig.get_paths()['include']} {pybind11.get_include()} {pybind11.__version__}".encode()

    def _python_includes(self) -> list[str]:
        import pybind11

        return ["-I", sysconfig.get_paths()["include"], "-I", pybind11.get_include()]

    def unit(self, source: Path, group: str) -> tuple[Path, list[str]]:
        """(object path, compile command) for one translation unit."""
        flags = list(COMMON)
        flags += self.runtime_flags if group == "runtime" else self.kernel_flags
        flags += self.includes
        if group == "python":
            flags += self._python_includes()
        lang = ["-x", "c++"] if source.suffix == ".cu" else []
        key = _digest(self.identity, " ".join(flags).encode(), str(source.name).encode(), source.read_bytes(),
                      self.groups[group])
        obj = self.out / "obj" / f"{source.stem}-{key}.o"
        return obj, [self.cxx, *flags, *lang, "-c", str(source)]

    def compile_all(self, units: list[tuple[Path, list[str]]]) -> None:
        todo = [(obj, cmd) for obj, cmd in units if not obj.exists()]
        (self.out / "obj").mkdir(parents=True, exist_ok=True)
        running: list[tuple[subprocess.Popen, Path, Path, list[str]]] = []

        def finish(proc, obj, tmp, cmd):
            output = proc.communicate()[0]
            if proc.returncode != 0:
                tmp.unlink(missing_ok=True)
                output = output if len(output) < 20000 else output[:20000] + "\n[...]"
                raise BuildError(f"compiling failed: {' '.join(cmd)}\n{output}")
            os.replace(tmp, obj)  # atomic: a concurrent build never sees half an object

        while todo or running:
            while todo and len(running) < self.jobs:
                obj, cmd = todo.pop(0)
                tmp = obj.with_suffix(f".{os.getpid()}.tmp")
                proc = subprocess.Popen([*cmd, "-o", str(tmp)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)
                running.append((proc, obj, tmp, cmd))
            proc, obj, tmp, cmd = running.pop(0)
            finish(proc, obj, tmp, cmd)

    def link(self, objects: list[Path], name: str, digest_of: list[Path]) -> Path:
        key = _digest(self.identity, " ".join(self.link_flags).encode(), *(str(o.name).encode() for o in digest_of))
        target = self.out / "lib" / key / name
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{name}.{os.getpid()}.tmp")
        _run([self.cxx, "-shared", "-pthread", *[str(o) for o in objects], *self.link_flags, "-o", str(tmp)])
        os.replace(tmp, target)
        return target


def build(variant: str = "plain", *, out: Path | None = None, csrc: Path | None = None, jobs: int | None = None) -> Built:
    """Compiles (what is not cached yet) and links the variant; returns the paths."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    cxx = compiler()
    if variant != "plain":
        check_sanitizer(variant, cxx)
    elif shutil.which(cxx) is None:
        raise SanitizerUnavailable(f"no C++ compiler: {cxx} is not on PATH")
    csrc = Path(csrc or os.environ.get("BSPF_EMULATION_CSRC") or ROOT / "csrc").resolve()
    out = Path(out or Path(tempfile.gettempdir()) / f"bspf_cuda_emulation-{os.getuid()}") / variant
    jobs = jobs or int(os.environ.get("BSPF_EMULATION_BUILD_JOBS", "1"))
    b = _Builder(variant, csrc, out, max(1, jobs), cxx)

    kernels = [b.unit(src, "kernel") for src in sorted((csrc / "cuda").glob("*.cu"))]
    module = b.unit(csrc / "python" / "cuda_module.cpp", "python")
    runtime = [b.unit(HERE / src, "runtime") for src in RUNTIME_SOURCES]
    probe = b.unit(HERE / "probe" / "probe.cpp", "probe")
    # The slowest first, so that with two jobs the short ones fill in.
    b.compile_all([module, *kernels, *runtime, probe])

    runtime_objs = [obj for obj, _ in runtime]
    cuda_objs = [obj for obj, _ in kernels] + [module[0]] + runtime_objs
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    return Built(
        cuda_module=b.link(cuda_objs, f"_cuda{suffix}", cuda_objs),
        probe=b.link([probe[0], *runtime_objs], "libbspf_probe.so", [probe[0], *runtime_objs]),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="plain", choices=sorted(VARIANTS))
    parser.add_argument("--out", type=Path, default=None, help="cache folder (default: under the temp dir)")
    args = parser.parse_args(argv)
    try:
        built = build(args.variant, out=args.out)
    except BuildError as e:
        print(e, file=sys.stderr)
        return 1
    print(built.cuda_module)
    print(built.probe)
    return 0


if __name__ == "__main__":
    sys.exit(main())
