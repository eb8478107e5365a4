// SIMT test harness, runtime: executes CUDA kernels compiled by g++ against tests/simt/simt.h.
//
//   * Launch: blocks in order (x fastest), each block's threads as fibers on their own stacks
//     (a hand-written x86-64 context switch), scheduled cooperatively in linear-id order; a thread
//     runs until it blocks at a barrier or returns. CUDA numbering: linear id = x + y Dx + z Dx Dy,
//     warp = linear id / 32. Launch configurations are checked like the GPU does (grid dims
//     against configurable limits, <= 1024 threads, shared memory against 48 KiB or the
//     cudaFuncSetAttribute opt-in).
//   * Barriers: __syncthreads releases when every thread of the block waits at the same
//     __syncthreads (same source line); a thread that returned, or waits at another line, while
//     others wait is a "barrier divergence" error. Warp operations (__syncwarp, shuffles) release
//     when every lane of the mask waits at a warp operation with the same mask; a lane of the mask
//     that returned, does not exist, or waits at __syncthreads is an error. Every stuck state is
//     reported (no hang).
//   * Memory checks, through the -fsanitize=kernel-address hooks __asan_{load,store}N (only while a
//     kernel thread runs):
//       - global: the CPU allocator is replaced (simt.enable) by one that registers every
//         allocation and surrounds it with red zones; an access in a red zone, or outside every
//         allocation, fiber stack, launching stack, shared arena and loaded object, fails with the
//         kernel, block, thread and the offset from the allocation's start;
//       - shared: one shadow word per 4 bytes records the last writer, the last reader(s), the
//         block barrier epoch and the warp-sync epoch of the access; an access by another thread
//         that conflicts (write/any or any/write) in the same epoch fails as a race. __syncthreads
//         orders everything, __syncwarp orders the lanes of one warp; shuffles do not order memory.
//   The first error of a launch stops it and the launch throws (RuntimeError in Python).
// Exposed as torch.ops.simt.* (see the TORCH_LIBRARY block at the end).
#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>
#include <cxxabi.h>
#include <dlfcn.h>
#include <pthread.h>
#include <sys/mman.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "simt_abi.h"

// ---- context switch (x86-64 System V) ----------------------------------------------------------

extern "C" void simt_switch(void** save_sp, void* new_sp);
asm(R"(
.text
.globl simt_switch
.type simt_switch,@function
simt_switch:
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
.size simt_switch,.-simt_switch
)");

namespace simt {

namespace {

// ---- configuration ------------------------------------------------------------------------------

struct Config {
  int64_t max_grid_x = 2147483647;
  int64_t max_grid_y = 65535;
  int64_t max_grid_z = 65535;
  int64_t sm_count = 4;
  int64_t smem_default = 48 * 1024;
  int64_t smem_optin = 227 * 1024;  // sm_90
  int64_t planted = 0;              // bit k set: planted(k) is true
};
Config g_config;

struct Stats {
  int64_t launches = 0, blocks = 0, threads = 0, global_accesses = 0, shared_accesses = 0,
          block_barriers = 0, warp_syncs = 0;
};
Stats g_stats;

// ---- tracked CPU allocations --------------------------------------------------------------------

constexpr size_t kRedZone = 256;
constexpr size_t kAlign = 64;

struct Allocation {
  uintptr_t begin, end;  // the bytes handed out: [begin, end)
};

std::mutex g_alloc_mutex;
std::map<uintptr_t, Allocation> g_allocations;  // keyed by begin
std::atomic<uint64_t> g_frees{0};                // invalidates the checker's cached allocation

void tracked_free(void* data) {
  if (data == nullptr) return;
  {
    std::lock_guard<std::mutex> lock(g_alloc_mutex);
    g_allocations.erase(reinterpret_cast<uintptr_t>(data));
  }
  ++g_frees;
  std::free(static_cast<char*>(data) - kRedZone);
}

struct TrackingAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    const size_t padded = (n + kAlign - 1) / kAlign * kAlign;
    void* base = nullptr;
    if (posix_memalign(&base, kAlign, padded + 2 * kRedZone) != 0) throw std::bad_alloc();
    char* data = static_cast<char*>(base) + kRedZone;
    {
      std::lock_guard<std::mutex> lock(g_alloc_mutex);
      const auto b = reinterpret_cast<uintptr_t>(data);
      g_allocations[b] = Allocation{b, b + n};
    }
    return {data, data, &tracked_free, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &tracked_free; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};
TrackingAllocator g_tracking_allocator;
c10::Allocator* g_previous_allocator = nullptr;

// The allocation whose [begin - red zone, end + red zone) holds addr, if any.
std::optional<Allocation> find_allocation(uintptr_t addr) {
  std::lock_guard<std::mutex> lock(g_alloc_mutex);
  auto it = g_allocations.upper_bound(addr + kRedZone);
  if (it == g_allocations.begin()) return std::nullopt;
  --it;
  const Allocation a = it->second;
  const size_t padded = (a.end - a.begin + kAlign - 1) / kAlign * kAlign;
  if (addr + kRedZone >= a.begin && addr < a.begin + padded + kRedZone) return a;
  return std::nullopt;
}

// ---- fibers and launch state ------------------------------------------------------------------

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kMaxThreads = 1024;

enum class State : uint8_t { kRunnable, kBlockWait, kWarpWait, kDone };

struct Thread {
  void* sp = nullptr;
  State state = State::kRunnable;
  int line = 0;         // source line of the barrier it waits at
  unsigned mask = 0;    // warp operation: mask, mode, argument, width, value in, value out
  int mode = 0, arg = 0, width = 32;
  bool is_sync_warp = false;
  uint64_t value = 0, result = 0;
  uint3 tid{};
};

struct SharedShadow {
  uint32_t w_tid, w_epoch, w_wepoch;
  uint32_t r_tid, r_epoch, r_wepoch;
  uint8_t r_multi;  // 0: one reader, 1: several in r_tid's warp (same warp epoch), 2: several warps
};

struct Launch {
  const char* name = nullptr;
  const void* fn = nullptr;
  dim3 grid{}, block{};
  size_t smem = 0;
  ThreadBody body = nullptr;
  void* ctx = nullptr;
  uint3 block_id{};
  int nthreads = 0;
  std::vector<Thread> threads;
  int current = -1;  // running thread, -1 in the scheduler
  void* scheduler_sp = nullptr;
  std::string error;
  // shared memory of the running block: [0, smem) dynamic, then the static variables
  std::vector<unsigned char> arena;
  size_t arena_used = 0;
  std::vector<std::pair<const char*, size_t>> statics;  // key -> offset
  std::vector<SharedShadow> shadow;
  uint32_t epoch = 0;            // block barrier epoch (global, monotonic)
  std::vector<uint32_t> wepoch;  // per warp sync epoch
  int atomic_depth = 0;
};

// The launch being executed (one at a time: run_grid holds g_launch_mutex). A plain global, not
// thread_local: the access hooks read it on every load and store, and a dlopen'ed library's TLS
// costs a call. Instrumented code runs only on the launching OS thread while it is set.
Launch* t_launch = nullptr;
std::mutex g_launch_mutex;

char* g_stacks = nullptr;  // kMaxThreads stacks, each with a guard page below
uintptr_t g_stacks_lo = 0, g_stacks_hi = 0;
uintptr_t g_host_stack_lo = 0, g_host_stack_hi = 0;
std::unordered_map<const void*, int> g_func_smem;  // cudaFuncSetAttribute opt-ins
uint32_t g_epoch_counter = 0;

void init_stacks() {
  if (g_stacks != nullptr) return;
  const size_t total = kStackBytes * kMaxThreads;
  void* p = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                 -1, 0);
  TORCH_CHECK(p != MAP_FAILED, "simt: cannot map fiber stacks");
  g_stacks = static_cast<char*>(p);
  for (int i = 0; i < kMaxThreads; ++i) mprotect(g_stacks + i * kStackBytes, 4096, PROT_NONE);
  g_stacks_lo = reinterpret_cast<uintptr_t>(g_stacks);
  g_stacks_hi = g_stacks_lo + total;
}

void init_host_stack() {
  pthread_attr_t attr;
  pthread_getattr_np(pthread_self(), &attr);
  void* addr = nullptr;
  size_t size = 0;
  pthread_attr_getstack(&attr, &addr, &size);
  pthread_attr_destroy(&attr);
  g_host_stack_lo = reinterpret_cast<uintptr_t>(addr);
  g_host_stack_hi = g_host_stack_lo + size;
}

std::string where(const Launch& L) {
  std::ostringstream s;
  s << "kernel " << L.name << ", block (" << L.block_id.x << "," << L.block_id.y << ","
    << L.block_id.z << ")";
  if (L.current >= 0) {
    const uint3 t = L.threads[L.current].tid;
    s << ", thread (" << t.x << "," << t.y << "," << t.z << ") [linear " << L.current << ", warp "
      << L.current / 32 << ", lane " << L.current % 32 << "]";
  }
  return s.str();
}

// Back to the scheduler; only returns when the scheduler resumes this thread.
void yield_to_scheduler() {
  Launch& L = *t_launch;
  Thread& me = L.threads[L.current];
  simt_switch(&me.sp, L.scheduler_sp);
}

// Records the launch's first error and parks the running thread for good.
[[noreturn]] void fail(const std::string& message) {
  Launch& L = *t_launch;
  if (L.error.empty()) L.error = message;
  if (L.current >= 0) {
    L.threads[L.current].state = State::kDone;
    yield_to_scheduler();
  }
  std::abort();  // unreachable: the scheduler never resumes a failed launch's threads
}

void fiber_main() {
  Launch& L = *t_launch;
  try {
    L.body(L.ctx);
  } catch (const std::exception& e) {
    if (L.error.empty()) L.error = where(L) + ": exception: " + e.what();
  }
  L.threads[L.current].state = State::kDone;
  yield_to_scheduler();
  std::abort();
}

void prepare_fiber(int i) {
  char* top = g_stacks + (i + 1) * kStackBytes;
  auto* slots = reinterpret_cast<void**>(top - 16);
  slots[0] = reinterpret_cast<void*>(&fiber_main);  // the return address of the first switch
  slots[1] = nullptr;
  void** sp = slots - 6;  // r15 r14 r13 r12 rbx rbp
  for (int k = 0; k < 6; ++k) sp[k] = nullptr;
  t_launch->threads[i].sp = sp;
}

// ---- shared-memory race check -------------------------------------------------------------------

bool ordered(const Launch& L, uint32_t other_tid, uint32_t other_epoch, uint32_t other_wepoch,
             int me) {
  if (other_epoch != L.epoch || static_cast<int>(other_tid) == me) return true;
  return static_cast<int>(other_tid) / 32 == me / 32 && other_wepoch != L.wepoch[me / 32];
}

void check_shared(Launch& L, uintptr_t offset, size_t n, bool write) {
  ++g_stats.shared_accesses;
  if (L.atomic_depth > 0) return;
  const int me = L.current;
  const uint32_t we = L.wepoch[me / 32];
  for (uintptr_t w = offset / 4; w <= (offset + n - 1) / 4; ++w) {
    SharedShadow& s = L.shadow[w];
    auto race = [&](const char* kind, uint32_t other) {
      std::ostringstream m;
      m << where(L) << ": shared-memory race (" << kind << ") at shared byte offset " << w * 4
        << " with thread [linear " << other << ", warp " << other / 32
        << "] in the same barrier interval (no __syncthreads / __syncwarp between them)";
      fail(m.str());
    };
    if (s.w_epoch != 0 && !ordered(L, s.w_tid, s.w_epoch, s.w_wepoch, me))
      race(write ? "write after write" : "read after write", s.w_tid);
    if (write) {
      if (s.r_epoch == L.epoch && s.r_epoch != 0) {
        const bool same_warp = static_cast<int>(s.r_tid) / 32 == me / 32;
        const bool ok = s.r_multi == 2 ? false
                        : s.r_multi == 1
                            ? (same_warp && s.r_wepoch != we)
                            : ordered(L, s.r_tid, s.r_epoch, s.r_wepoch, me);
        if (!ok) race("write after read", s.r_tid);
      }
      s.w_tid = me;
      s.w_epoch = L.epoch;
      s.w_wepoch = we;
      s.r_epoch = 0;
    } else {
      if (s.r_epoch != L.epoch) {
        s.r_tid = me;
        s.r_epoch = L.epoch;
        s.r_wepoch = we;
        s.r_multi = 0;
      } else if (static_cast<int>(s.r_tid) != me && s.r_multi != 2) {
        const bool same_warp = static_cast<int>(s.r_tid) / 32 == me / 32;
        if (!same_warp) {
          s.r_multi = 2;
        } else if (s.r_wepoch == we) {
          s.r_multi = 1;
        } else {  // the earlier reads of this warp are ordered before this one
          s.r_tid = me;
          s.r_wepoch = we;
          s.r_multi = 0;
        }
      }
    }
  }
}

// ---- every access of an instrumented kernel ------------------------------------------------------

void check_access(uintptr_t addr, size_t n, bool write) {
  Launch* L = t_launch;
  if (L == nullptr || L->current < 0) return;
  if (addr >= g_stacks_lo && addr < g_stacks_hi) return;  // the fibers' own stacks
  const auto arena = reinterpret_cast<uintptr_t>(L->arena.data());
  if (addr >= arena && addr < arena + L->arena.size()) {
    if (addr + n > arena + L->arena_used) {
      std::ostringstream m;
      m << where(*L) << ": " << (write ? "write" : "read") << " of " << n
        << " bytes at shared offset " << addr - arena << " beyond the block's "
        << L->arena_used << " bytes of shared memory";
      fail(m.str());
    }
    check_shared(*L, addr - arena, n, write);
    return;
  }
  if (addr >= g_host_stack_lo && addr < g_host_stack_hi) return;  // kernel parameters
  ++g_stats.global_accesses;
  static Allocation last{0, 0};  // the last allocation hit, while nothing was freed
  static uint64_t last_frees = 0;
  if (last_frees == g_frees && addr >= last.begin && addr + n <= last.end) return;
  const std::optional<Allocation> a = find_allocation(addr);
  if (a && addr >= a->begin && addr + n <= a->end) {
    last = *a;
    last_frees = g_frees;
    return;
  }
  std::ostringstream m;
  m << where(*L) << ": out-of-bounds global " << (write ? "write" : "read") << " of " << n
    << " bytes at " << reinterpret_cast<void*>(addr);
  if (a) {
    const int64_t off = static_cast<int64_t>(addr) - static_cast<int64_t>(a->begin);
    m << ": byte offset " << off << " of an allocation of " << a->end - a->begin << " bytes";
    fail(m.str());
  }
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(addr), &info) != 0 && info.dli_fname != nullptr) return;
  m << ": not inside any tracked allocation (was the tensor made before torch.ops.simt.enable()?)";
  fail(m.str());
}

}  // namespace

// ---- kernel-side entry points (declared in simt.h) ---------------------------------------------

uint3 thread_idx() { return t_launch->threads[t_launch->current].tid; }
uint3 block_idx() { return t_launch->block_id; }
dim3 block_dim() { return t_launch->block; }
dim3 grid_dim() { return t_launch->grid; }
bool planted(int which) { return (g_config.planted >> which) & 1; }
void atomic_begin() { ++t_launch->atomic_depth; }
void atomic_end() { --t_launch->atomic_depth; }

void sync_block(int line) {
  Launch& L = *t_launch;
  Thread& me = L.threads[L.current];
  me.state = State::kBlockWait;
  me.line = line;
  yield_to_scheduler();
}

namespace {

// The lane a warp operation of `t` reads, or -1 for its own value.
int source_lane(const Thread& t, int lane) {
  const int w = t.width, base = lane / w * w, in = lane % w;
  switch (t.mode) {
    case kShflIdx: return base + ((t.arg % w) + w) % w;
    case kShflUp: return in - t.arg < 0 ? -1 : lane - t.arg;
    case kShflDown: return in + t.arg >= w ? -1 : lane + t.arg;
    default: {
      const int src = lane ^ t.arg;
      return src >= base + w ? -1 : src;
    }
  }
}

// Arrival of the current thread at a warp operation; returns its result.
uint64_t warp_op(Thread& me, int line) {
  Launch& L = *t_launch;
  const int lane = L.current % 32, warp_base = L.current - lane;
  const int lanes_here = std::min(32, L.nthreads - warp_base);
  if (!(me.mask >> lane & 1u)) {
    std::ostringstream m;
    m << where(L) << ": warp operation at line " << line << " with mask 0x" << std::hex << me.mask
      << " that does not include the calling lane";
    fail(m.str());
  }
  if (lanes_here < 32 && (me.mask >> lanes_here) != 0) {
    std::ostringstream m;
    m << where(L) << ": warp operation at line " << line << " with mask 0x" << std::hex << me.mask
      << " naming lanes that do not exist (the warp has " << std::dec << lanes_here << " threads)";
    fail(m.str());
  }
  me.state = State::kWarpWait;
  me.line = line;
  for (int l = 0; l < lanes_here; ++l) {
    if (!(me.mask >> l & 1u)) continue;
    const Thread& o = L.threads[warp_base + l];
    if (o.state != State::kWarpWait) {
      yield_to_scheduler();  // the last lane to arrive releases everybody, this one included
      return me.result;
    }
    if (o.mask != me.mask || o.is_sync_warp != me.is_sync_warp) {
      std::ostringstream m;
      m << where(L) << ": lanes " << lane << " and " << l << " of the warp wait at different warp "
        << "operations (lines " << line << " and " << o.line << ", masks 0x" << std::hex << me.mask
        << " and 0x" << o.mask << ")";
      fail(m.str());
    }
  }
  // Everyone is here: compute every participant's result and release them.
  for (int l = 0; l < lanes_here; ++l) {
    if (!(me.mask >> l & 1u)) continue;
    Thread& t = L.threads[warp_base + l];
    const int src = t.is_sync_warp ? -1 : source_lane(t, l);
    if (src >= 0 && !(me.mask >> src & 1u)) {
      std::ostringstream m;
      m << where(L) << ": shuffle at line " << line << ": lane " << l << " reads lane " << src
        << ", which is not in the mask 0x" << std::hex << me.mask << " (undefined on the GPU)";
      fail(m.str());
    }
    t.result = src < 0 ? t.value : L.threads[warp_base + src].value;
    t.state = State::kRunnable;
  }
  ++g_stats.warp_syncs;
  if (me.is_sync_warp) ++L.wepoch[L.current / 32];
  return me.result;
}

}  // namespace

void sync_warp(unsigned mask, int line) {
  Launch& L = *t_launch;
  Thread& me = L.threads[L.current];
  me.mask = mask;
  me.is_sync_warp = true;
  warp_op(me, line);
}

uint64_t shuffle(unsigned mask, uint64_t value, int mode, int arg, int width, int line) {
  Launch& L = *t_launch;
  Thread& me = L.threads[L.current];
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
    std::ostringstream m;
    m << where(L) << ": shuffle at line " << line << " with width " << width
      << " (must be a power of 2 <= 32)";
    fail(m.str());
  }
  me.mask = mask;
  me.is_sync_warp = false;
  me.mode = mode;
  me.arg = arg;
  me.width = width;
  me.value = value;
  return warp_op(me, line);
}

void* static_shared(const char* key, size_t bytes, size_t align) {
  Launch& L = *t_launch;
  for (const auto& [k, off] : L.statics)
    if (k == key) return L.arena.data() + off;
  const size_t off = (L.arena_used + align - 1) / align * align;
  if (off + bytes > L.arena.size()) {
    std::ostringstream m;
    m << where(L) << ": __shared__ " << key << " (" << bytes << " bytes) does not fit: the block "
      << "already uses " << L.arena_used << " of at most " << L.arena.size() << " bytes";
    fail(m.str());
  }
  L.statics.emplace_back(key, off);
  L.arena_used = off + bytes;
  return L.arena.data() + off;
}

void* dynamic_shared() { return t_launch->arena.data(); }

int device_attribute(int attr) {
  switch (attr) {
    case 5: return static_cast<int>(g_config.max_grid_x);
    case 6: return static_cast<int>(g_config.max_grid_y);
    case 7: return static_cast<int>(g_config.max_grid_z);
    case 16: return static_cast<int>(g_config.sm_count);
    case 97: return static_cast<int>(g_config.smem_optin);
    default: TORCH_CHECK(false, "simt: device attribute ", attr, " is not emulated");
  }
}

void set_func_max_dynamic_smem(const void* fn, int bytes) {
  TORCH_CHECK(bytes <= g_config.smem_optin, "simt: cudaFuncSetAttribute(MaxDynamicSharedMemorySize=",
              bytes, ") beyond the device's ", g_config.smem_optin);
  g_func_smem[fn] = bytes;
}

namespace {

// Runs the block L.block_id to completion; returns false on error (L.error says why).
bool run_block(Launch& L) {
  const dim3 b = L.block;
  L.nthreads = static_cast<int>(b.x * b.y * b.z);
  L.threads.assign(L.nthreads, Thread{});
  for (int i = 0; i < L.nthreads; ++i) {
    L.threads[i].tid = uint3{i % b.x, i / b.x % b.y, i / (b.x * b.y)};
    prepare_fiber(i);
  }
  // What the previous block used: uninitialised shared memory reads as NaN, shadow cleared.
  const size_t used = std::min(L.arena.size(), std::max(L.arena_used, L.smem));
  std::fill(L.arena.begin(), L.arena.begin() + used, 0xFF);
  std::fill(L.shadow.begin(), L.shadow.begin() + used / 4 + 1, SharedShadow{});
  L.arena_used = L.smem;
  L.statics.clear();
  L.epoch = ++g_epoch_counter;
  L.wepoch.assign((L.nthreads + 31) / 32, 1);
  g_stats.threads += L.nthreads;
  for (;;) {
    bool ran = false;
    for (int i = 0; i < L.nthreads; ++i) {
      if (L.threads[i].state != State::kRunnable) continue;
      L.current = i;
      simt_switch(&L.scheduler_sp, L.threads[i].sp);
      L.current = -1;
      if (!L.error.empty()) return false;
      ran = true;
    }
    if (ran) continue;
    // Nobody can run: everyone finished, a block barrier is complete, or the block is stuck.
    int done = 0, block_wait = 0, warp_wait = 0, line = -1;
    bool same_line = true;
    for (const Thread& t : L.threads) {
      if (t.state == State::kDone) ++done;
      if (t.state == State::kWarpWait) ++warp_wait;
      if (t.state == State::kBlockWait) {
        if (block_wait++ == 0) line = t.line;
        same_line = same_line && t.line == line;
      }
    }
    if (done == L.nthreads) return true;
    if (block_wait == L.nthreads && same_line) {
      for (Thread& t : L.threads) t.state = State::kRunnable;
      L.epoch = ++g_epoch_counter;
      ++g_stats.block_barriers;
      continue;
    }
    std::ostringstream m;
    m << "kernel " << L.name << ", block (" << L.block_id.x << "," << L.block_id.y << ","
      << L.block_id.z << "): ";
    if (warp_wait == 0 && done > 0) {
      m << "barrier divergence: " << block_wait << " of " << L.nthreads
        << " threads wait at __syncthreads (line " << line << ") but " << done
        << " threads returned without reaching it";
    } else if (warp_wait == 0) {
      m << "barrier divergence: the threads wait at __syncthreads on different lines:";
      for (int i = 0; i < L.nthreads; ++i)
        if (i == 0 || L.threads[i].line != L.threads[i - 1].line)
          m << " thread " << i << " at line " << L.threads[i].line << ";";
    } else {
      m << "deadlock: " << warp_wait << " threads wait at warp operations, " << block_wait
        << " at __syncthreads, " << done << " returned;";
      for (int i = 0; i < L.nthreads; ++i) {
        const Thread& t = L.threads[i];
        if (t.state == State::kWarpWait) {
          m << " e.g. thread " << i << " waits at line " << t.line << " for mask 0x" << std::hex
            << t.mask << std::dec;
          break;
        }
      }
    }
    L.error = m.str();
    return false;
  }
}

}  // namespace

void run_grid(const char* name, const void* fn, dim3 grid, dim3 block, size_t smem,
              ThreadBody body, void* ctx) {
  const std::lock_guard<std::mutex> one_launch_at_a_time(g_launch_mutex);
  std::ostringstream cfg;
  cfg << "simt: launch of " << name << " with grid (" << grid.x << "," << grid.y << "," << grid.z
      << "), block (" << block.x << "," << block.y << "," << block.z << "), " << smem
      << " bytes of dynamic shared memory: ";
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && block.x >= 1 && block.y >= 1 &&
                  block.z >= 1,
              cfg.str(), "invalid configuration argument (a zero dimension)");
  TORCH_CHECK(grid.x <= g_config.max_grid_x && grid.y <= g_config.max_grid_y &&
                  grid.z <= g_config.max_grid_z,
              cfg.str(), "invalid configuration argument (grid dims beyond the device's (",
              g_config.max_grid_x, ",", g_config.max_grid_y, ",", g_config.max_grid_z, "))");
  const int64_t threads = int64_t(block.x) * block.y * block.z;
  TORCH_CHECK(threads <= kMaxThreads && block.z <= 64, cfg.str(),
              "invalid configuration argument (more than 1024 threads per block)");
  auto opt = g_func_smem.find(fn);
  const int64_t smem_limit = opt != g_func_smem.end() ? std::max<int64_t>(opt->second, 0)
                                                      : g_config.smem_default;
  TORCH_CHECK(static_cast<int64_t>(smem) <= smem_limit, cfg.str(),
              "too much dynamic shared memory (the limit without cudaFuncSetAttribute is ",
              g_config.smem_default, ", this kernel's is ", smem_limit, ")");
  init_stacks();
  if (g_host_stack_hi == 0) init_host_stack();

  Launch L;
  L.name = name;
  L.fn = fn;
  L.grid = grid;
  L.block = block;
  L.smem = smem;
  L.body = body;
  L.ctx = ctx;
  // static + dynamic shared memory together may use the opt-in maximum
  L.arena.assign(std::max<int64_t>(g_config.smem_optin, g_config.smem_default), 0xFF);
  L.shadow.assign(L.arena.size() / 4 + 1, SharedShadow{});
  ++g_stats.launches;
  t_launch = &L;
  bool ok = true;
  for (unsigned z = 0; z < grid.z && ok; ++z)
    for (unsigned y = 0; y < grid.y && ok; ++y)
      for (unsigned x = 0; x < grid.x && ok; ++x) {
        L.block_id = uint3{x, y, z};
        ++g_stats.blocks;
        ok = run_block(L);
        // static + dynamic shared memory of one block against the per-block limit
        if (ok && static_cast<int64_t>(L.arena_used) > std::max(smem_limit, g_config.smem_default)) {
          L.error = "kernel " + std::string(name) + ": static + dynamic shared memory of " +
                    std::to_string(L.arena_used) + " bytes exceeds the block limit";
          ok = false;
        }
      }
  t_launch = nullptr;
  TORCH_CHECK(ok, "simt: ", L.error);
}

}  // namespace simt

// ---- -fsanitize=kernel-address hooks ------------------------------------------------------------

#define SIMT_HOOKS(n)                                                                            \
  extern "C" void __asan_load##n##_noabort(uintptr_t a) { simt::check_access(a, n, false); }   \
  extern "C" void __asan_store##n##_noabort(uintptr_t a) { simt::check_access(a, n, true); }   \
  extern "C" void __asan_load##n(uintptr_t a) { simt::check_access(a, n, false); }             \
  extern "C" void __asan_store##n(uintptr_t a) { simt::check_access(a, n, true); }
SIMT_HOOKS(1)
SIMT_HOOKS(2)
SIMT_HOOKS(4)
SIMT_HOOKS(8)
SIMT_HOOKS(16)
extern "C" void __asan_loadN_noabort(uintptr_t a, size_t n) { simt::check_access(a, n, false); }
extern "C" void __asan_storeN_noabort(uintptr_t a, size_t n) { simt::check_access(a, n, true); }
extern "C" void __asan_loadN(uintptr_t a, size_t n) { simt::check_access(a, n, false); }
extern "C" void __asan_storeN(uintptr_t a, size_t n) { simt::check_access(a, n, true); }
extern "C" void __asan_handle_no_return() {}
extern "C" void __asan_before_dynamic_init(const char*) {}
extern "C" void __asan_after_dynamic_init() {}

// ---- torch.ops.simt ----------------------------------------------------------------------------

namespace {

void enable() {
  if (c10::GetCPUAllocator() == &simt::g_tracking_allocator) return;
  simt::g_previous_allocator = c10::GetCPUAllocator();
  c10::SetCPUAllocator(&simt::g_tracking_allocator, /*priority=*/100);
}

void disable() {
  if (simt::g_previous_allocator == nullptr) return;
  c10::SetCPUAllocator(simt::g_previous_allocator, /*priority=*/100);
  simt::g_previous_allocator = nullptr;
}

void configure(int64_t max_grid_x, int64_t max_grid_y, int64_t max_grid_z, int64_t sm_count,
               int64_t planted) {
  simt::g_config.max_grid_x = max_grid_x;
  simt::g_config.max_grid_y = max_grid_y;
  simt::g_config.max_grid_z = max_grid_z;
  simt::g_config.sm_count = sm_count;
  simt::g_config.planted = planted;
}

// [launches, blocks, threads, global accesses, shared accesses, block barriers, warp syncs]
std::vector<int64_t> stats() {
  const auto& s = simt::g_stats;
  return {s.launches, s.blocks, s.threads, s.global_accesses, s.shared_accesses, s.block_barriers,
          s.warp_syncs};
}

// Whether t's bytes lie in a tracked allocation (so that kernels may read it).
bool is_tracked(const at::Tensor& t) {
  const auto a = simt::find_allocation(reinterpret_cast<uintptr_t>(t.storage().data()));
  return a && a->begin == reinterpret_cast<uintptr_t>(t.storage().data());
}

}  // namespace

TORCH_LIBRARY(simt, m) {
  m.def("enable", &enable);
  m.def("disable", &disable);
  m.def("configure", &configure);
  m.def("stats", &stats);
  m.def("is_tracked", &is_tracked);
}
