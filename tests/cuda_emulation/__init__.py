"""Helpers of the `cuda_emulated` tests: the real CUDA sources of csrc/cuda built for
the CPU against tools/cuda_emulation's shim runtime, and driven like bspf_ext._cuda.

* module.py  builds (once per session, cached on disk) and loads the emulated module
             and the emulator's probe library;
* ops.py     calls the emulated entry points on CPU tensors (host memory is the
             emulated device's memory), with every output pre-filled with garbage;
* checks.py  the SPEC §6 comparisons with the reference that the tests and the
             sanitizer runs share;
* probe.py   ctypes bindings of tools/cuda_emulation/probe/probe.cpp;
* sanitized.py  what a sanitizer subprocess runs.
"""
