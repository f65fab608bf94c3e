// See context.h. The x86-64 switch saves the callee-saved registers (rbp, rbx,
// r12–r15) on the old stack, swaps stack pointers and pops the new fiber's. The MXCSR
// and x87 control words are not switched: kernels never change the floating-point
// environment, so every fiber shares the launching thread's.
#include "context.h"

#include <cstdint>

#if defined(__x86_64__)

extern "C" void bspf_emulation_switch(void** save_sp, void* next_sp);

asm(R"(
  .text
  .globl bspf_emulation_switch
  .hidden bspf_emulation_switch
  .type bspf_emulation_switch, @function
  .p2align 4
bspf_emulation_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size bspf_emulation_switch, .-bspf_emulation_switch
)");

namespace bspf_emulation {

void make_context(Context& context, char* stack, size_t size, void (*entry)()) {
  // From the 16-byte aligned top S down: [S−8] a null return address (entry never
  // returns; it ends unwinding), [S−16] entry, popped by the switch's `ret`, so entry
  // starts with rsp ≡ 8 (mod 16) as after a call; below, six zeroed registers.
  auto top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t{15};
  auto* slot = reinterpret_cast<void**>(top);
  *--slot = nullptr;
  *--slot = reinterpret_cast<void*>(entry);
  for (int r = 0; r < 6; ++r) *--slot = nullptr;
  context.sp = slot;
}

void switch_context(Context& from, Context& to) { bspf_emulation_switch(&from.sp, to.sp); }

}  // namespace bspf_emulation

#else

namespace bspf_emulation {

void make_context(Context& context, char* stack, size_t size, void (*entry)()) {
  getcontext(&context.uc);
  context.uc.uc_stack.ss_sp = stack;
  context.uc.uc_stack.ss_size = size;
  context.uc.uc_link = nullptr;
  makecontext(&context.uc, entry, 0);
}

void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

}  // namespace bspf_emulation

#endif
