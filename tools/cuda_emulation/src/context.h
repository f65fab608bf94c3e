// Execution contexts for the emulator's fibers: a CUDA thread is a stack and the
// registers the C ABI asks a callee to preserve. On x86-64 a switch is a handful of
// instructions (context.cpp); elsewhere it falls back to ucontext, which also saves
// the signal mask with a system call per switch (correct, but much slower).
#pragma once

#include <cstddef>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace bspf_emulation {

struct Context {
#if defined(__x86_64__)
  void* sp = nullptr;  // the suspended fiber's stack pointer, its registers pushed below it
#else
  ucontext_t uc;
#endif
};

// Prepares `context` so that the first switch to it calls entry() on the stack
// [stack, stack + size). entry must never return (it switches away for good instead).
void make_context(Context& context, char* stack, size_t size, void (*entry)());

// Saves the running context into `from` and resumes `to`.
void switch_context(Context& from, Context& to);

}  // namespace bspf_emulation
